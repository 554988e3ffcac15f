"""Evaluate one shard: group by patient, build each `PatientRecord`, call the hooks' engine.

There is no audit copy of any rule: each patient goes through `ClinicalEngine.evaluate` with the
context a `patient-view` hook call would carry (`patientId`, a user id), at one fixed `now` for
the whole run.  The result per shard is a tally of counts (JSON-able, added up with
`shards.merge_counts`) and one CSV row per patient who would get a card, written next to the
shard so a cluster's workers never send patient lists through the scheduler.
"""

from __future__ import annotations

import csv
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from cds_service.app import tune_garbage_collector
from cds_service.audit.shards import read_shard
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine, Evaluation
from cds_service.protocol import HookContext, HookRequest
from cds_service.record import PatientRecord

AUDIT_USER = "Practitioner/b12-cds-audit"
AUDIT_HOOK = "patient-view"
ROW_FIELDS = ("patient_id", "card_kind", "indicator", "reason", "summary")

_ENGINES: dict[Settings, ClinicalEngine] = {}


def engine_for(settings: Settings) -> ClinicalEngine:
    """One engine per process and settings (value sets and card texts are loaded once).

    The first load also applies the service's garbage-collector settings (a worker evaluates
    thousands of patients, as a service worker does: same tuning, same per-patient cost)."""
    engine = _ENGINES.get(settings)
    if engine is None:
        engine = _ENGINES[settings] = ClinicalEngine.load(settings)
        if len(_ENGINES) == 1:
            tune_garbage_collector()
    return engine


def rows_path(work_dir: str | Path, shard: int) -> Path:
    return Path(work_dir) / "rows" / f"{shard:05d}.csv"


def hook_request_for(patient_id: str) -> HookRequest:
    """The request a `patient-view` hook call for this patient would be evaluated with."""
    return HookRequest(hook=AUDIT_HOOK, hook_instance=f"audit-{patient_id}",
                       context=HookContext(user_id=AUDIT_USER, patient_id=patient_id))


def evaluate_shard(work_dir: str, shard: int, settings: Settings, now_iso: str) -> dict[str, Any]:
    """Evaluate every patient of `shard`; write its card rows; return its tally."""
    engine = engine_for(settings)
    now = datetime.fromisoformat(now_iso)
    tally = new_tally()
    rows: list[tuple[str, ...]] = []
    loads = orjson.loads
    for pid, lines in sorted(read_shard(work_dir, shard).items()):
        resources = []
        for raw in lines:
            try:
                resources.append(loads(raw))
            except orjson.JSONDecodeError:  # cannot happen for lines the splitter parsed
                tally["data_quality"]["unreadable"] += 1
        record = PatientRecord.from_resources(resources)
        if record.patient is None:
            # Data about a patient whose Patient resource is not in the export: the hook would
            # answer 412 (no Patient), so nobody to evaluate.
            tally["data_quality"]["patients_missing_patient_resource"] += 1
            continue
        evaluation = engine.evaluate(record, hook_request_for(pid), now)
        add_to_tally(tally, evaluation)
        if evaluation.cards:
            card = evaluation.cards[0]
            rows.append((pid, evaluation.decision.kind or "", card.indicator, evaluation.decision.reason,
                         card.summary))
    path = rows_path(work_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return plain(tally)


def new_tally() -> dict[str, Any]:
    return {
        "patients_evaluated": 0,
        "cards": Counter(),
        "indicators": {},
        "card_reasons": Counter(),
        "no_card_reasons": Counter(),
        "risk_factors": {},
        "facts": {},
        "data_quality": Counter(),
    }


def add_to_tally(tally: dict[str, Any], evaluation: Evaluation) -> None:
    """Count one patient's decision, and the risk factors and facts behind a card."""
    decision, facts = evaluation.decision, evaluation.facts
    tally["patients_evaluated"] += 1
    dq = tally["data_quality"]
    dq["invalid_resources"] += evaluation.skipped_resources
    if facts is not None:
        dq["unreadable_units"] += sum(1 for r in facts.b12_results if r.value is not None and r.value_ng_l is None)
    kind = decision.kind
    if kind is None:
        tally["no_card_reasons"][decision.reason] += 1
        return
    tally["cards"][kind] += 1
    tally["card_reasons"][decision.reason] += 1
    tally["indicators"].setdefault(kind, Counter())[decision.indicator or "info"] += 1
    if facts is None:
        return
    risks = tally["risk_factors"].setdefault(kind, Counter())
    for rf in facts.risk_factors:
        risks[rf.key] += 1
    behind = tally["facts"].setdefault(kind, Counter())
    for name, present in (("chronic-neck-pain", facts.chronic), ("neuropathic-features", bool(facts.neuropathic)),
                          ("red-flags", bool(facts.red_flags)), ("mechanical-causes", bool(facts.mechanical)),
                          ("compressive-causes", bool(facts.compressive)), ("no-risk-factor", not facts.risk_factors)):
        if present:
            behind[name] += 1
    if decision.b12_band:
        behind[f"b12-{decision.b12_band}"] += 1


def plain(value: Any) -> Any:
    """Counters -> dicts (picklable, JSON-able, deterministic key order)."""
    if isinstance(value, dict):
        return {k: plain(value[k]) for k in sorted(value)}
    return value
