"""Display texts for the machine codes the reports count.

Override reasons and risk factors take their wording from the card texts (`cards/common.json`,
which a deployment can replace), so the report says what the clinician saw.  Decision reasons
and facts are report wording for the codes of `rules.py` (docs/rules.md explains each); a code
with no label here (e.g. one added later) is shown as the code itself.
"""

from __future__ import annotations

from typing import Any

CARD_KIND_LABELS = {
    "b12-test": "B12 test suggested",
    "mma-test": "MMA test suggested",
    "low-b12": "Low B12 result",
}

REASON_LABELS = {
    # no card (rules.NO_CARD_REASONS)
    "no-neck-pain": "No neck pain documented",
    "already-handled": "Known B12 deficiency or on B12 replacement",
    "no-risk-factor": "No B12 risk factor",
    "acute-or-explained": "Neck pain acute, with no symptom that a documented cause does not explain",
    "pending-order": "B12 or MMA test already ordered",
    "recent-test": "B12 tested in the last 56 days",
    "recent-normal": "Normal B12 result in the last year",
    "mma-done": "MMA result after the indeterminate B12",
    "suppressed": "Suppressed after earlier feedback",
    # card shown
    "low-result": "Low B12 result in the last year",
    "indeterminate-result": "Indeterminate B12 result in the last year",
    "risk-and-symptoms": "Risk factor with chronic neck pain, neuropathic features or a neurological red flag",
    "suspected-deficiency": "B12 deficiency suspected but not confirmed",
}

FACT_LABELS = {
    "chronic-neck-pain": "Chronic neck pain (12 weeks or more)",
    "neuropathic-features": "Neuropathic features",
    "red-flags": "Red flags",
    "mechanical-causes": "Mechanical cause documented",
    "compressive-causes": "Compressive cause documented",
    "no-risk-factor": "No risk factor (low result alone)",
    "b12-low": "Latest B12 low",
    "b12-indeterminate": "Latest B12 indeterminate",
    "b12-normal": "Latest B12 normal",
}


def kind_label(kind: str) -> str:
    return CARD_KIND_LABELS.get(kind, kind)


def reason_label(code: str) -> str:
    return REASON_LABELS.get(code, code)


def fact_label(code: str) -> str:
    return FACT_LABELS.get(code, code)


def risk_factor_label(key: str, common: dict[str, Any], older_age_years: int) -> str:
    """The card's wording of a risk factor ("age {age}" becomes "age 75 or over")."""
    text = str(common.get("risk_factor_labels", {}).get(key, key))
    return text.replace("{age}", f"{older_age_years} or over")


def override_reason_label(reason: dict[str, Any], common: dict[str, Any]) -> str:
    """An override reason's display text: ours from cards/common.json, else the display the EHR
    sent, else system|code."""
    code = reason.get("code")
    if reason.get("system") == common.get("override_reason_system") and code in common.get("override_reasons", {}):
        return str(common["override_reasons"][code])
    return str(reason.get("display") or f"{reason.get('system')}|{code}")
