"""B12, active-B12 and MMA results as EHR feeds really send them.

The records here are built from real FHIR R4 example shapes (HL7 `hl7.fhir.r4.examples` 4.0.1,
CC0, vendored in tests/fixtures/hl7-r4-examples/): a laboratory Observation with a local
identifier, an effectivePeriod, an `issued` instant, interpretation and reference range
(Observation-f001), a panel sending its results as components (Observation-blood-pressure),
extreme decimals in components (Observation-decimal) and a comparator value (Observation-f205).
Their analyte codes are swapped for B12/MMA codes; each concept carries a local code next to
LOINC, as laboratory feeds do.
"""

from __future__ import annotations

import copy
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.engine import ClinicalEngine, Evaluation
from cds_service.knowledge import Knowledge
from cds_service.lab_values import normalize_unit, parse_number, parse_value_string, read_value, to_canonical
from cds_service.rules import RESULT_PENDING
from tests.fhir_builders import (
    LOINC, NOW, days_before, hook_request, metformin, neck_pain, patient, record, years_before,
)

EXAMPLES = Path(__file__).parent / "fixtures" / "hl7-r4-examples"
LOCAL = "https://lab.example-hospital.org/codes"
UCUM = "http://unitsofmeasure.org"


def example(name: str) -> dict[str, Any]:
    res = json.loads((EXAMPLES / f"Observation-{name}.json").read_text(encoding="utf-8"))
    res.pop("text", None)
    res["subject"] = {"reference": "Patient/p1"}
    return res


B12_CODE = {"coding": [{"system": LOCAL, "code": "VB12", "display": "Vitamin B12"},
                       {"system": LOINC, "code": "2132-9",
                        "display": "Cobalamin (Vitamin B12) [Mass/volume] in Serum or Plasma"}],
            "text": "Vitamin B12"}
B12_MOLAR_CODE = {"coding": [{"system": LOCAL, "code": "B12M"},
                             {"system": LOINC, "code": "14685-2"}], "text": "Serum B12"}
MMA_CODE = {"coding": [{"system": LOCAL, "code": "MMA"}, {"system": LOINC, "code": "13964-2"}],
            "text": "Methylmalonic acid"}
ACTIVE_CODE = {"coding": [{"system": LOCAL, "code": "HOLOTC", "display": "Active B12"},
                          {"system": LOINC, "code": "72160-5"}], "text": "Active B12 (holoTC)"}


def lab(code: dict[str, Any], days: int, *, quantity: dict[str, Any] | None = None, string: str | None = None,
        integer: int | None = None, status: str = "final", id: str = "lab1") -> dict[str, Any]:
    """A laboratory result in the shape of the HL7 example f001 (effectivePeriod, issued,
    interpretation and reference range kept), with our analyte code and value."""
    res = example("f001")
    res["id"] = id
    res["code"] = copy.deepcopy(code)
    res["status"] = status
    day = days_before(days).isoformat()
    res["effectivePeriod"] = {"start": f"{day}T09:30:10+01:00"}
    res["issued"] = f"{day}T15:30:10+01:00"
    del res["valueQuantity"]
    res.pop("referenceRange", None)
    if quantity is not None:
        res["valueQuantity"] = quantity
    if string is not None:
        res["valueString"] = string
    if integer is not None:
        res["valueInteger"] = integer
    return res


def qty(value: float | int, unit: str | None = None, code: str | None = None, comparator: str | None = None):
    q: dict[str, Any] = {"value": value}
    if comparator:
        q["comparator"] = comparator
    if unit:
        q["unit"] = unit
    if code:
        q["system"], q["code"] = UCUM, code
    return q


@pytest.fixture(scope="module")
def engine() -> ClinicalEngine:
    return ClinicalEngine.load(Settings())


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return Knowledge.load(Settings().valuesets_dir)


def run(engine: ClinicalEngine, *resources) -> Evaluation:
    return engine.evaluate(record(patient(years_before(60)), neck_pain(), metformin(), *resources),
                           hook_request(), now=NOW)


def outcome(engine: ClinicalEngine, *resources) -> str:
    d = run(engine, *resources).decision
    return d.kind or d.reason


