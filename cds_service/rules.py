"""The decision rules (issue #2), as one pure function of `PatientFacts` and `Settings`.

Rules run in a fixed order and the first that decides wins.  Each rule cites its source; the
clinician-facing table is docs/rules.md.  Sources (full references in clinical-knowledge.md §2):
- NICE NG239 (2024) "Vitamin B12 deficiency in over 16s": test when >= 1 common symptom/sign AND
  >= 1 risk factor; total B12 < 180 ng/L deficient, 180-350 indeterminate (consider MMA), > 350
  deficiency unlikely; no re-testing of people on established replacement.
- BSH 2014 (Devalia et al.): serum cobalamin first line, plasma MMA second line.
- AAFP 2017 (Langan) / 2025 (Patel): risk-factor screening (metformin, PPI/H2RA, gastric/ileal
  surgery, vegan diet, age > 75); 180-350 pg/mL -> MMA.
- ADA Standards of Care / MHRA 2022: B12 in metformin users, especially with neuropathy.
- Re-test interval 56 days: laboratory minimum re-test interval (Leeds THT), a design choice.
- Red flags (NHS CKS neck pain; clinical-knowledge.md section 4): myelopathy, cord compression
  and gait disturbance need urgent assessment; B12 deficiency itself causes myelopathy (subacute
  combined degeneration), so with a risk factor B12 is checked alongside that assessment.
- NICE NG239 active B12 (holotranscobalamin): an allowed initial test; < 25 pmol/L deficient,
  25-70 indeterminate (consider MMA), > 70 unlikely.  Total B12 is unreliable in pregnancy (it
  falls physiologically): active B12 is preferred, and a low total B12 alone is not treated as
  deficiency.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from cds_service.config import Settings
from cds_service.facts import LabResult, PatientFacts
from cds_service.frozen import fast_init

CardKind = Literal["low-b12", "mma-test", "b12-test"]
Band = Literal["low", "indeterminate", "normal"]
Test = Literal["b12", "active-b12", "mma"]

# Machine reason codes.  No-card reasons:
NO_NECK_PAIN = "no-neck-pain"
ALREADY_HANDLED = "already-handled"
NO_RISK_FACTOR = "no-risk-factor"
ACUTE_OR_EXPLAINED = "acute-or-explained"
PENDING_ORDER = "pending-order"
RECENT_TEST = "recent-test"
RECENT_NORMAL = "recent-normal"
MMA_DONE = "mma-done"
RESULT_PENDING = "result-pending"
NO_CARD_REASONS: tuple[str, ...] = (NO_NECK_PAIN, ALREADY_HANDLED, NO_RISK_FACTOR, ACUTE_OR_EXPLAINED,
                                    PENDING_ORDER, RESULT_PENDING, RECENT_TEST, RECENT_NORMAL, MMA_DONE)
# Card reasons (why the card was shown):
LOW_RESULT = "low-result"
INDETERMINATE_RESULT = "indeterminate-result"
RISK_AND_SYMPTOMS = "risk-and-symptoms"
SUSPECTED_DEFICIENCY = "suspected-deficiency"
LOW_TOTAL_IN_PREGNANCY = "low-total-b12-in-pregnancy"
INDETERMINATE_TOTAL_IN_PREGNANCY = "indeterminate-total-b12-in-pregnancy"


@fast_init
@dataclass(frozen=True)
class Decision:
    kind: CardKind | None
    """The card to show, or None."""
    reason: str
    """Machine code: a no-card reason (NO_CARD_REASONS) or why the card is shown."""
    indicator: Literal["info", "warning"] | None = None
    b12_result: LabResult | None = None
    """The latest banded B12 result within the look-back window, if any."""
    b12_band: Band | None = None
    mma_result: LabResult | None = None
    recommended: bool = False
    """Whether the suggested order is pre-selected (CDS Hooks `isRecommended`): only when a NICE
    NG239-listed symptom no documented cause explains, or a suspected deficiency, is recorded.
    Chronic neck pain with a risk factor alone asks about symptoms first."""
    suggest: Test | None = None
    """The test the card suggests (None: no suggestion)."""


def cut_offs(result: LabResult, settings: Settings) -> tuple[float, float]:
    """(low below, normal above) for the result's analyte, in its canonical unit (NICE NG239)."""
    if result.analyte == "active-b12":
        return settings.active_b12_low_below_pmol_l, settings.active_b12_normal_above_pmol_l
    return settings.b12_low_below_ng_l, settings.b12_normal_above_ng_l


