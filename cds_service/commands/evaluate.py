"""`b12-cds evaluate`: run one hook against a FHIR server, print the cards and why.

The request is built as an EHR would send it: by default without prefetch, so the service
fetches the patient's data from `--fhir-server` itself; with `--prefetch`, with the prefetch an
EHR builds from the discovery templates; `--compare` runs both and shows any difference.  It runs
through the real app in-process (the Flask test client POSTing to `/cds-services/<id>`) in dev
mode, so the answer carries the explanation (`cds_service.explain`), with JWT verification off,
only that FHIR server allowlisted and a throwaway data directory, or with `--use-store` the
service's own store (`CDS_DATA_DIR` / `CDS_DATABASE_URL`), read but never written, so suppression
after feedback, the encounter lockout (`--encounter`) and silent mode apply as in the service;
an empty answer then says what withheld the card (the feedback, its reason code and date).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Any, TextIO

import requests

from cds_service.commands.fhir_client import CliError, checked_base_url, diagnose

HOOKS = ("patient-view", "order-select", "order-sign")
SERVICE_PREFIX = "b12-neck-pain-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-server", required=True, metavar="URL",
                        help="FHIR R4 base URL the service fetches the patient's data from")
    parser.add_argument("--patient", required=True, metavar="ID", help="logical id of the Patient")
    parser.add_argument("--hook", choices=HOOKS, default="patient-view", help="hook to fire (default: %(default)s)")
    parser.add_argument("--token", metavar="T",
                        help="access token sent to the FHIR server as fhirAuthorization (Bearer)")
    parser.add_argument("--user", default="Practitioner/b12-cds-cli", metavar="REF",
                        help="context.userId (default: %(default)s)")
    parser.add_argument("--draft-orders", type=Path, metavar="FILE",
                        help="order-select/order-sign: JSON Bundle (or list) of draft orders; default none")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prefetch", action="store_true",
                      help="send a prefetch built as an EHR does: each discovery template rendered and "
                           "queried on --fhir-server (default: no prefetch, the service fetches)")
    mode.add_argument("--compare", action="store_true",
                      help="run with the EHR-built prefetch and with FHIR fallback, show any difference")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="seconds allowed for the FHIR requests of one run (default: %(default)s)")
    parser.add_argument("--encounter", metavar="ID", help="context.encounterId (for the encounter lockout)")
    parser.add_argument("--use-store", action="store_true",
                        help="read the service's store (CDS_DATA_DIR / CDS_DATABASE_URL) so suppression, "
                             "lockout and silent mode apply; nothing is written to it")
    parser.add_argument("--json", action="store_true",
                        help="print the service's JSON answer, with the explanation under \"explanation\"")


def build_hook_request(*, hook: str, fhir_server: str, patient_id: str, user_id: str,
                       token: str | None = None, draft_orders: list[dict[str, Any]] | None = None,
                       encounter_id: str | None = None) -> dict[str, Any]:
    """A CDS Hooks 2.0 request body as an EHR would send it (no prefetch)."""
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server,
        "context": {"userId": user_id, "patientId": patient_id},
    }
    if encounter_id:
        body["context"]["encounterId"] = encounter_id
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "b12-cds-cli"}
    if hook in ("order-select", "order-sign"):
        drafts = draft_orders or []
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
        if drafts:
            bundle["entry"] = [{"resource": d} for d in drafts]
        body["context"]["draftOrders"] = bundle
        if hook == "order-select":
            body["context"]["selections"] = [f"{d.get('resourceType')}/{d.get('id')}" for d in drafts
                                             if isinstance(d, dict) and d.get("id")]
    return body


class InProcessService:
    """The real app, in this process, in dev mode (the answer carries the explanation), with JWT
    verification off, only `fhir_server` allowlisted and a throwaway data directory; with
    `data_dir` None, the configured store (`CDS_DATA_DIR` / `CDS_DATABASE_URL`), read only."""

    def __init__(self, fhir_server: str, data_dir: str | None, timeout: float = 10.0) -> None:
        from cds_service import create_app
        from cds_service.services import services

        config: dict[str, Any] = {"auth_disabled": True, "dev_mode": True, "fhir_allowlist": fhir_server,
                                  "demo_mode": False, "log_level": "ERROR", "fhir_deadline": timeout,
                                  "fhir_connect_timeout": min(timeout, 5.0), "fhir_read_timeout": timeout}
        if data_dir is not None:
            config.update(data_dir=data_dir, database_url="")
        self.app = create_app(config)
        services(self.app).record_cards = data_dir is not None  # the service's store: never written
        self.client = self.app.test_client()

    def templates(self, hook: str) -> dict[str, str]:
        """The prefetch templates discovery publishes for `hook`."""
        services = self.client.get("/cds-services").get_json()["services"]
        return next(s["prefetch"] for s in services if s["hook"] == hook)

    def call(self, body: dict[str, Any]) -> tuple[int, Any]:
        """POST `body` to the hook endpoint; (status, parsed JSON answer)."""
        resp = self.client.post(f"/cds-services/{SERVICE_PREFIX}{body['hook']}", json=body)
        return resp.status_code, resp.get_json(silent=True)

    def close(self) -> None:
        from cds_service.services import services

        s = services(self.app)
        s.patient_data.close()
        s.store.close()


def call_service(body: dict[str, Any], fhir_server: str, data_dir: str) -> tuple[int, Any]:
    """POST `body` to the hook endpoint of an in-process app; (status, parsed JSON answer)."""
    service = InProcessService(fhir_server, data_dir)
    try:
        return service.call(body)
    finally:
        service.close()


def ehr_prefetch(fhir_server: str, templates: dict[str, str], body: dict[str, Any], *,
                 token: str | None, timeout: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The prefetch an EHR would send: each template rendered with the request's context and
    queried on `fhir_server`.  Returns (prefetch, {key: why it was left out}).

    A read that answers 404 is sent as `null` ("no data"); any other failed query is left out,
    as the CDS Hooks Sandbox does, so the service fetches that key itself.  A server that
    cannot be reached at all is a `CliError`.
    """
    from cds_service.commands.fhir_client import HttpStatusError, get_json
    from cds_service.patient_data import TemplateError, render_template
    from cds_service.protocol import parse_hook_request

    tokens = parse_hook_request(body, body["hook"]).context.token_values()
    prefetch: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    with requests.Session() as session:
        session.trust_env = False
        for key, template in templates.items():
            try:
                url = f"{fhir_server}/{render_template(template, tokens).lstrip('/')}"
            except TemplateError as err:
                left_out[key] = str(err)
                continue
            try:
                prefetch[key] = get_json(session, url, token=token, timeout=timeout,
                                         what=f"prefetch key {key!r}", base=fhir_server)
            except HttpStatusError as err:
                if err.status == 404 and "?" not in template:
                    prefetch[key] = None
                else:
                    left_out[key] = str(err)
            # Any other CliError (connection refused, DNS, TLS) propagates: nothing would work.
    return prefetch, left_out


