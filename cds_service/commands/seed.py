"""`b12-cds seed`: load the synthetic demo patients into a FHIR server as one transaction Bundle.

The Bundle comes from `cds_service.demo_data.load_demo_bundle(today)`: PUT entries with stable
ids, dates relative to `today`, so seeding twice updates rather than duplicates.  Prints the
Patient ids, one a line, ready for `b12-cds evaluate --patient ID`.

On a shared server, `--id-prefix you-` gives every seeded resource the id `you-<id>` (references
between them rewritten to match), so the PUTs never overwrite someone else's demo patients.
Before writing, it says on stderr where it writes and which Patient ids (`--dry-run`: only that).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from datetime import date
from typing import Any

import orjson
import requests

from cds_service.commands.fhir_client import CliError, checked_base_url, connection_message

FHIR_JSON = "application/fhir+json"
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
"""FHIR R4 `id`: 1-64 letters, digits, '-' and '.'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-server", required=True, metavar="URL", help="FHIR R4 base URL to load into")
    parser.add_argument("--token", metavar="T", help="Bearer token for the FHIR server")
    parser.add_argument("--today", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                        help="reference date the demo data is built around (default: today)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    parser.add_argument("--id-prefix", default="", metavar="PREFIX",
                        help="prefix every resource id (e.g. 'alice-'), so a shared test server keeps "
                             "other people's demo patients; references are rewritten to match")
    parser.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")


def demo_bundle(today: date) -> dict[str, Any]:
    """The demo transaction Bundle (from the clinical engineer's `cds_service.demo_data`)."""
    from cds_service.demo_data import load_demo_bundle

    return load_demo_bundle(today)


def with_id_prefix(bundle: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of the transaction `bundle` where every resource id is `prefix + id`, and every
    `Type/id` reference, `request.url` and `fullUrl` naming a resource of the bundle follows."""
    if not prefix:
        return bundle
    out = copy.deepcopy(bundle)
    renamed: dict[str, str] = {}
    for entry in out.get("entry", []):
        res = entry.get("resource") or {}
        if res.get("id") and res.get("resourceType"):
            new_id = prefix + res["id"]
            if not FHIR_ID.match(new_id):
                raise CliError(f"--id-prefix {prefix!r}: {new_id!r} is not a valid FHIR id "
                               "(letters, digits, '-' and '.', at most 64 characters)")
            renamed[f"{res['resourceType']}/{res['id']}"] = f"{res['resourceType']}/{new_id}"
            res["id"] = new_id

    def rewrite(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    node[key] = renamed.get(value, value)
                else:
                    rewrite(value)
        elif isinstance(node, list):
            for item in node:
                rewrite(item)

    for entry in out.get("entry", []):
        rewrite(entry.get("resource"))
        request = entry.get("request") or {}
        if isinstance(request.get("url"), str):
            request["url"] = renamed.get(request["url"], request["url"])
        full = entry.get("fullUrl")
        if isinstance(full, str):
            for old, new in renamed.items():
                if full.endswith("/" + old):
                    entry["fullUrl"] = full[: -len(old)] + new
                    break
    return out


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
    fhir_server = checked_base_url(args.fhir_server)
    bundle = with_id_prefix(demo_bundle(args.today or date.today()), args.id_prefix)
    ids = patient_ids(bundle)
    print(f"{'Would write' if args.dry_run else 'Writing'} {len(bundle.get('entry', []))} resources "
          f"(PUT: a resource with the same id is overwritten) for {len(ids)} demo patients to "
          f"{fhir_server}: {', '.join(ids)}", file=sys.stderr)
    if not args.id_prefix:
        print("On a shared server, use --id-prefix YOURNAME- so you do not overwrite someone else's "
              "demo patients.", file=sys.stderr)
    if args.dry_run:
        return 0
    try:
        post_transaction(fhir_server, bundle, token=args.token, timeout=args.timeout)
    except requests.RequestException as err:
        raise CliError(connection_message(err, fhir_server)) from None
    except RuntimeError as err:
        raise CliError(_transaction_hint(str(err), fhir_server)) from None
    for pid in ids:
        print(pid)
    return 0


def _transaction_hint(message: str, fhir_server: str) -> str:
    if "HTTP 401" in message:
        return f"{message}: the token is missing, expired or invalid; pass a fresh one with --token"
    if "HTTP 404" in message or "HTTP 405" in message:
        return f"{message}: is {fhir_server} the FHIR base URL (often ending in /fhir)?"
    return message
