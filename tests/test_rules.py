"""Rules 1-8 as a pure function of facts: order, bands, windows, indicators."""

from __future__ import annotations

import dataclasses
from datetime import date

import pytest

from cds_service.config import Settings
from cds_service.facts import Evidence, LabResult, PatientFacts, RiskFactor
from cds_service.rules import (
    ACUTE_OR_EXPLAINED, ALREADY_HANDLED, MMA_DONE, NO_NECK_PAIN, NO_RISK_FACTOR, PENDING_ORDER,
    RECENT_NORMAL, RECENT_TEST, SUSPECTED_DEFICIENCY, band_b12, decide,
)
from tests.fhir_builders import TODAY, days_before

SETTINGS = Settings()


def ev(name: str, on: date | None = None) -> Evidence:
    return Evidence(name, name, "Condition", name, on)


NECK = (ev("neck-pain", days_before(200)),)
METFORMIN = (RiskFactor("metformin", (ev("metformin"),)),)


def b12(ng_l: float | None, days: int, comparator: str | None = None) -> LabResult:
    return LabResult("r", "2132-9", days_before(days), ng_l, "pg/mL", comparator, ng_l)


def mma(days: int) -> LabResult:
    return LabResult("m", "13964-2", days_before(days), 200, "nmol/L")


def facts(**kw) -> PatientFacts:
    """A patient who gets the B12-test card unless a field is overridden."""
    base = PatientFacts(
        patient_id="p1", today=TODAY, age_years=60, neck_pain=NECK, chronic=True,
        neck_pain_onset=days_before(200), neuropathic=(), mechanical=(), compressive=(), red_flags=(),
        risk_factors=METFORMIN, already_handled=(), b12_results=(), mma_results=(), pending_orders=(),
    )
    return dataclasses.replace(base, **kw)


def outcome(f: PatientFacts, settings: Settings = SETTINGS) -> str:
    d = decide(f, settings)
    return d.kind or d.reason


def test_baseline_gets_the_b12_test_card() -> None:
    d = decide(facts(), SETTINGS)
    assert (d.kind, d.indicator) == ("b12-test", "info")


# Rule 1 -----------------------------------------------------------------------------------------

def test_rule1_no_neck_pain() -> None:
    assert outcome(facts(neck_pain=())) == NO_NECK_PAIN


def test_rule1_already_handled_beats_even_a_low_result() -> None:
    assert outcome(facts(already_handled=(ev("b12-deficiency"),), b12_results=(b12(100, 10),))) == ALREADY_HANDLED


# Rule 2 + bands -------------------------------------------------------------------------------

@pytest.mark.parametrize("ng_l,band", [(179, "low"), (179.9, "low"), (180, "indeterminate"),
                                       (350, "indeterminate"), (350.1, "normal"), (351, "normal")])
def test_band_boundaries_179_180_350_351(ng_l: float, band: str) -> None:
    assert band_b12(b12(ng_l, 1), SETTINGS) == band


@pytest.mark.parametrize("comparator,ng_l,band", [("<", 150, "low"), ("<", 180, "low"), ("<=", 180, "indeterminate"),
                                                      ("<", 200, "indeterminate"), ("<", 351, None), (">=", 350, None),
                                                  (">", 2000, "normal"), (">", 300, None)])
def test_censored_values_band_only_when_unambiguous(comparator, ng_l, band) -> None:
    assert band_b12(b12(ng_l, 1, comparator), SETTINGS) == band


def test_unreadable_value_is_not_banded() -> None:
    assert band_b12(b12(None, 1), SETTINGS) is None


def test_cutoffs_are_configuration() -> None:
    s = Settings(b12_low_below_ng_l=200, b12_normal_above_ng_l=300)
    assert band_b12(b12(190, 1), s) == "low" and band_b12(b12(301, 1), s) == "normal"


def test_rule2_low_result_gives_low_card_without_risk_factor_or_timing() -> None:
    d = decide(facts(risk_factors=(), chronic=False, b12_results=(b12(179, 100),)), SETTINGS)
    assert (d.kind, d.indicator, d.b12_band) == ("low-b12", "warning", "low")
    assert d.b12_result.value_ng_l == 179