def withheld_text(policy: dict[str, Any] | None, kind: str | None) -> str | None:
    """Why the alert policy withheld the card the rules chose, for a person (None: not withheld)."""
    if not policy or policy.get("delivery") in (None, "shown"):
        return None
    cause = policy.get("cause") or {}
    delivery = policy["delivery"]
    if delivery == "suppressed":
        reason = cause.get("reason_code") or "no coded reason"
        display = f" ({cause['reason_display']})" if cause.get("reason_display") else ""
        return (f"No cards: suppressed. The rules chose a {kind} card, but a {kind} card for this patient was "
                f"{cause.get('outcome')} on {str(cause.get('since'))[:10]} (reason: {reason}{display}; service "
                f"{cause.get('service')}), so it is suppressed until {str(cause.get('until'))[:10]}. A new B12 "
                "result, new red flags or a warning where the card was info would show it again.")
    if delivery == "locked-out":
        return (f"No cards: locked-out. The rules chose a {kind} card, already shown in this encounter by "
                f"{cause.get('service')} at {cause.get('since')} (CDS_ENCOUNTER_LOCKOUT_HOURS).")
    return (f"No cards: silent. The rules chose a {kind} card; silent mode ({cause.get('setting')}) records "
            "it without showing it.")


def format_cards(answer: dict[str, Any], out: TextIO) -> None:
    """Cards for a person: indicator and summary, then detail, suggestions and links; with no
    card, what withheld the rules' card if something did."""
    cards = answer.get("cards") or []
    if not cards:
        expl = explanation_of(answer)
        withheld = withheld_text(expl.get("policy"), (expl.get("decision") or {}).get("kind"))
        print(textwrap.fill(withheld, width=100, break_on_hyphens=False) if withheld
              else "No cards: nothing to suggest for this patient.", file=out)
        return
    for i, card in enumerate(cards, 1):
        print(f"{i}. [{str(card.get('indicator', '')).upper()}] {card.get('summary', '')}", file=out)
        for para in str(card.get("detail") or "").splitlines():
            print(textwrap.fill(para, width=100, initial_indent="   ", subsequent_indent="   ")
                  if para.strip() else "", file=out)
        source = card.get("source") or {}
        if source.get("label"):
            print(f"   Source: {source['label']}" + (f" <{source['url']}>" if source.get("url") else ""), file=out)
        for sug in card.get("suggestions") or []:
            print(f"   Suggestion: {sug.get('label', '')}" + (" (recommended)" if sug.get("isRecommended") else ""),
                  file=out)
        for link in card.get("links") or []:
            print(f"   Link: {link.get('label', '')} <{link.get('url', '')}>", file=out)
        print(file=out)


