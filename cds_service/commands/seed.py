"""`b12-cds seed`: load the synthetic demo patients into a FHIR server as one transaction Bundle.

The Bundle comes from `cds_service.demo_data.load_demo_bundle(today)`: PUT entries with stable
ids, dates relative to `today`, so seeding twice updates rather than duplicates.  Prints the
Patient ids, one a line, ready for `b12-cds evaluate --patient ID`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from typing import Any

import orjson
import requests

FHIR_JSON = "application/fhir+json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-server", required=True, metavar="URL", help="FHIR R4 base URL to load into")
    parser.add_argument("--token", metavar="T", help="Bearer token for the FHIR server")
    parser.add_argument("--today", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                        help="reference date the demo data is built around (default: today)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")


def demo_bundle(today: date) -> dict[str, Any]:
    """The demo transaction Bundle (from the clinical engineer's `cds_service.demo_data`)."""
    from cds_service.demo_data import load_demo_bundle

    return load_demo_bundle(today)


def patient_ids(bundle: dict[str, Any]) -> list[str]:
    """Ids of the Patient resources in a transaction Bundle, in Bundle order."""
    return [e["resource"]["id"] for e in bundle.get("entry", [])
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == "Patient" and e["resource"].get("id")]


def post_transaction(fhir_server: str, bundle: dict[str, Any], *, token: str | None = None,
                     timeout: float = 60.0) -> dict[str, Any]:
    """POST a transaction Bundle to `fhir_server`; the transaction-response, or RuntimeError."""
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = requests.post(fhir_server.rstrip("/"), data=orjson.dumps(bundle), headers=headers,
                         timeout=(min(10.0, timeout), timeout), allow_redirects=False)
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if not 200 <= resp.status_code < 300 or not isinstance(answer, dict) \
            or answer.get("resourceType") != "Bundle":
        detail = ""
        if isinstance(answer, dict) and answer.get("resourceType") == "OperationOutcome":
            detail = "; ".join(str(i.get("diagnostics", i.get("code", ""))) for i in answer.get("issue", []))[:500]
        raise RuntimeError(f"transaction failed: HTTP {resp.status_code} {detail}".strip())
    failed = [e.get("response", {}).get("status", "") for e in answer.get("entry", [])
              if isinstance(e, dict) and not str(e.get("response", {}).get("status", "")).startswith("2")]
    if failed:
        raise RuntimeError(f"transaction failed: {len(failed)} entries not accepted ({', '.join(failed[:3])})")
    return answer


def run(args: argparse.Namespace) -> int:
    bundle = demo_bundle(args.today or date.today())
    try:
        post_transaction(args.fhir_server, bundle, token=args.token, timeout=args.timeout)
    except (RuntimeError, requests.RequestException) as err:
        print(f"seed: {err}", file=sys.stderr)
        return 1
    for pid in patient_ids(bundle):
        print(pid)
    return 0
