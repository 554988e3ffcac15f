"""Demo mode: a small EHR-like page at `/` that fires hooks at this service, and its JSON helpers.

Registered only when `settings.demo_mode` is on (`b12-cds serve --demo`).  The page
(`cds_service/demo/static/`: plain HTML/CSS/JS, nothing from the internet) behaves like an EHR:
it asks these helpers for what an EHR already has (the patient's chart, the prefetch its FHIR
server would answer, a signed JWT) and then calls the CDS service endpoints itself with fetch(),
exactly as a browser-based CDS client would.

Routes (all demo-only):

* `GET /`: the page.
* `GET /demo/static/<file>`: its script, style sheet and icon.
* `GET /demo/api/patients`: the demo catalog, each patient with the chart shown on the page
  (problems, medications, procedures, B12/MMA results, other findings).
* `GET /demo/api/patients/<id>/prefetch?hook=patient-view`: the prefetch an EHR would send: each
  key of the discovery templates answered from the patient's demo resources the way its FHIR
  query would be (a `searchset` Bundle for a search, the resource itself for a read).
* `POST /demo/api/token` `{"path": "/cds-services/..."}`: a JWT from the demo issuer (which the
  verifier trusts in demo mode) whose `aud` is the full URL of that path on this service.
* `POST /demo/api/reset`: forget the suppressions of the demo patients (the page calls it when it
  loads, and from its "Reset demo patients" button), so every visit starts with the cards the
  catalog promises; feedback and the report are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from flask import Blueprint, Response, request, send_from_directory

from cds_service.services import services
from cds_service.demo_data import demo_resources, load_catalog
from cds_service.http.errors import json_response
from cds_service.protocol import CdsError, bad_request
from cds_service.record import PREFETCH_KEYS

STATIC_DIR = Path(__file__).resolve().parent.parent / "demo" / "static"

blueprint = Blueprint("demo", __name__, static_folder=str(STATIC_DIR), static_url_path="/demo/static")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page may load and call nothing but this service (the browser enforces it)."""

TOKEN_PATHS = re.compile(r"^/cds-services(/[A-Za-z0-9._-]{1,128}(/feedback)?)?$|^/admin/feedback-report$")
"""Paths a demo token may be minted for: discovery, a service, its feedback, the report."""

SEARCH_PARAMS_IGNORED = frozenset({"_count", "_sort", "_total", "_summary", "_elements"})
LAB_VALUESETS = ("b12-lab", "mma-lab", "active-b12-lab")
MAX_PATIENT_ID = 64


# ---------------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------------