def _load_drafts(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--draft-orders: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"--draft-orders: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    except json.JSONDecodeError as err:
        raise CliError(f"--draft-orders: {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if isinstance(raw, dict) and raw.get("resourceType") == "Bundle":
        return [e["resource"] for e in raw.get("entry", []) if isinstance(e, dict) and "resource" in e]
    if isinstance(raw, dict):
        return [raw]
    if isinstance(raw, list):
        return [r for r in raw if isinstance(r, dict)]
    raise CliError(f"--draft-orders: {path} holds neither a Bundle, a resource nor a list of resources")


# --- the explanation, for a person ------------------------------------------------------------

def _evidence_line(item: dict[str, Any]) -> str:
    """One record entry behind a fact: reference, code and system, date, text."""
    parts = [item.get("reference") or item.get("resource_type") or "?"]
    if item.get("code"):
        parts.append(f"code {item['code']}" + (f" ({item['system']})" if item.get("system") else ""))
    elif item.get("resource_type"):
        parts.append("matched by text")
    if item.get("on"):
        parts.append(f"dated {item['on']}")
    if item.get("label"):
        parts.append(json.dumps(item["label"], ensure_ascii=False))
    return ", ".join(parts)


def _lab_line(item: dict[str, Any]) -> str:
    ref = f"Observation/{item['resource_id']}" if item.get("resource_id") else "Observation"
    value = "no readable value"
    if item.get("value") is not None:
        value = f"{item.get('comparator') or ''}{item['value']:g} {item.get('unit') or ''}".strip()
        if item.get("value_ng_l") is not None and (item.get("unit") or "").lower() not in ("ng/l", "pg/ml"):
            value += f" (= {item['value_ng_l']:g} ng/L)"
    return f"{ref}, LOINC {item.get('loinc')} (http://loinc.org), dated {item.get('on') or 'unknown'}, value {value}"


def _value_lines(value: Any, indent: str) -> list[str]:
    """A fact's value as lines: evidence and lab results one a line, nested lists indented."""
    if isinstance(value, list):
        lines: list[str] = []
        for item in value:
            lines += _value_lines(item, indent)
        return lines
    if isinstance(value, dict):
        if "evidence" in value and "key" in value:  # a risk factor and its evidence
            return [f"{indent}{value['key']}:"] + _value_lines(value["evidence"], indent + "  ")
        if "loinc" in value:
            return [indent + _lab_line(value)]
        if "resource_type" in value:
            return [indent + _evidence_line(value)]
        return [f"{indent}{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in value.items() if v is not None]
    return [f"{indent}{value}"]


def format_explanation(expl: dict[str, Any], out: TextIO) -> None:
    """The explanation (`cds_service.explain.explain`) as text for a command-line user."""
    d = expl.get("decision") or {}
    rule = f"rule {d['rule']}" if d.get("rule") else "rule"
    outcome = f"card {d['kind']}" if d.get("kind") else "no card"
    print(f"Decision: {outcome}, reason {d.get('reason')} ({rule} in {d.get('rules_table')})", file=out)
    if d.get("b12_result"):
        print("  latest B12 result used: " + _lab_line(d["b12_result"]) + f" -> {d.get('b12_band')}", file=out)
    if d.get("mma_result"):
        print("  MMA result: " + _lab_line(d["mma_result"]), file=out)
    facts = expl.get("facts") or {}
    print("Facts found:" if facts else "Facts found: none", file=out)
    for name, value in facts.items():
        lines = _value_lines(value, "    ")
        if isinstance(value, (list, dict)):
            print(f"  {name}:", file=out)
            for line in lines:
                print(line, file=out)
        else:
            print(f"  {name}: {value}", file=out)
    missing = expl.get("not_found") or []
    if missing:
        print("Looked for and not found:", file=out)
        for item in missing:
            print(f"  {item['fact']}: {item['looked_for']}", file=out)
    unavailable = expl.get("unavailable") or []
    print("Could not be had: " + (", ".join(f"{u['key']} ({u['what']})" for u in unavailable) or "nothing"),
          file=out)
    skipped = expl.get("skipped_invalid") or []
    print("Skipped as invalid FHIR R4: " + (", ".join(skipped) or "nothing"), file=out)
    sources = expl.get("data_sources") or {}
    if sources:
        print(f"Data: prefetched {', '.join(sources.get('prefetched') or []) or 'nothing'}; fetched from the "
              f"FHIR server {', '.join(sources.get('fetched_from_fhir_server') or []) or 'nothing'}", file=out)
    policy = expl.get("policy")
    if policy:
        broken = policy.get("broken") or []
        print(f"Alert policy: {policy.get('delivery')}"
              + (f" (a suppression or lockout did not apply: {', '.join(broken)})" if broken else ""), file=out)
    known = {"decision", "facts", "not_found", "unavailable", "skipped_invalid", "data_sources", "cards",
             "patient_id", "today", "skipped_resources", "reason", "policy"}
    for key, value in expl.items():  # anything the engine adds later
        if key not in known and value not in (None, [], {}):
            print(f"{key}: {json.dumps(value, ensure_ascii=False)}", file=out)


# --- running ----------------------------------------------------------------------------------

MODES = {"fhir": "FHIR fallback (no prefetch)", "prefetch": "prefetch built from the discovery templates"}


def _run_mode(service: InProcessService, args: argparse.Namespace, fhir_server: str,
              drafts: list[dict[str, Any]], mode: str) -> tuple[dict[str, Any], dict[str, str]]:
    """One hook call in `mode`; (answer, prefetch keys left out).  CliError when it fails."""
    body = build_hook_request(hook=args.hook, fhir_server=fhir_server, patient_id=args.patient,
                              user_id=args.user, token=args.token, draft_orders=drafts,
                              encounter_id=args.encounter)
    left_out: dict[str, str] = {}
    if mode == "prefetch":
        body["prefetch"], left_out = ehr_prefetch(fhir_server, service.templates(args.hook), body,
                                                  token=args.token, timeout=args.timeout)
    status, answer = service.call(body)
    if status != 200:
        from cds_service.patient_data import render_template
        from cds_service.protocol import parse_hook_request

        patient_read = render_template(service.templates(args.hook)["patient"],
                                       parse_hook_request(body, args.hook).context.token_values())
        reason = diagnose(fhir_server, patient_read, args.patient, token=args.token, timeout=args.timeout)
        issues = (answer or {}).get("issue") or [{}]
        raise CliError(reason or f"the service answered HTTP {status}: {issues[0].get('diagnostics', 'no details')}")
    return answer, left_out


def explanation_of(answer: dict[str, Any]) -> dict[str, Any]:
    from cds_service.http.hooks import EXPLANATION_EXTENSION

    return ((answer.get("extension") or {}).get(EXPLANATION_EXTENSION)) or {}


def _comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """What must agree between modes: the cards (uuids aside) and the explanation (data sources aside)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "uuid"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    expl = {k: v for k, v in explanation_of(answer).items() if k != "data_sources"}
    return {"cards": strip(answer.get("cards") or []), "explanation": strip(expl)}


def differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(JSON path, value in a, value in b) for every leaf where `a` and `b` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(a) + [k for k in b if k not in a]:
            out += differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def _print_answer(answer: dict[str, Any], left_out: dict[str, str], out: TextIO) -> None:
    format_cards(answer, out)
    for key, why in left_out.items():
        print(f"Prefetch: {key} left out ({why})", file=out)
    format_explanation(explanation_of(answer), out)


def run(args: argparse.Namespace) -> int:
    fhir_server = checked_base_url(args.fhir_server)
    drafts = _load_drafts(args.draft_orders)
    modes = ["prefetch", "fhir"] if args.compare else ["prefetch" if args.prefetch else "fhir"]
    with tempfile.TemporaryDirectory(prefix="b12-cds-evaluate-") as data_dir:
        service = InProcessService(fhir_server, None if args.use_store else data_dir, args.timeout)
        try:
            results = {mode: _run_mode(service, args, fhir_server, drafts, mode) for mode in modes}
        finally:
            service.close()
    if not args.compare:
        answer, left_out = results[modes[0]]
        if args.json:
            _print_json(_json_answer(answer, left_out), sys.stdout)
        else:
            _print_answer(answer, left_out, sys.stdout)
        return 0
    diffs = differences(_comparable(results["prefetch"][0]), _comparable(results["fhir"][0]))
    if args.json:
        _print_json({"same": not diffs,
                     "differences": [{"path": p, "prefetch": a, "fhir": b} for p, a, b in diffs],
                     "prefetch": _json_answer(*results["prefetch"]), "fhir": _json_answer(*results["fhir"])},
                    sys.stdout)
        return 0 if not diffs else 1
    for mode in modes:
        print(f"== {MODES[mode]}", file=sys.stdout)
        _print_answer(*results[mode], sys.stdout)
        print(file=sys.stdout)
    if not diffs:
        print("Same answer in both modes: the same cards and the same explanation.")
        return 0
    print(f"The two modes differ ({len(diffs)} difference{'s' if len(diffs) > 1 else ''}):")
    for path, a, b in diffs:
        print(f"  {path}: prefetch {json.dumps(a, ensure_ascii=False)} / FHIR fallback {json.dumps(b, ensure_ascii=False)}")
    return 1


def _json_answer(answer: dict[str, Any], left_out: dict[str, str]) -> dict[str, Any]:
    """The cards as the service answered them, the explanation, and prefetch keys left out."""
    out = {"cards": answer.get("cards") or [], "explanation": explanation_of(answer)}
    if left_out:
        out["prefetch_left_out"] = left_out
    return out


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
