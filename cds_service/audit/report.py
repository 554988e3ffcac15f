"""The audit report (JSON): firing rates per 1,000 patients, reasons, facts, data quality."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from cds_service.audit.runner import AuditRun
from cds_service.cards import CARD_KINDS, CardTexts
from cds_service.config import Settings
from cds_service.reports.labels import fact_label, kind_label, reason_label, risk_factor_label
from cds_service.rules import NO_CARD_REASONS

REPORT_VERSION = 1


def per_1000(count: int, patients: int) -> float | None:
    return round(count * 1000 / patients, 2) if patients else None


def build_report(run: AuditRun, settings: Settings, *, as_of: datetime, sources: list[str]) -> dict[str, Any]:
    """The report of one audit run.  Everything but `run` and `generated_at` depends only on the
    export, the settings and `as_of` (so a pool and a cluster give the same report)."""
    common = CardTexts.load(settings.cards_dir).common
    t = run.tally
    n = int(t.get("patients_evaluated", 0))
    cards_counts = t.get("cards", {})
    cards = []
    for kind in [*CARD_KINDS, *sorted(set(cards_counts) - set(CARD_KINDS))]:
        count = int(cards_counts.get(kind, 0))
        cards.append({
            "kind": kind,
            "label": kind_label(kind),
            "patients": count,
            "per_1000": per_1000(count, n),
            "indicators": t.get("indicators", {}).get(kind, {}),
            "risk_factors": _ranked(t.get("risk_factors", {}).get(kind, {}),
                                    lambda k: risk_factor_label(k, common, settings.older_age_years)),
            "facts": _ranked(t.get("facts", {}).get(kind, {}), fact_label),
        })
    reasons = t.get("no_card_reasons", {})
    no_card = [{"reason": r, "label": reason_label(r), "patients": int(reasons.get(r, 0)),
                "per_1000": per_1000(int(reasons.get(r, 0)), n)}
               for r in [*NO_CARD_REASONS, *sorted(set(reasons) - set(NO_CARD_REASONS))]]
    with_card = sum(c["patients"] for c in cards)
    s = run.split
    dq = t.get("data_quality", {})
    return {
        "report": "audit",
        "version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "as_of": as_of.isoformat(),
        "hook": "patient-view",
        "sources": sources,
        "patients_evaluated": n,
        "patients_with_card": with_card,
        "per_1000_with_card": per_1000(with_card, n),
        "cards": cards,
        "card_reasons": [{"reason": r, "label": reason_label(r), "patients": int(c)}
                         for r, c in sorted(t.get("card_reasons", {}).items())],
        "no_card_reasons": no_card,
        "data_quality": {
            "resources_read": dict(sorted(s.get("resources", {}).items())),
            "resources_skipped_invalid": int(dq.get("invalid_resources", 0)),
            "b12_results_unit_not_readable": int(dq.get("unreadable_units", 0)),
            "resources_without_patient_reference": int(s.get("without_patient_reference", 0)),
            "lines_not_readable": int(s.get("unreadable", 0)) + int(dq.get("unreadable", 0)),
            "patients_without_patient_resource": int(dq.get("patients_missing_patient_resource", 0)),
            "resource_types_not_used": dict(sorted(s.get("other_types", {}).items())),
        },
        "patients_file": str(run.patients_file) if run.patients_file else None,
        "run": {"executor": run.executor, "workers": run.workers, "partitions": run.partitions,
                "shards": run.shards, "seconds": run.seconds,
                "patients_per_second": round(n / run.seconds, 1) if run.seconds else None},
    }


def _ranked(counts: dict[str, int], label: Any) -> list[dict[str, Any]]:
    return [{"key": k, "label": label(k), "patients": int(c)}
            for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