def test_rule2_uses_the_latest_banded_result() -> None:
    # low 200 days ago, then normal 100 days ago: the latest (normal) decides
    assert outcome(facts(b12_results=(b12(500, 100), b12(150, 200)))) == RECENT_NORMAL
    # the latest is unbanded: the one before it is the latest banded result
    assert outcome(facts(b12_results=(b12(None, 100), b12(150, 200)))) == "low-b12"


@pytest.mark.parametrize("days,kind", [(365, "low-b12"), (366, "b12-test")])
def test_rule2_lookback_window_365_days(days: int, kind: str) -> None:
    assert outcome(facts(b12_results=(b12(100, days),))) == kind


# Rule 3 ---------------------------------------------------------------------------------------

def test_rule3_no_risk_factor() -> None:
    assert outcome(facts(risk_factors=())) == NO_RISK_FACTOR


# Rule 4 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chronic,neuropathic,compressive,expected", [
    (True, False, False, "b12-test"),
    (True, True, True, "b12-test"),            # chronic: a compressive cause does not stop it
    (False, True, False, "b12-test"),          # acute but neuropathic, unexplained
    (False, True, True, ACUTE_OR_EXPLAINED),   # acute, explained by a compressive cause
    (False, False, False, ACUTE_OR_EXPLAINED), # acute, no neuropathic features
])
def test_rule4_timing(chronic, neuropathic, compressive, expected) -> None:
    f = facts(chronic=chronic, neuropathic=(ev("paraesthesia"),) if neuropathic else (),
              compressive=(ev("disc"),) if compressive else ())
    assert outcome(f) == expected


def test_rule4_mechanical_non_compressive_cause_does_not_explain_neuropathic_features() -> None:
    assert outcome(facts(chronic=False, neuropathic=(ev("paraesthesia"),), mechanical=(ev("whiplash"),))) == "b12-test"


# Rule 5 ---------------------------------------------------------------------------------------

def test_rule5_pending_order() -> None:
    assert outcome(facts(pending_orders=(ev("pending-order"),))) == PENDING_ORDER


def test_rule5_pending_order_also_suppresses_mma() -> None:
    assert outcome(facts(pending_orders=(ev("pending-order"),), b12_results=(b12(250, 100),))) == PENDING_ORDER


# Rule 6 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("days,expected", [(0, RECENT_TEST), (56, RECENT_TEST), (57, "b12-test")])
def test_rule6_recent_test_boundary_56_57(days: int, expected: str) -> None:
    # an unreadable result (unit not recognised) is still a test done on its date
    assert outcome(facts(b12_results=(b12(None, days),))) == expected


@pytest.mark.parametrize("days", [0, 30, 56, 57, 200])
def test_indeterminate_b12_leads_to_mma_even_inside_the_retest_window(days: int) -> None:
    # the 56-day window is for repeating B12, not for the second-line test (NICE NG239)
    assert outcome(facts(b12_results=(b12(250, days),))) == "mma-test"


def test_indeterminate_superseded_by_a_newer_unreadable_b12_is_a_recent_test() -> None:
    assert outcome(facts(b12_results=(b12(None, 5), b12(250, 30)))) == RECENT_TEST


def test_rule6_unbanded_recent_result_still_counts_as_a_test() -> None:
    assert outcome(facts(b12_results=(b12(None, 30),))) == RECENT_TEST
    assert outcome(facts(b12_results=(b12(None, 57),))) == "b12-test"


def test_rule6_recent_window_is_configuration() -> None:
    assert outcome(facts(b12_results=(b12(250, 40),)), Settings(recent_test_days=30)) == "mma-test"


@pytest.mark.parametrize("days,expected", [(57, RECENT_NORMAL), (365, RECENT_NORMAL), (366, "b12-test")])
def test_rule6_recent_normal_within_the_year(days: int, expected: str) -> None:
    assert outcome(facts(b12_results=(b12(351, days),))) == expected


# Rule 7 ---------------------------------------------------------------------------------------

def test_rule7_indeterminate_gives_mma_card() -> None:
    d = decide(facts(b12_results=(b12(180, 100),)), SETTINGS)
    assert (d.kind, d.b12_band) == ("mma-test", "indeterminate")