# --- reading values ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,cmp,number,unit", [
    ("<150", "<", "150", None), ("< 150 pg/mL", "<", "150", "pg/mL"), (">2000", ">", "2000", None),
    ("245 ng/L", None, "245", "ng/L"), ("0,36 umol/L", None, "0.36", "umol/L"), ("≤ 100 pmol/L", "<=", "100", "pmol/L"),
    (" 245.0 ", None, "245.0", None), (">= 70 pmol/l", ">=", "70", "pmol/l"),
])
def test_string_values_keep_comparator_number_and_unit(text, cmp, number, unit) -> None:
    v = parse_value_string(text)
    assert v is not None and v.comparator == cmp and v.number == Decimal(number) and v.unit == unit


@pytest.mark.parametrize("text", ["1,355", "150-200", "haemolysed", "see comment", "", "<", "2,000 pg/mL", "1.2.3"])
def test_ambiguous_or_non_numeric_strings_are_not_read(text) -> None:
    assert parse_value_string(text) is None


def test_decimal_comma_only_when_it_cannot_be_a_thousands_separator() -> None:
    assert parse_number("0,36") == Decimal("0.36") and parse_number("245,5") == Decimal("245.5")
    assert parse_number("1,355") is None and parse_number("1,355.5") is None


@pytest.mark.parametrize("unit", ["pmol/L", "PMOL/L", "pmol / l", "pmol/l"])
def test_unit_spellings_are_one_unit(unit) -> None:
    assert normalize_unit(unit) == "pmol/l"


@pytest.mark.parametrize("unit", ["umol/L", "µmol/L", "μmol/L", "mcmol/L", "UMOL/L"])
def test_micro_spellings(unit) -> None:
    assert normalize_unit(unit) == "umol/l"


def test_value_integer_and_quantity_precision_as_reported() -> None:
    assert read_value({"valueInteger": 245}).text == "245"
    assert read_value({"valueQuantity": {"value": 245.0}}).text == "245.0"
    assert read_value({"valueQuantity": {"value": 0.36, "unit": "µmol/L"}}).text == "0.36"
    assert read_value({"valueQuantity": {"value": True}}) is None
    assert read_value({"valueQuantity": {"value": "245"}}) is None  # a JSON string is not a FHIR decimal


# --- unit conversion: every band limit in every unit ------------------------------------------------

# (value, unit) -> expected NICE NG239 band.  Mass units hit 179/180/350/351 ng/L exactly; molar
# units use NICE's own pmol/L limits (< 133 low, 133-258 indeterminate, > 258 normal): 132 pmol/L
# is 178.9 ng/L, 133 is 180.2, 258 is 349.6, 259 is 350.9.
BOUNDARIES = [
    (179, "ng/L", "low"), (180, "ng/L", "indeterminate"), (350, "ng/L", "indeterminate"), (351, "ng/L", "normal"),
    (179, "pg/mL", "low"), (180, "pg/mL", "indeterminate"), (350, "pg/mL", "indeterminate"), (351, "pg/mL", "normal"),
    (0.179, "ng/mL", "low"), (0.18, "ng/mL", "indeterminate"), (0.35, "ng/mL", "indeterminate"), (0.351, "ng/mL", "normal"),
    (0.179, "ug/L", "low"), (0.18, "µg/L", "indeterminate"), (0.35, "mcg/L", "indeterminate"), (0.351, "ug/L", "normal"),
    (132, "pmol/L", "low"), (133, "pmol/L", "indeterminate"), (258, "pmol/L", "indeterminate"), (259, "pmol/L", "normal"),
    (0.132, "nmol/L", "low"), (0.133, "nmol/L", "indeterminate"), (0.258, "nmol/L", "indeterminate"), (0.259, "nmol/L", "normal"),
]
BAND_TO_OUTCOME = {"low": "low-b12", "indeterminate": "mma-test", "normal": "recent-normal"}


@pytest.mark.parametrize("value,unit,band", BOUNDARIES)
def test_band_limits_in_every_unit_as_ucum_code(engine, value, unit, band) -> None:
    code = B12_MOLAR_CODE if "mol" in unit else B12_CODE
    assert outcome(engine, lab(code, 100, quantity=qty(value, code=unit))) == BAND_TO_OUTCOME[band]


@pytest.mark.parametrize("value,unit,band", BOUNDARIES)
def test_band_limits_in_every_unit_as_text_only(engine, value, unit, band) -> None:
    # unit text only (no UCUM code), and as a string value with the unit in it
    assert outcome(engine, lab(B12_CODE, 100, quantity=qty(value, unit=unit.upper()))) == BAND_TO_OUTCOME[band]
    assert outcome(engine, lab(B12_CODE, 100, string=f"{value} {unit}")) == BAND_TO_OUTCOME[band]