@blueprint.after_request
def _demo_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.path.startswith("/demo/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


@blueprint.get("/")
def page() -> Response:
    response = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response


# ---------------------------------------------------------------------------------------------
# Demo data
# ---------------------------------------------------------------------------------------------


def _today() -> date:
    return datetime.now(timezone.utc).date()


@lru_cache(maxsize=1)
def catalog() -> tuple[dict[str, Any], ...]:
    """`demo_data/catalog.json`: [{"patientId", "name", "description", "expected"}, ...]."""
    return tuple(load_catalog())


def _catalog_entry(patient_id: str) -> dict[str, Any]:
    for entry in catalog():
        if entry["patientId"] == patient_id:
            return entry
    raise CdsError(404, f"no demo patient {patient_id[:MAX_PATIENT_ID]!r}")


def patient_resources(patient_id: str) -> list[dict[str, Any]]:
    _catalog_entry(patient_id)
    return demo_resources(patient_id, _today())


# ---------------------------------------------------------------------------------------------
# Codes and display text
# ---------------------------------------------------------------------------------------------


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def _text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if isinstance(concept.get("text"), str) and concept["text"]:
        return concept["text"]
    for coding in _codings(concept):
        if coding.get("display"):
            return str(coding["display"])
    for coding in _codings(concept):
        if coding.get("code"):
            return str(coding["code"])
    return ""


def _status_code(concept: Any) -> str:
    codings = _codings(concept)
    return str(codings[0].get("code", "")) if codings else ""


def lab_codes() -> set[tuple[str, str]]:
    """The B12 and MMA test codes, from the engine's value sets."""
    engine = services().engine
    return {code for name in LAB_VALUESETS for code in engine.valueset_codes(name)}


def _matches(concept: Any, codes: set[tuple[str, str]]) -> bool:
    return any((c.get("system", ""), c.get("code", "")) in codes for c in _codings(concept))


def _value_text(obs: dict[str, Any]) -> str:
    q = obs.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        unit = q.get("unit") or q.get("code") or ""
        comparator = q.get("comparator") or ""
        return f"{comparator}{q['value']} {unit}".strip()
    for key in ("valueCodeableConcept",):
        if isinstance(obs.get(key), dict):
            return _text(obs[key])
    for key in ("valueString", "valueBoolean", "valueInteger"):
        if key in obs:
            return str(obs[key])
    parts = [f"{_text(c.get('code'))}: {_value_text(c)}" for c in obs.get("component") or [] if isinstance(c, dict)]
    return "; ".join(parts)


def _when(res: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = res.get(key)
        if isinstance(value, str) and value:
            return value[:10]
        if isinstance(value, dict):
            for sub in ("start", "end"):
                if isinstance(value.get(sub), str):
                    return value[sub][:10]
    return ""


def chart(resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What the page shows of a patient (display strings only)."""
    labs = lab_codes()
    out: dict[str, Any] = {"patient": None, "problems": [], "medications": [], "procedures": [],
                           "results": [], "findings": [], "orders": []}
    for res in resources:
        rtype = res.get("resourceType")
        if rtype == "Patient":
            name = (res.get("name") or [{}])[0] if isinstance(res.get("name"), list) else {}
            display = name.get("text") or " ".join([*(name.get("given") or []), name.get("family") or ""]).strip()
            out["patient"] = {"id": res.get("id"), "name": display, "gender": res.get("gender", ""),
                              "birthDate": res.get("birthDate", "")}
        elif rtype == "Condition":
            out["problems"].append({"text": _text(res.get("code")),
                                    "status": _status_code(res.get("clinicalStatus")),
                                    "onset": _when(res, "onsetDateTime", "onsetPeriod", "recordedDate")})
        elif rtype in ("MedicationRequest", "MedicationStatement"):
            out["medications"].append({"text": _text(res.get("medicationCodeableConcept")) or "medication",
                                       "status": res.get("status", ""),
                                       "kind": "prescription" if rtype == "MedicationRequest" else "reported",
                                       "date": _when(res, "authoredOn", "effectiveDateTime", "effectivePeriod")})
        elif rtype == "Procedure":
            out["procedures"].append({"text": _text(res.get("code")), "status": res.get("status", ""),
                                      "date": _when(res, "performedDateTime", "performedPeriod")})
        elif rtype == "ServiceRequest":
            out["orders"].append({"text": _text(res.get("code")), "status": res.get("status", ""),
                                  "date": _when(res, "authoredOn")})
        elif rtype == "Observation":
            item = {"text": _text(res.get("code")), "value": _value_text(res), "status": res.get("status", ""),
                    "date": _when(res, "effectiveDateTime", "effectivePeriod", "issued")}
            interpretation = [_text(i) for i in res.get("interpretation") or [] if isinstance(i, dict)]
            if interpretation:
                item["interpretation"] = ", ".join(t for t in interpretation if t)
            is_lab = _matches(res.get("code"), labs) or any(
                _matches(c.get("code"), labs) for c in res.get("component") or [] if isinstance(c, dict))
            (out["results"] if is_lab else out["findings"]).append(item)
    out["results"].sort(key=lambda r: r["date"], reverse=True)
    return out


@blueprint.get("/demo/api/patients")
def list_patients() -> Response:
    patients = []
    for entry in catalog():
        pid = entry["patientId"]
        patients.append({
            "patientId": pid,
            "name": entry.get("name", pid),
            "description": entry.get("description", ""),
            "expected": entry.get("expected"),
            "chart": chart(patient_resources(pid)),
        })
    return json_response({"patients": patients})


# ---------------------------------------------------------------------------------------------
# Prefetch: each template answered from the patient's resources as a FHIR server would
# ---------------------------------------------------------------------------------------------


def _token_matches(codings: list[dict[str, Any]], value: str) -> bool:
    """FHIR token search: `[system]|[code]`, `|[code]` (no system), `[code]` (any system)."""
    for system, code in _split_unescaped_tokens(value):
        for coding in codings:
            if coding.get("code") != code:
                continue
            if system is None or (coding.get("system") or "") == system:
                return True
    return False


def _split_unescaped_tokens(value: str) -> list[tuple[str | None, str]]:
    tokens: list[tuple[str | None, str]] = []
    for alternative in _split_raw(value, ","):
        pieces = _split_raw(alternative, "|")
        if len(pieces) == 1:
            tokens.append((None, _unescape(pieces[0])))
        else:
            tokens.append((_unescape(pieces[0]), _unescape("|".join(pieces[1:]))))
    return tokens


def _split_raw(text: str, sep: str) -> list[str]:
    """Split on unescaped `sep`, keeping escapes in the parts."""
    parts, start, i = [], 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _references_patient(res: dict[str, Any], patient_id: str) -> bool:
    for key in ("subject", "patient"):
        ref = res.get(key)
        if isinstance(ref, dict) and ref.get("reference") in (f"Patient/{patient_id}", patient_id):
            return True
    return False


def _search_matches(res: dict[str, Any], name: str, value: str, patient_id: str) -> bool:
    if name in ("patient", "subject"):
        target = _unescape(value).removeprefix("Patient/")
        return target == patient_id and _references_patient(res, patient_id)
    if name in ("code", "combo-code"):
        concepts = [res.get("code")]
        if name == "combo-code" and isinstance(res.get("component"), list):
            concepts += [c.get("code") for c in res["component"] if isinstance(c, dict)]
        if isinstance(res.get("medicationCodeableConcept"), dict):
            concepts.append(res["medicationCodeableConcept"])
        return _token_matches([c for concept in concepts for c in _codings(concept)], value)
    if name == "value-concept":
        return _token_matches(_codings(res.get("valueCodeableConcept")), value)
    if name in ("status", "clinical-status", "intent", "category"):
        field = {"clinical-status": "clinicalStatus"}.get(name, name)
        raw = res.get(field)
        codings = [c for concept in (raw if isinstance(raw, list) else [raw]) for c in _codings(concept)]
        if isinstance(raw, str):
            codings = [{"code": raw}]
        return _token_matches(codings, value)
    raise bad_request(f"demo prefetch: unsupported search parameter {name!r}")


def _sort_key(res: dict[str, Any]) -> str:
    return _when(res, "effectiveDateTime", "effectivePeriod", "issued", "authoredOn", "recordedDate",
                 "performedDateTime", "performedPeriod", "onsetDateTime")


def answer_query(query: str, resources: list[dict[str, Any]], patient_id: str) -> Any:
    """Answer one rendered prefetch query (`Type/id` read or `Type?params` search)."""
    path, _, qs = query.partition("?")
    path = path.strip("/")
    if "/" in path and not qs:  # instance read
        rtype, _, rid = path.partition("/")
        rid = unquote(rid)
        for res in resources:
            if res.get("resourceType") == rtype and res.get("id") == rid:
                return res
        return None
    rtype = path
    params = parse_qsl(qs, keep_blank_values=True)
    hits = [r for r in resources if r.get("resourceType") == rtype]
    for name, value in params:
        if name in SEARCH_PARAMS_IGNORED:
            continue
        hits = [r for r in hits if _search_matches(r, name, value, patient_id)]
    sort = dict(params).get("_sort", "")
    if sort.lstrip("-") == "date":
        hits.sort(key=_sort_key, reverse=sort.startswith("-"))
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(hits),
        "entry": [{"fullUrl": f"urn:demo:{r['resourceType']}/{r.get('id', '')}", "resource": r,
                   "search": {"mode": "match"}} for r in hits],
    } if hits else {"resourceType": "Bundle", "type": "searchset", "total": 0}


def hook_templates(hook: str) -> dict[str, str]:
    from cds_service.http.hooks import prefetch_templates, service_definitions

    if hook not in {svc.hook for svc in service_definitions().values()}:
        raise bad_request(f"hook must be one of this service's hooks, not {hook[:64]!r}", "hook")
    return prefetch_templates(hook)


@blueprint.get("/demo/api/patients/<patient_id>/prefetch")
def prefetch(patient_id: str) -> Response:
    from cds_service.patient_data import render_template

    hook = request.args.get("hook", "patient-view")
    templates = hook_templates(hook)
    resources = patient_resources(patient_id)
    tokens = {"context.patientId": patient_id, "context.userId": "Practitioner/demo-clinician",
              "userPractitionerId": "demo-clinician"}
    answered: dict[str, Any] = {}
    queries: dict[str, str] = {}
    for key, template in templates.items():
        query = render_template(template, tokens)
        queries[key] = query
        value = answer_query(query, resources, patient_id)
        if value is not None:  # a read of a missing resource: the key is left out, as EHRs do
            answered[key] = value
    return json_response({"hook": hook, "queries": queries, "prefetch": answered,
                          "keys": [k for k in PREFETCH_KEYS if k in answered]})


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def demo_issuer() -> Any:
    """The demo signer the verifier trusts in demo mode (same key file, so the same key)."""
    from cds_service.security import DemoIssuer

    issuer = getattr(services().verifier, "demo_issuer", None)
    return issuer if issuer is not None else DemoIssuer(services().settings)


def _own_origins(public_base_url: str) -> set[str]:
    origins = {request.host_url.rstrip("/")}
    if public_base_url:
        parts = urlsplit(public_base_url)
        origins.add(f"{parts.scheme}://{parts.netloc}")
    return origins


@blueprint.post("/demo/api/token")
def token() -> Response:
    """Mint a demo-issuer JWT for a call to `path` on this service (same-origin pages only)."""
    settings = services().settings
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") not in _own_origins(settings.public_base_url):
        raise CdsError(403, "demo tokens are only minted for the demo page itself")
    body = request.get_json(silent=True)
    path = body.get("path") if isinstance(body, dict) else None
    if not isinstance(path, str) or not TOKEN_PATHS.match(path):
        raise bad_request("path must be /cds-services, /cds-services/<id>[/feedback] or /admin/feedback-report",
                          "path")
    base = (settings.public_base_url or request.host_url).rstrip("/")
    audience = base + path
    admin = path == "/admin/feedback-report"  # the report needs an admin token
    return json_response({"token": demo_issuer().mint(audience, admin=admin), "audience": audience})


@blueprint.post("/demo/api/reset")
def reset() -> Response:
    """Forget the suppressions of the demo patients (same-origin pages only)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") not in _own_origins(services().settings.public_base_url):
        raise CdsError(403, "the demo patients are only reset by the demo page itself")
    cleared = services().store.clear_suppressions([entry["patientId"] for entry in catalog()])
    return json_response({"cleared": cleared})