def band_b12(result: LabResult, settings: Settings) -> Band | None:
    """NICE NG239 band of a total or active B12 result (cut-offs configurable), None when it
    cannot be interpreted (unreadable, unknown unit, implausible, in progress, or MMA).

    < low cut-off: low; > normal cut-off: normal; otherwise (both limits included, e.g. exactly
    180 or 350 ng/L) indeterminate.  A censored value is banded by the whole range it stands
    for: "<150" is low; ">2000" is normal; "<200" can only be low or indeterminate, so it is
    acted on as indeterminate (never as normal); ">200" could be anything above 200: not banded."""
    if result.pending or result.implausible or result.analyte not in ("b12", "active-b12"):
        return None
    v = result.canonical if result.canonical is not None else (
        result.value_ng_l if result.analyte == "b12" else None)
    if v is None:
        return None
    low, high = cut_offs(result, settings)
    if result.comparator in ("<", "<="):
        # values below v (or up to v): all low, or at worst indeterminate, or possibly normal
        if v <= low if result.comparator == "<" else v < low:
            return "low"
        return "indeterminate" if v <= high else None
    if result.comparator in (">", ">="):
        return "normal" if (v >= high if result.comparator == ">" else v > high) else None
    if v < low:
        return "low"
    if v > high:
        return "normal"
    return "indeterminate"


def _days_ago(on: date, today: date) -> int:
    return (today - on).days


def _b12_tests(facts: PatientFacts) -> list[LabResult]:
    """Total and active B12 results, newest first (both are NICE NG239 initial tests)."""
    if not facts.active_b12_results and len(facts.b12_results) < 2:  # the common case: nothing to sort
        return list(facts.b12_results)
    return sorted(facts.b12_results + facts.active_b12_results, key=lambda r: r.on or date.min, reverse=True)


def latest_banded_b12(facts: PatientFacts, settings: Settings) -> tuple[LabResult, Band] | None:
    """The newest total or active B12 result within `result_lookback_days` that can be banded."""
    for result in _b12_tests(facts):  # newest first
        if result.on is None or _days_ago(result.on, facts.today) > settings.result_lookback_days:
            continue
        band = band_b12(result, settings)
        if band is not None:
            return result, band
    return None


def _is_newest(result: LabResult, facts: PatientFacts) -> bool:
    """No interpretable-or-unreadable (not implausible) B12 result is dated after `result`."""
    return not any(r.on is not None and result.on is not None and r.on > result.on and not r.implausible
                   for r in _b12_tests(facts))


def _result_in_progress(facts: PatientFacts, settings: Settings) -> bool:
    """A registered/preliminary B12, active-B12 or MMA result dated within pending_result_days."""
    return any(r.on is not None and 0 <= _days_ago(r.on, facts.today) <= settings.pending_result_days
               for r in facts.pending_results)