@pytest.mark.parametrize("string,expected", [
    ("<150 pg/mL", "low-b12"), ("< 100 pmol/L", "low-b12"), ("<180", "low-b12"),
    ("<200 ng/L", "mma-test"),          # low or indeterminate: never normal, acted on as indeterminate
    (">2000", "recent-normal"), ("> 259 pmol/L", "recent-normal"),
    ("> 258 pmol/L", "b12-test"),       # > 349.6 ng/L: could still be indeterminate
    (">200 pg/mL", "b12-test"),         # could be anything above 200: not banded, older than 56 days
])
def test_comparators_at_the_bands(engine, string, expected) -> None:
    assert outcome(engine, lab(B12_CODE, 100, string=string)) == expected


def test_value_integer_is_read(engine) -> None:
    assert outcome(engine, lab(B12_CODE, 100, integer=150)) == "low-b12"


def test_conversion_factors_come_from_the_value_set(knowledge) -> None:
    units = knowledge.lab_units("b12-lab")
    v = parse_value_string("100 pmol/L")
    assert to_canonical(v, units) == Decimal("135.5")
    assert knowledge.lab_units("mma-lab").factors["umol/l"] == Decimal(1000)


# --- panels, implausible values, results in progress -----------------------------------------------

def panel(*components: dict[str, Any], status: str = "final", days: int = 100) -> dict[str, Any]:
    """A "B12 and folate" panel in the shape of the HL7 blood-pressure example: a panel code the
    service does not know, the results in Observation.component."""
    res = example("blood-pressure")
    res["id"] = "panel1"
    res["status"] = status
    res["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "laboratory"}]}]
    res["code"] = {"coding": [{"system": LOCAL, "code": "B12FOL", "display": "B12 and folate"}], "text": "B12/Folate"}
    res["effectiveDateTime"] = days_before(days).isoformat()
    res.pop("meta", None)
    res.pop("bodySite", None)
    res.pop("interpretation", None)
    res["component"] = list(components)
    return res


FOLATE = {"code": {"coding": [{"system": LOCAL, "code": "FOL"}], "text": "Folate"},
          "valueQuantity": qty(3.2, "ug/L", "ug/L")}


def test_panel_component_results_are_read(engine) -> None:
    ev = run(engine, panel(FOLATE, {"code": B12_CODE, "valueQuantity": qty(150, "pg/mL", "pg/mL")}))
    assert ev.decision.kind == "low-b12"
    assert ev.facts.b12_results[0].resource_id == "panel1"
    assert "150 pg/mL" in ev.cards[0].summary


def test_panel_with_indeterminate_b12_and_mma_component(engine) -> None:
    p = panel({"code": B12_CODE, "valueString": "245 ng/L"}, {"code": MMA_CODE, "valueQuantity": qty(0.36, "µmol/L")})
    ev = run(engine, p)
    assert ev.decision.reason == "mma-done"  # the MMA sent in the same panel counts as done
    assert ev.facts.mma_results[0].canonical == pytest.approx(360)


def test_extreme_decimals_are_not_interpreted_and_logged_without_values(engine, caplog) -> None:
    # HL7 Observation-decimal: 1.0, 1e-22, 1e18, 1e-245, -1e245 with a B12 code on each component
    res = example("decimal")
    for comp in res["component"]:
        comp["code"] = copy.deepcopy(B12_CODE)
        comp["valueQuantity"]["unit"] = "pg/mL"
    res["effectiveDateTime"] = days_before(100).isoformat()
    with caplog.at_level(logging.WARNING, logger="cds_service.facts"):
        ev = run(engine, res)
    assert all(r.implausible for r in ev.facts.b12_results)
    assert ev.decision.kind == "b12-test"  # no low-B12 card from a nonsense value
    events = [r for r in caplog.records if getattr(r, "event", None) == "implausible_lab_value"]
    assert len(events) == len(res["component"])
    for r in events:
        assert "1e" not in r.getMessage().lower() and getattr(r, "detail") == "b12"


@pytest.mark.parametrize("value,unit", [(0, "pg/mL"), (-5, "pg/mL"), (5, "pg/mL"), (250000, "ng/L"), (0.0001, "ng/mL")])
def test_implausible_values_are_never_banded_and_do_not_block_a_test(engine, value, unit) -> None:
    ev = run(engine, lab(B12_CODE, 20, quantity=qty(value, unit, unit)))
    assert ev.decision.kind == "b12-test"  # not low-B12, and not "recent test" either
    assert "outside the plausible range" in ev.cards[0].detail


@pytest.mark.parametrize("status", ["preliminary", "registered"])
def test_recent_result_in_progress_means_no_new_suggestion(engine, status) -> None:
    assert outcome(engine, lab(B12_CODE, 3, quantity=qty(100, "pg/mL", "pg/mL"), status=status)) == RESULT_PENDING
    assert outcome(engine, lab(MMA_CODE, 3, quantity=qty(300, "nmol/L"), status=status),
                   lab(B12_CODE, 100, quantity=qty(250, "pg/mL"))) == RESULT_PENDING


def test_preliminary_value_is_never_banded(engine) -> None:
    ev = run(engine, lab(B12_CODE, 3, string="<100 pg/mL", status="preliminary"))
    assert ev.decision.kind is None and ev.decision.b12_band is None
    assert ev.facts.pending_results and not ev.facts.b12_results


def test_old_result_in_progress_is_stale(engine) -> None:
    assert outcome(engine, lab(B12_CODE, 45, quantity=qty(100, "pg/mL"), status="preliminary")) == "b12-test"


def test_indeterminate_b12_leads_to_mma_inside_the_retest_window(engine) -> None:
    ev = run(engine, lab(B12_CODE, 10, quantity=qty(245, "pg/mL", "pg/mL")))
    assert ev.decision.kind == "mma-test"


# --- active B12 (holotranscobalamin, LOINC 72160-5) ------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (24, "low-b12"), (25, "mma-test"), (70, "mma-test"), (71, "recent-normal"), (">70", "recent-normal"), ("<25", "low-b12"),
])
def test_active_b12_bands_nice(engine, value, expected) -> None:
    res = lab(ACTIVE_CODE, 100, string=f"{value} pmol/L") if isinstance(value, str) else \
        lab(ACTIVE_CODE, 100, quantity=qty(value, "pmol/L", "pmol/L"))
    assert outcome(engine, res) == expected


