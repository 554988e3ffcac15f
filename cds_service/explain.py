"""Why the engine decided what it did: a plain-data view of one `Evaluation`.

`explain(evaluation)` reads the objects the cards were built from (the `Decision`, the
`PatientFacts` with the `Evidence` behind each fact) and turns them into JSON-ready data; it
computes nothing itself, so the explanation cannot disagree with the cards.  It walks the
dataclass fields generically: a fact, a decision field or an evaluation field added later shows
up here without an edit.

Used by `b12-cds evaluate` (text or `--json`) and, in demo and dev modes only, by the hook
endpoint (an `extension` of the answer, shown by the demo page under the card).  The explanation
holds patient data (record ids, codes, values): it is for the person who asked, never for logs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from cds_service import rules
from cds_service.engine import Evaluation

RULES_TABLE = "docs/rules.md#rules-applied-in-order-the-first-that-applies-decides"
"""The clinician-facing rules table every reason code is listed in."""

RULE_OF_REASON: Mapping[str, str] = {
    rules.NO_NECK_PAIN: "1",
    rules.ALREADY_HANDLED: "1",
    rules.LOW_RESULT: "2",
    rules.LOW_TOTAL_IN_PREGNANCY: "2",
    rules.NO_RISK_FACTOR: "3",
    rules.ACUTE_OR_EXPLAINED: "4",
    rules.PENDING_ORDER: "5",
    rules.RESULT_PENDING: "5b",
    rules.MMA_DONE: "6",
    rules.INDETERMINATE_RESULT: "6",
    rules.INDETERMINATE_TOTAL_IN_PREGNANCY: "6",
    rules.RECENT_TEST: "7a",
    rules.RECENT_NORMAL: "7b",
    rules.RISK_AND_SYMPTOMS: "8",
    rules.SUSPECTED_DEFICIENCY: "8",
}
"""Reason code -> row ("#") of the rules table in docs/rules.md (tests/test_explain.py checks it)."""

LOOKED_FOR: Mapping[str, str] = {
    "neck_pain": "a neck-pain condition (value set neck-pain)",
    "neck_pain_onset": "an onset date on a neck-pain condition",
    "chronic": "chronic neck pain (value set chronic-neck-pain, or onset 12 weeks or more ago)",
    "age_years": "a valid Patient birth date",
    "neuropathic": "neuropathic features (value set neuropathic-features; an answer recorded as absent does not count)",
    "mechanical": "a mechanical cause (value set mechanical-causes)",
    "compressive": "a nerve-root compression (value set compressive-causes)",
    "red_flags": "red flags (value set red-flags)",
    "neurological_red_flags": "myelopathy, cord compression or gait disturbance (value set neurological-red-flags)",
    "peripheral_neuropathy": "a distal polyneuropathy (value set peripheral-neuropathy)",
    "suspected_deficiency": "a provisional/differential/unconfirmed B12 deficiency or a low-B12 finding "
                            "(value sets b12-deficiency, b12-low-finding)",
    "risk_factors": "B12 risk factors (value sets metformin, acid-suppressants, gastric-surgery, "
                    "malabsorption, b12-deficiency-history, vegan-vegetarian-diet, diabetes, alcohol-use-disorder; "
                    "older age; acid suppressants only when long-term)",
    "already_handled": "a confirmed, active B12 deficiency or B12 replacement (value sets b12-deficiency, "
                       "b12-replacement)",
    "b12_results": "final B12 results (value set b12-lab)",
    "mma_results": "final MMA results (value set mma-lab)",
    "active_b12_results": "final active B12 (holotranscobalamin) results (value set active-b12-lab)",
    "pending_results": "registered or preliminary B12, active-B12 or MMA results (tests in progress)",
    "pregnancy": "a current pregnancy (value sets pregnancy, pregnancy-ended)",
    "pending_orders": "an active or on-hold B12/MMA test order no older than the stale-order limit, or one in "
                      "the draft orders (by code, or by the test's name)",
}
"""What each fact searched the record for, said for a person (a new fact falls back to its name)."""

_BOOKKEEPING = frozenset({"patient_id", "today", "unavailable", "skipped_resources", "skipped_references"})
"""PatientFacts fields reported in their own sections, not as facts."""
_EVALUATION_SHOWN = frozenset({"decision", "facts", "cards", "card_kinds", "skipped_resources"})


def plain(value: Any) -> Any:
    """A JSON-ready copy of `value`: dataclasses by field (plus `reference` where defined), dates
    as ISO strings, tuples and lists as lists, sets sorted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        ref = getattr(type(value), "reference", None)
        if isinstance(ref, property):
            out["reference"] = ref.fget(value)
        return out
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "model_dump"):  # pydantic models (cards)
        return value.model_dump(mode="json", exclude_none=True, by_alias=True)
    return value


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (tuple, list, frozenset, set, dict)) and not value)


def explain(evaluation: Evaluation, *, unavailable_wording: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The decision, its reason and rule, each fact with its evidence, what was looked for and not
    found, the data that could not be had and the record entries skipped as invalid.

    `unavailable_wording` maps prefetch keys to words for a person (cards/common.json
    "unavailable_data"); keys without wording are given as they are.
    """
    decision = plain(evaluation.decision)
    reason = evaluation.decision.reason
    decision.update({
        "card": evaluation.decision.kind is not None,
        "rule": RULE_OF_REASON.get(reason),
        "rules_table": RULES_TABLE,
    })
    out: dict[str, Any] = {"decision": decision}
    # The effective reason: the alert policy's ("suppressed", "locked-out", "silent") when it
    # withheld the rules' card (its cause is under "policy", from the loop at the end).
    out["reason"] = evaluation.reason

    facts = evaluation.facts
    found: dict[str, Any] = {}
    not_found: list[dict[str, str]] = []
    if facts is not None:
        for f in dataclasses.fields(facts):
            if f.name in _BOOKKEEPING:
                continue
            value = getattr(facts, f.name)
            if _empty(value):
                not_found.append({"fact": f.name, "looked_for": LOOKED_FOR.get(f.name, f.name.replace("_", " "))})
            else:
                found[f.name] = plain(value)
        out["patient_id"] = facts.patient_id
        out["today"] = facts.today.isoformat()
    out["facts"] = found
    out["not_found"] = not_found
    wording = unavailable_wording or {}
    unavailable = sorted(facts.unavailable) if facts is not None else []
    out["unavailable"] = [{"key": k, "what": wording.get(k, k)} for k in unavailable]
    out["skipped_invalid"] = list(facts.skipped_references) if facts is not None else []
    out["skipped_resources"] = evaluation.skipped_resources
    out["cards"] = [{"uuid": c.uuid, "kind": evaluation.card_kinds.get(c.uuid), "indicator": c.indicator,
                     "summary": c.summary} for c in evaluation.cards]
    for f in dataclasses.fields(evaluation):  # anything the engine adds later (e.g. policy outcomes)
        if f.name not in _EVALUATION_SHOWN:
            out[f.name] = plain(getattr(evaluation, f.name))
    return out