@pytest.mark.parametrize("mma_days,expected", [(100, MMA_DONE), (90, MMA_DONE), (101, "mma-test")])
def test_rule7_mma_on_or_after_the_b12_result(mma_days: int, expected: str) -> None:
    assert outcome(facts(b12_results=(b12(300, 100),), mma_results=(mma(mma_days),))) == expected


# Rule 8 and indicators ------------------------------------------------------------------------

@pytest.mark.parametrize("kind_results", [(), (b12(250, 100),)])
@pytest.mark.parametrize("neuropathic,red,indicator", [(False, False, "info"), (True, False, "warning"),
                                                       (False, True, "warning")])
def test_indicator_warning_with_neuropathic_features_or_red_flags(kind_results, neuropathic, red, indicator) -> None:
    f = facts(b12_results=kind_results, neuropathic=(ev("n"),) if neuropathic else (),
              red_flags=(ev("r"),) if red else ())
    assert decide(f, SETTINGS).indicator == indicator


def test_red_flags_do_not_suppress_the_card() -> None:
    assert outcome(facts(red_flags=(ev("myelopathy"),))) == "b12-test"


def test_no_card_decisions_carry_no_indicator() -> None:
    assert decide(facts(risk_factors=()), SETTINGS).indicator is None


# Red flags, the neurology of B12, suspected deficiency, recommendation -----------------------------

MYELOPATHY = (ev("neurological-red-flags"),)


@pytest.mark.parametrize("compressive", [(), (ev("compressive-causes"),)])
def test_a_neurological_red_flag_is_never_switched_off_by_acute_pain_or_a_compressive_cause(compressive) -> None:
    d = decide(facts(chronic=False, red_flags=MYELOPATHY, neurological_red_flags=MYELOPATHY,
                     compressive=compressive), SETTINGS)
    assert (d.kind, d.indicator, d.recommended) == ("b12-test", "warning", True)


def test_an_other_red_flag_with_acute_pain_does_not_open_the_b12_question() -> None:
    # a fracture or infection is urgent, but not a B12 presentation: the usual timing rule applies
    assert outcome(facts(chronic=False, red_flags=(ev("red-flags"),))) == ACUTE_OR_EXPLAINED


def test_root_compression_explains_sensory_features_but_not_a_distal_polyneuropathy() -> None:
    sensory = (ev("neuropathic-features"),)
    comp = (ev("compressive-causes"),)
    assert outcome(facts(chronic=False, neuropathic=sensory, compressive=comp)) == ACUTE_OR_EXPLAINED
    d = decide(facts(chronic=False, neuropathic=sensory, peripheral_neuropathy=sensory, compressive=comp), SETTINGS)
    assert (d.kind, d.recommended) == ("b12-test", True)


def test_a_suspected_deficiency_is_a_reason_to_test_without_risk_factor_or_chronic_pain() -> None:
    d = decide(facts(risk_factors=(), chronic=False, suspected_deficiency=(ev("b12-deficiency-suspected"),)), SETTINGS)
    assert (d.kind, d.reason, d.indicator, d.recommended) == ("b12-test", SUSPECTED_DEFICIENCY, "warning", True)


def test_a_suspected_deficiency_still_respects_a_recent_normal_result_and_a_pending_order() -> None:
    s = (ev("b12-deficiency-suspected"),)
    assert outcome(facts(risk_factors=(), suspected_deficiency=s, b12_results=(b12(500, 100),))) == RECENT_NORMAL
    assert outcome(facts(risk_factors=(), suspected_deficiency=s, pending_orders=(ev("pending-order"),))) == PENDING_ORDER


def test_chronic_pain_and_a_risk_factor_alone_are_not_recommended() -> None:
    d = decide(facts(), SETTINGS)
    assert (d.kind, d.recommended) == ("b12-test", False)
    assert decide(facts(neuropathic=(ev("neuropathic-features"),)), SETTINGS).recommended is True
    # explained features only: the card still shows (chronic pain) but the order is not pre-selected
    explained = facts(neuropathic=(ev("neuropathic-features"),), compressive=(ev("compressive-causes"),))
    assert decide(explained, SETTINGS).recommended is False