def test_low_active_b12_card_shows_pmol_l(engine) -> None:
    ev = run(engine, lab(ACTIVE_CODE, 30, quantity=qty(18, "pmol/L", "pmol/L")))
    card = ev.cards[0]
    assert "low active B12: 18 pmol/L on" in card.summary
    assert "Active B12 18 pmol/L on" in card.detail and "low (< 25 pmol/L)" in card.detail


def test_recent_active_b12_is_a_recent_test(engine) -> None:
    assert outcome(engine, lab(ACTIVE_CODE, 20, string="55 pmol/L"),
                   lab(B12_CODE, 200, quantity=qty(400, "pg/mL"))) == "mma-test"
    assert outcome(engine, lab(ACTIVE_CODE, 20, quantity=qty(90, "pmol/L"))) == "recent-test"


# --- values shown as reported --------------------------------------------------------------------

@pytest.mark.parametrize("resource,shown", [
    (lab(B12_MOLAR_CODE, 30, string="< 100 pmol/L"), "<100 pmol/L (<136 ng/L)"),
    (lab(B12_CODE, 30, string="<150 pg/mL"), "<150 pg/mL"),
    (lab(B12_CODE, 30, quantity=qty(150.0, "pg/mL", "pg/mL")), "150.0 pg/mL"),
    (lab(B12_CODE, 30, quantity=qty(0.15, "ng/mL", "ng/mL")), "0.15 ng/mL (150 ng/L)"),
    (lab(B12_MOLAR_CODE, 30, quantity=qty(110, "pmol/l", "pmol/L")), "110 pmol/l (149 ng/L)"),
])
def test_low_values_are_shown_as_the_laboratory_reported_them(engine, resource, shown) -> None:
    card = run(engine, resource).cards[0]
    assert shown in card.summary and shown in card.detail


def test_mma_precision_and_unit_are_kept(engine) -> None:
    ev = run(engine, lab(B12_CODE, 100, quantity=qty(245, "pg/mL")),
             lab(MMA_CODE, 120, quantity=qty(0.36, "µmol/L", "umol/L"), id="mma1"))
    assert ev.decision.kind == "mma-test"  # the MMA predates the B12: not "done"
    assert "MMA 0.36 µmol/L (360 nmol/L) on" in ev.cards[0].detail
    assert "B12 245 pg/mL on" in ev.cards[0].detail