def decide(facts: PatientFacts, settings: Settings) -> Decision:
    """Apply the rules in order (docs/rules.md); the first that decides wins."""
    # Rule 1. Neck pain is the trigger; a confirmed deficiency or active replacement means the
    # question is already answered (NICE NG239: no re-testing on established replacement).  A
    # provisional/differential diagnosis or a low-B12 finding is not "handled" (see rule 3).
    if not facts.neck_pain:
        return Decision(None, NO_NECK_PAIN)
    if facts.already_handled:
        return Decision(None, ALREADY_HANDLED)

    latest = latest_banded_b12(facts, settings)
    result, band = latest if latest else (None, None)
    # NICE NG239: total B12 is unreliable in pregnancy (it falls physiologically); active B12 is
    # the preferred test, and a low total B12 alone is not treated as deficiency.
    pregnant = bool(facts.pregnancy)
    total_in_pregnancy = pregnant and result is not None and result.analyte == "b12"
    first_test: Test = "active-b12" if pregnant else "b12"

    # Rule 2. A low result (total < 180 ng/L or active < 25 pmol/L, NICE NG239; AAFP 2025
    # "diagnostic") in the last year is acted on whatever the risk factors: confirm and treat.
    # No order suggestion.  In pregnancy a low *total* B12 leads to active B12 instead.
    if band == "low" and not total_in_pregnancy:
        return Decision("low-b12", LOW_RESULT, "warning", result, band)
    if band == "low":
        if facts.pending_orders:
            return Decision(None, PENDING_ORDER, b12_result=result, b12_band=band)
        if _result_in_progress(facts, settings):
            return Decision(None, RESULT_PENDING, b12_result=result, b12_band=band)
        return Decision("b12-test", LOW_TOTAL_IN_PREGNANCY, "warning", result, band, recommended=True,
                        suggest="active-b12")

    # Rule 3. NICE NG239 / AAFP 2025: test only with >= 1 risk factor (no population screening).
    # A suspected deficiency recorded by a clinician (provisional/differential diagnosis, low-B12
    # finding) is itself the reason to test: NICE NG239 confirms a suspected deficiency by testing.
    suspected = bool(facts.suspected_deficiency)
    if not facts.risk_factors and not suspected:
        return Decision(None, NO_RISK_FACTOR, b12_result=result, b12_band=band)

    # Rule 4. Timing and explanation.  Acute neck pain is most often mechanical (NHS CKS neck
    # pain); neck pain is not itself a NICE NG239 symptom, so we need chronic pain or a listed
    # neurological symptom that nothing documented explains: a myelopathy/cord-compression/gait
    # red flag (subacute combined degeneration can present so; never switched off by acute pain
    # or a compressive cause), a distal polyneuropathy (a root compression does not explain it),
    # or paraesthesia/numbness without a documented nerve-root compression.
    if not (facts.chronic or facts.unexplained_symptoms or suspected):
        return Decision(None, ACUTE_OR_EXPLAINED, b12_result=result, b12_band=band)

    # Rule 5. A B12/MMA test already ordered (or being ordered in this session): no duplicate.
    if facts.pending_orders:
        return Decision(None, PENDING_ORDER, b12_result=result, b12_band=band)
    # A registered/preliminary result means the test is under way (its value is never banded).
    if _result_in_progress(facts, settings):
        return Decision(None, RESULT_PENDING, b12_result=result, b12_band=band)

    symptomatic = facts.unexplained_symptoms
    warning = symptomatic or bool(facts.neuropathic or facts.red_flags) or suspected
    indicator: Literal["info", "warning"] = "warning" if warning else "info"
    recommended = symptomatic or suspected

    # Rule 6 (indeterminate). The newest B12 result is indeterminate (total 180-350 ng/L or
    # active 25-70 pmol/L): MMA is the second-line test (NICE NG239; BSH 2014; AAFP 2025), even
    # inside the re-test window (that window is for repeating B12, not for the second-line test),
    # unless an MMA result dated on/after it exists.  In pregnancy an indeterminate *total* B12
    # leads to active B12, the preferred test (NICE NG239).
    if band == "indeterminate" and result is not None and result.on is not None and _is_newest(result, facts):
        if total_in_pregnancy:
            return Decision("b12-test", INDETERMINATE_TOTAL_IN_PREGNANCY, indicator, result, band,
                            recommended=recommended, suggest="active-b12")
        mma = next((m for m in facts.mma_results
                    if m.on is not None and m.on >= result.on and not m.implausible), None)
        if mma is not None:
            return Decision(None, MMA_DONE, b12_result=result, b12_band=band, mma_result=mma)
        return Decision("mma-test", INDETERMINATE_RESULT, indicator, result, band, recommended=recommended,
                        suggest="mma")

    # Rule 7. Any B12 result in the last 56 days (lab minimum re-test interval, Leeds THT; a
    # design choice, no guideline interval), readable or not (an implausible value is not a
    # usable test and does not count); in pregnancy only active B12 counts, as a recent total
    # B12 does not answer the question.  Then a normal result within the look-back year (NICE
    # NG239: > 350 ng/L or > 70 pmol/L active, deficiency unlikely; a normal total B12 stays
    # reassuring in pregnancy, where total B12 errs low).
    recent = facts.active_b12_results + (() if pregnant else facts.b12_results)
    if any(r.on is not None and _days_ago(r.on, facts.today) <= settings.recent_test_days and not r.implausible
           for r in recent):
        return Decision(None, RECENT_TEST, b12_result=result, b12_band=band)
    if band == "normal":
        return Decision(None, RECENT_NORMAL, b12_result=result, b12_band=band)

    # Rule 8. Risk factor + (chronic pain or an unexplained neurological symptom), or a suspected
    # deficiency, and no recent result: offer a serum B12 test (NICE NG239 initial test; BSH 2014
    # first line; ADA/MHRA for metformin); in pregnancy, active B12 (NICE NG239).
    reason = SUSPECTED_DEFICIENCY if suspected and not facts.risk_factors else RISK_AND_SYMPTOMS
    return Decision("b12-test", reason, indicator, result, band, recommended=recommended, suggest=first_test)
