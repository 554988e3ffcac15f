"""`b12-cds evaluate`: run one hook against a FHIR server and print the cards.

The request is built as an EHR would send it, without prefetch, so the service fetches the
patient's data from `--fhir-server` itself.  It runs through the real app in-process (the Flask
test client POSTing to `/cds-services/<id>`) with JWT verification off and only that FHIR server
allowlisted, and with a throwaway data directory.
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
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer")


def build_hook_request(*, hook: str, fhir_server: str, patient_id: str, user_id: str,
                       token: str | None = None, draft_orders: list[dict[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """A CDS Hooks 2.0 request body as an EHR would send it (no prefetch)."""
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": fhir_server,
        "context": {"userId": user_id, "patientId": patient_id},
    }
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


def call_service(body: dict[str, Any], fhir_server: str, data_dir: str) -> tuple[int, Any]:
    """POST `body` to the hook endpoint of an in-process app; (status, parsed JSON answer)."""
    from cds_service import create_app

    app = create_app({"auth_disabled": True, "fhir_allowlist": fhir_server, "data_dir": data_dir,
                      "database_url": "", "demo_mode": False, "log_level": "ERROR"})
    with app.test_client() as client:
        resp = client.post(f"/cds-services/{SERVICE_PREFIX}{body['hook']}", json=body)
        return resp.status_code, resp.get_json(silent=True)


def format_cards(answer: dict[str, Any], out: TextIO) -> None:
    """Cards for a person: indicator and summary, then detail, suggestions and links."""
    cards = answer.get("cards") or []
    if not cards:
        print("No cards: nothing to suggest for this patient.", file=out)
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
    raw = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(raw, dict) and raw.get("resourceType") == "Bundle":
        return [e["resource"] for e in raw.get("entry", []) if isinstance(e, dict) and "resource" in e]
    if isinstance(raw, dict):
        return [raw]
    return [r for r in raw if isinstance(r, dict)]


def run(args: argparse.Namespace) -> int:
    fhir_server = args.fhir_server.rstrip("/")
    body = build_hook_request(hook=args.hook, fhir_server=fhir_server, patient_id=args.patient,
                              user_id=args.user, token=args.token, draft_orders=_load_drafts(args.draft_orders))
    with tempfile.TemporaryDirectory(prefix="b12-cds-evaluate-") as data_dir:
        status, answer = call_service(body, fhir_server, data_dir)
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
        return 0 if status == 200 else 1
    if status != 200:
        issues = (answer or {}).get("issue") or [{}]
        print(f"HTTP {status}: {issues[0].get('diagnostics', 'no details')}", file=sys.stderr)
        return 1
    format_cards(answer or {}, sys.stdout)
    return 0