def test_record_unit_text_cannot_inject_markup(engine) -> None:
    ev = run(engine, lab(B12_CODE, 100, quantity=qty(150, "pg/mL[x](https://evil)")))
    detail = ev.cards[0].detail
    assert "B12 150 " in detail and "](" not in detail and "://" not in detail


# --- pregnancy (NICE NG239: total B12 unreliable; active B12 preferred) -----------------------------

ICD = "http://hl7.org/fhir/sid/icd-10-cm"
SCT = "http://snomed.info/sct"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"


def pregnancy_condition(days: int = 100, *, clinical: str | None = "active", **extra: Any) -> dict[str, Any]:
    """A pregnancy on the problem list as EHRs code it: ICD-10-CM and SNOMED side by side."""
    res: dict[str, Any] = {
        "resourceType": "Condition", "id": "preg1", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": ICD, "code": "Z3492", "display": "Encounter for supervision of normal pregnancy, unspecified, second trimester"},
                            {"system": SCT, "code": "77386006", "display": "Pregnant"}], "text": "Pregnant"},
        "onsetDateTime": days_before(days).isoformat()}
    if clinical:
        res["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": clinical}]}
    res.update(extra)
    return res


def pregnancy_status(answer: tuple[str, str, str], days: int = 10, id: str = "ps1") -> dict[str, Any]:
    """An IPS pregnancy-status Observation (LOINC 82810-3) with its coded answer."""
    system, code, display = answer
    return {"resourceType": "Observation", "id": id, "status": "final", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": LOINC, "code": "82810-3", "display": "Pregnancy status"}]},
            "effectiveDateTime": days_before(days).isoformat(),
            "valueCodeableConcept": {"coding": [{"system": system, "code": code, "display": display}], "text": display}}


PREGNANT_LOINC = (LOINC, "LA15173-0", "Pregnant")
PREGNANT_SCT = (SCT, "77386006", "Pregnant")
NOT_PREGNANT = (LOINC, "LA26683-5", "Not pregnant")


def test_pregnancy_suggests_active_b12_and_says_why(engine) -> None:
    ev = run(engine, pregnancy_condition())
    card = ev.cards[0]
    assert ev.decision.suggest == "active-b12"
    order = card.model().suggestions[0].actions[0].resource
    assert order["code"]["coding"][0]["code"] == "72160-5"
    assert "active B12" in card.summary and "Pregnant" in card.summary
    assert "unreliable" in card.detail and "holotranscobalamin" in card.detail


@pytest.mark.parametrize("answer", [PREGNANT_LOINC, PREGNANT_SCT])
def test_pregnancy_status_observation_counts(engine, answer) -> None:
    assert run(engine, pregnancy_status(answer)).decision.suggest == "active-b12"


def test_low_total_b12_in_pregnancy_never_says_treat(engine) -> None:
    ev = run(engine, pregnancy_condition(), lab(B12_CODE, 30, quantity=qty(150, "pg/mL", "pg/mL")))
    card = ev.cards[0]
    assert ev.decision.kind == "b12-test" and ev.decision.reason == "low-total-b12-in-pregnancy"
    assert card.indicator == "warning"
    for text in (card.summary.lower(), card.detail.lower()):
        assert "treat per" not in text and "replacement" not in text and "confirm deficiency and treat" not in text
    assert "treat" not in card.summary.lower()
    assert "needs confirming with active B12" in card.detail
    assert "150 pg/mL" in card.summary and "not diagnostic in pregnancy" in card.summary
    assert card.model().suggestions[0].actions[0].resource["code"]["coding"][0]["code"] == "72160-5"


def test_low_total_b12_in_pregnancy_needs_no_risk_factor(engine) -> None:
    ev = engine.evaluate(record(patient(years_before(30)), neck_pain(), pregnancy_condition(),
                                lab(B12_CODE, 30, string="<150 pg/mL")), hook_request(), now=NOW)
    assert ev.decision.reason == "low-total-b12-in-pregnancy"


def test_indeterminate_total_in_pregnancy_leads_to_active_b12(engine) -> None:
    ev = run(engine, pregnancy_condition(), lab(B12_CODE, 30, quantity=qty(250, "pg/mL")))
    assert ev.decision.reason == "indeterminate-total-b12-in-pregnancy" and ev.decision.suggest == "active-b12"


