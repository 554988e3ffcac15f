"""Synthetic demo patients (no real person's data).

`patients.json` is one FHIR R4 transaction Bundle (PUT entries with stable ids such as
`Patient/demo-metformin-chronic`).  Its dates were written relative to the anchor date stored in
`Bundle.timestamp`; `load_demo_bundle(today)` moves every date by (today - anchor) so each record
keeps the same distance from "today" (a result "35 days ago" stays 35 days ago), whatever the day
the demo or the tests run.  `catalog.json` lists each patient with the outcome the rules give.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# FHIR date / dateTime / instant values (full dates only; the demo data uses no partial dates).
_DATE_VALUE = re.compile(r"^(\d{4}-\d{2}-\d{2})(T.*)?$")
_DATE_KEYS = frozenset({
    "birthDate", "onsetDateTime", "abatementDateTime", "recordedDate", "effectiveDateTime",
    "issued", "authoredOn", "performedDateTime", "occurrenceDateTime", "dateAsserted", "start", "end",
    "timestamp", "date",
})


@lru_cache(maxsize=1)
def _raw_bundle() -> dict[str, Any]:
    return json.loads((HERE / "patients.json").read_text(encoding="utf-8"))


def anchor_date() -> date:
    """The date the stored bundle's relative dates were written against."""
    return date.fromisoformat(_raw_bundle()["timestamp"][:10])


def load_demo_bundle(today: date) -> dict[str, Any]:
    """The demo transaction Bundle with all dates shifted so they are relative to `today`."""
    shift = today - anchor_date()
    bundle = copy.deepcopy(_raw_bundle())
    _shift(bundle, shift)
    return bundle


def load_catalog() -> list[dict[str, str]]:
    """[{"patientId", "name", "description", "expected"}]: `expected` is a card kind or a
    no-card reason (see cds_service.rules)."""
    return json.loads((HERE / "catalog.json").read_text(encoding="utf-8"))


def demo_resources(patient_id: str, today: date) -> list[dict[str, Any]]:
    """The Patient and every resource whose subject is `Patient/{patient_id}` (dates shifted)."""
    out = []
    for entry in load_demo_bundle(today)["entry"]:
        res = entry["resource"]
        if (res["resourceType"] == "Patient" and res["id"] == patient_id) or \
                res.get("subject", {}).get("reference") == f"Patient/{patient_id}":
            out.append(res)
    return out


def _shift(node: Any, shift: timedelta) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _DATE_KEYS and isinstance(value, str):
                node[key] = _shift_value(value, shift)
            else:
                _shift(value, shift)
    elif isinstance(node, list):
        for item in node:
            _shift(item, shift)


def _shift_value(value: str, shift: timedelta) -> str:
    m = _DATE_VALUE.match(value)
    if not m:
        return value
    return (date.fromisoformat(m.group(1)) + shift).isoformat() + (m.group(2) or "")