def test_low_active_b12_in_pregnancy_is_a_low_b12_card(engine) -> None:
    ev = run(engine, pregnancy_condition(), lab(ACTIVE_CODE, 30, quantity=qty(20, "pmol/L")))
    assert ev.decision.kind == "low-b12"
    assert "about 1 month in pregnancy" in ev.cards[0].detail


def test_recent_active_b12_in_pregnancy_is_a_recent_test_but_total_is_not(engine) -> None:
    assert outcome(engine, pregnancy_condition(), lab(ACTIVE_CODE, 20, quantity=qty(90, "pmol/L"))) == "recent-test"
    ev = run(engine, pregnancy_condition(), lab(B12_CODE, 20, quantity=qty(250, "pg/mL", "pg/mL")))
    assert ev.decision.suggest == "active-b12"


@pytest.mark.parametrize("ended", [
    pregnancy_condition(100, abatementDateTime=days_before(20).isoformat()),
    pregnancy_condition(100, abatementString="delivered"),
    pregnancy_condition(100, clinical="resolved"),
    pregnancy_condition(100, clinical="inactive"),
    pregnancy_condition(400),                               # older than 42 weeks, still "active"
])
def test_pregnancy_that_has_ended_does_not_count(engine, ended) -> None:
    ev = run(engine, ended)
    assert ev.facts.pregnancy == () and ev.decision.suggest == "b12"


def test_delivery_or_not_pregnant_after_the_pregnancy_record_ends_it(engine) -> None:
    delivery = {"resourceType": "Condition", "id": "deliv", "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
                "code": {"coding": [{"system": ICD, "code": "Z37.0", "display": "Single live birth"}]},
                "onsetDateTime": days_before(10).isoformat()}
    assert run(engine, pregnancy_condition(200), delivery).facts.pregnancy == ()
    assert run(engine, pregnancy_status(PREGNANT_LOINC, 100), pregnancy_status(NOT_PREGNANT, 5, "ps2")).facts.pregnancy == ()
    # a "not pregnant" answer *before* the pregnancy record does not end it
    assert run(engine, pregnancy_status(NOT_PREGNANT, 150, "ps2"), pregnancy_status(PREGNANT_LOINC, 100)).facts.pregnancy


def test_pregnancy_observation_recorded_as_absent_does_not_count(engine) -> None:
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
           "code": {"coding": [{"system": SCT, "code": "77386006", "display": "Pregnant"}]},
           "effectiveDateTime": days_before(5).isoformat(), "valueBoolean": False}
    assert run(engine, obs).facts.pregnancy == ()


def test_censored_low_or_indeterminate_names_its_own_bound(engine) -> None:
    detail = run(engine, lab(B12_CODE, 100, string="<200 ng/L")).cards[0].detail
    assert "B12 <200 ng/L on" in detail and "low or indeterminate (below 200 ng/L)" in detail


def test_an_implausible_recent_value_is_not_called_a_usable_result(engine) -> None:
    detail = run(engine, lab(B12_CODE, 20, quantity=qty(5, "pg/mL", "pg/mL"))).cards[0].detail
    assert "No B12 result from the last 56 days that can be interpreted" in detail


MYELOPATHY = {"resourceType": "Condition", "id": "rf1", "subject": {"reference": "Patient/p1"},
              "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
              "code": {"coding": [{"system": ICD, "code": "M47.12",
                                   "display": "Other spondylosis with myelopathy, cervical region"}]},
              "onsetDateTime": days_before(20).isoformat()}


def test_red_flags_lead_the_pregnancy_low_total_summary_without_treat(engine) -> None:
    card = run(engine, pregnancy_condition(), MYELOPATHY, lab(B12_CODE, 30, string="<150 pg/mL")).cards[0]
    assert card.summary.startswith("Red flags: assess urgently; pregnant, low total B12 <150 pg/mL")
    assert "treat" not in card.summary.lower() and len(card.summary) < 140


def test_red_flags_with_a_low_active_b12(engine) -> None:
    card = run(engine, MYELOPATHY, lab(ACTIVE_CODE, 30, quantity=qty(18, "pmol/L", "pmol/L"))).cards[0]
    assert card.summary.startswith("Red flags: assess urgently; neck pain with low active B12 18 pmol/L")
