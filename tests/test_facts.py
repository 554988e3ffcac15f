"""Fact derivation from raw FHIR: counting rules, codings, units, dates, validation."""

from __future__ import annotations

import json
from datetime import date

import pytest

from cds_service.config import Settings
from cds_service.facts import PatientFacts, age_on, derive_facts, parse_date
from cds_service.knowledge import Knowledge
from tests.fhir_builders import (
    ICD10CM, LOINC, NOW, SNOMED, TODAY, b12_result, condition, context, days_before,
    medication_request, medication_statement, metformin, mma_result, neck_pain, observation, patient,
    procedure, record, service_request, years_before,
)

SETTINGS = Settings()


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return Knowledge.load(SETTINGS.valuesets_dir)


@pytest.fixture
def derive(knowledge: Knowledge):
    def run(*resources, draft_orders=(), unavailable=frozenset(), settings: Settings = SETTINGS) -> PatientFacts:
        return derive_facts(record(*resources, draft_orders=draft_orders, unavailable=unavailable),
                            context(), knowledge, settings, NOW)
    return run


def risk_keys(facts: PatientFacts) -> list[str]:
    return [r.key for r in facts.risk_factors]


# --- neck pain and counting rules --------------------------------------------------------------

@pytest.mark.parametrize("system,code", [(SNOMED, "81680005"), (SNOMED, "279029001"), (ICD10CM, "M54.2"),
                                         (SNOMED, "54404000"), (ICD10CM, "M54.12"), (ICD10CM, "M50.121")])
def test_neck_pain_from_snomed_and_icd(derive, system: str, code: str) -> None:
    facts = derive(condition(code, system, id="np"))
    assert [e.reference for e in facts.neck_pain] == ["Condition/np"]


@pytest.mark.parametrize("clinical,counted", [
    ("active", True), ("recurrence", True), ("relapse", True), (None, True),
    ("inactive", False), ("resolved", False), ("remission", False),
])
def test_condition_clinical_status(derive, clinical, counted) -> None:
    assert bool(derive(condition("81680005", clinical=clinical)).neck_pain) is counted


@pytest.mark.parametrize("verification,counted", [
    ("confirmed", True), ("provisional", True), ("unconfirmed", True), (None, True),
    ("refuted", False), ("entered-in-error", False),
])
def test_condition_verification_status(derive, verification, counted) -> None:
    assert bool(derive(condition("M54.2", ICD10CM, verification=verification)).neck_pain) is counted


def test_surgical_history_counts_whatever_its_clinical_status(derive) -> None:
    facts = derive(condition("Z90.3", ICD10CM, clinical="resolved"), condition("396331005", clinical="resolved"))
    assert risk_keys(facts) == ["gastric-surgery"]  # resolved coeliac disease does not count


def test_refuted_surgical_history_does_not_count(derive) -> None:
    assert derive(condition("Z98.84", ICD10CM, verification="refuted")).risk_factors == ()


@pytest.mark.parametrize("status,counted", [("completed", True), ("in-progress", False),
                                            ("not-done", False), ("entered-in-error", False)])
def test_gastric_surgery_from_procedures(derive, status, counted) -> None:
    facts = derive(procedure("430715008", status=status))
    assert ("gastric-surgery" in risk_keys(facts)) is counted


# --- chronicity --------------------------------------------------------------------------------

@pytest.mark.parametrize("days,chronic", [(83, False), (84, True), (85, True)])
def test_chronic_boundary_at_84_days(derive, days: int, chronic: bool) -> None:
    facts = derive(neck_pain(onset_days=days))
    assert facts.chronic is chronic
    assert facts.neck_pain_onset == days_before(days)


def test_chronic_uses_the_earliest_counted_onset(derive) -> None:
    facts = derive(neck_pain(onset_days=10), neck_pain(onset_days=100, system=ICD10CM),
                   neck_pain(onset_days=400, verification="refuted"))
    assert facts.neck_pain_onset == days_before(100) and facts.chronic


def test_onset_period_start_then_recorded_date(derive) -> None:
    assert derive(condition("81680005", onset_period_start=days_before(90))).chronic
    assert derive(condition("81680005", recorded=days_before(90))).chronic
    # onset wins over recordedDate (recorded late for an acute problem)
    assert not derive(condition("81680005", onset=days_before(5), recorded=days_before(200))).chronic


def test_chronic_neck_pain_code_is_chronic_whatever_the_date(derive) -> None:
    facts = derive(condition("1121000119107", onset=days_before(3)))
    assert facts.neck_pain and facts.chronic


def test_icd_chronic_pain_code_with_cervicalgia_is_chronic(derive) -> None:
    both = neck_pain(onset_days=3, system=ICD10CM)
    both["code"]["coding"].append({"system": ICD10CM, "code": "G89.29", "display": "Other chronic pain"})
    assert derive(both).chronic
    # G89.29 on a Condition of its own says "chronic pain" somewhere, not in the neck
    assert not derive(neck_pain(onset_days=3, system=ICD10CM), condition("G89.29", ICD10CM)).chronic


def test_no_dates_means_not_chronic(derive) -> None:
    facts = derive(condition("81680005"))
    assert facts.neck_pain and not facts.chronic and facts.neck_pain_onset is None


# --- neuropathic features, mechanical, red flags -------------------------------------------------

@pytest.mark.parametrize("system,code", [(SNOMED, "91019004"), (SNOMED, "62507009"), (ICD10CM, "R20.2"),
                                         (SNOMED, "44077006"), (ICD10CM, "G62.9"), (SNOMED, "424736006")])
def test_neuropathic_feature_conditions(derive, system, code) -> None:
    assert len(derive(condition(code, system)).neuropathic) == 1


def test_neuropathic_feature_as_observation_code_and_value(derive) -> None:
    by_code = derive(observation("91019004", status="preliminary"))
    by_value = derive(observation(code_text="Symptom", value_code=(SNOMED, "62507009")))
    assert len(by_code.neuropathic) == len(by_value.neuropathic) == 1


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_cancelled_or_erroneous_observations_never_count(derive, status) -> None:
    facts = derive(observation("91019004", status=status),
                   observation(code_text="Diet", value_code=(SNOMED, "1255165006"), status=status))
    assert facts.neuropathic == () and facts.risk_factors == ()


@pytest.mark.parametrize("kw", [{"value_boolean": False}, {"value_string": "No"},
                                {"value_code": ("http://snomed.info/sct", "x")}])
def test_observation_recording_absence_is_not_a_feature(derive, kw) -> None:
    obs = observation("91019004", **kw)
    if "value_code" in kw:
        obs["valueCodeableConcept"] = {"text": "Absent"}
    assert derive(obs).neuropathic == ()


def test_mechanical_and_compressive_causes(derive) -> None:
    facts = derive(condition("39848009", onset=days_before(20)), condition("M50.22", ICD10CM))
    assert {e.label for e in facts.mechanical} == {"Whiplash injury to neck (disorder)",
                                                   "Other cervical disc displacement"}
    assert [e.label for e in facts.compressive] == ["Other cervical disc displacement"]
    assert facts.mechanical[0].on == days_before(20)


@pytest.mark.parametrize("system,code", [(SNOMED, "202664003"), (ICD10CM, "M50.01"), (ICD10CM, "S12.100A"),
                                         (SNOMED, "94222008"), (ICD10CM, "R63.4")])
def test_red_flags(derive, system, code) -> None:
    assert len(derive(condition(code, system)).red_flags) == 1


def test_red_flag_finding_as_observation(derive) -> None:
    assert len(derive(observation("422868009")).red_flags) == 1


# --- risk factors --------------------------------------------------------------------------------

@pytest.mark.parametrize("resource,key", [
    (condition("44054006"), "diabetes"),
    (condition("E11.9", ICD10CM), "diabetes"),
    (condition("396331005"), "malabsorption"),
    (condition("K50.90", ICD10CM), "malabsorption"),
    (condition("K29.40", ICD10CM), "malabsorption"),
    (condition("7200002"), "alcohol-use-disorder"),
    (condition("F10.20", ICD10CM), "alcohol-use-disorder"),
    (condition("765021002"), "vegan-vegetarian-diet"),
    (condition("Z98.84", ICD10CM), "gastric-surgery"),
    (medication_request("6809"), "metformin"),
    (medication_statement("7646"), "acid-suppressants"),
    (medication_request("4278"), "acid-suppressants"),
])
def test_risk_factor_by_code(derive, resource, key) -> None:
    assert risk_keys(derive(resource)) == [key]


def test_diet_as_observation_value(derive) -> None:
    facts = derive(observation(code_text="Diet type", value_code=(SNOMED, "1255165006")))
    (risk,) = facts.risk_factors
    assert risk.key == "vegan-vegetarian-diet" and risk.evidence[0].resource_type == "Observation"


@pytest.mark.parametrize("med", [
    medication_request(text="Metformin 500 mg tablets"),                              # text only
    medication_request("860975", display="24 HR metformin hydrochloride 500 MG ER Tablet"),  # unknown code, display
    medication_request(reference_display="Metformin 850mg"),                          # medicationReference
    medication_statement("local-123", system="urn:local", text="METFORMIN"),
])
def test_text_only_medications_match_by_ingredient_name(derive, med) -> None:
    assert risk_keys(derive(med)) == ["metformin"]


def test_known_code_takes_precedence_over_text(derive) -> None:
    # coded omeprazole with a misleading free text: the code decides
    med = medication_request("7646", text="metformin (see note)")
    assert risk_keys(derive(med)) == ["acid-suppressants"]


@pytest.mark.parametrize("status,counted", [("active", True), ("on-hold", True), ("stopped", False),
                                            ("completed", False), ("entered-in-error", False), ("draft", False)])
def test_medication_status(derive, status, counted) -> None:
    assert bool(derive(metformin(status=status)).risk_factors) is counted


@pytest.mark.parametrize("birth,age,older", [
    (years_before(75), 75, True),                       # 75th birthday today
    (date.fromordinal(years_before(75).toordinal() + 1), 74, False),  # turns 75 tomorrow
    (years_before(74), 74, False),
    (years_before(90), 90, True),
])
def test_age_boundary_74_75(derive, birth, age, older) -> None:
    facts = derive(patient(birth))
    assert facts.age_years == age
    assert ("older-age" in risk_keys(facts)) is older


def test_age_threshold_is_configurable(derive) -> None:
    facts = derive(patient(years_before(66)), settings=Settings(older_age_years=65))
    assert risk_keys(facts) == ["older-age"]


def test_partial_birth_date_never_overstates_age(derive) -> None:
    # born some time in the year 75 years ago: may not be 75 yet, so no age risk factor
    facts = derive(patient(str(TODAY.year - 75)))
    assert facts.age_years == 74


def test_risk_factors_are_ordered_strongest_first(derive) -> None:
    facts = derive(condition("44054006"), metformin(), patient(years_before(80)), medication_request("7646"))
    assert risk_keys(facts) == ["metformin", "acid-suppressants", "older-age", "diabetes"]


# --- already handled -----------------------------------------------------------------------------

@pytest.mark.parametrize("resource", [
    condition("84027009"), condition("D51.0", ICD10CM), condition("D51.9", ICD10CM),
    condition("E53.8", ICD10CM, text="Vitamin B12 deficiency"),
    condition("190634004"), medication_request("309594"), medication_statement(text="Hydroxocobalamin 1 mg/mL"),
    medication_request(text="methylcobalamin 1500 mcg"),
])
def test_already_handled(derive, resource) -> None:
    assert len(derive(resource).already_handled) == 1


def test_resolved_deficiency_and_stopped_replacement_are_not_handling(derive) -> None:
    facts = derive(condition("190634004", clinical="resolved"), medication_request("309594", status="stopped"))
    assert facts.already_handled == ()


# --- B12 / MMA results ---------------------------------------------------------------------------

@pytest.mark.parametrize("value,unit,ucum,loinc,expected", [
    (250, "pg/mL", True, "2132-9", 250.0),
    (250, "ng/L", True, "2132-9", 250.0),
    (200, "pmol/L", True, "14685-2", 271.0),         # 200 x 1.355
    (200, "pmol/l", False, "14685-2", 271.0),        # unit text only, any case
    (200, "pmol/L", True, "2132-9", 271.0),          # the unit wins over the LOINC code's own
    (250, None, False, "2132-9", 250.0),             # no unit: LOINC 2132-9 is mass (pg/mL)
    (200, None, False, "14685-2", 271.0),            # no unit: LOINC 14685-2 is molar (pmol/L)
    (250, "mmol/furlong", True, "2132-9", None),     # unreadable unit: not banded
])
def test_b12_units(derive, value, unit, ucum, loinc, expected) -> None:
    facts = derive(b12_result(value, unit=unit, ucum=ucum, loinc=loinc, on=days_before(10)))
    (result,) = facts.b12_results
    assert result.value_ng_l == expected
    assert result.on == days_before(10)  # still a test done on its date


@pytest.mark.parametrize("status,counted", [("final", True), ("amended", True), ("corrected", True),
                                            ("preliminary", False), ("registered", False),
                                            ("entered-in-error", False), ("cancelled", False)])
def test_lab_status(derive, status, counted) -> None:
    assert bool(derive(b12_result(300, on=days_before(5), status=status)).b12_results) is counted


def test_results_are_newest_first_and_mma_is_separate(derive) -> None:
    facts = derive(b12_result(300, on=days_before(200)), b12_result(400, on=days_before(20)),
                   mma_result(250, on=days_before(10)))
    assert [r.value for r in facts.b12_results] == [400, 300]
    assert [r.loinc for r in facts.mma_results] == ["13964-2"]


def test_non_numeric_value_is_kept_unbanded(derive) -> None:
    obs = b12_result(None, unit=None, on=days_before(3))
    obs["valueString"] = "haemolysed"
    (result,) = derive(obs).b12_results
    assert result.value is None and result.value_ng_l is None


# --- orders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,pending", [("active", True), ("on-hold", True), ("completed", False),
                                            ("revoked", False), ("draft", False)])
def test_pending_service_requests(derive, status, pending) -> None:
    assert bool(derive(service_request("14685-2", status=status)).pending_orders) is pending


def test_mma_order_is_pending_and_unrelated_order_is_not(derive) -> None:
    assert derive(service_request("13964-2")).pending_orders
    assert not derive(service_request("787-2")).pending_orders


def test_draft_orders_count_as_pending(derive) -> None:
    facts = derive(draft_orders=[service_request("2132-9", status="draft")])
    assert len(facts.pending_orders) == 1
    facts = derive(draft_orders=[medication_request("309594", status="draft")])
    assert len(facts.already_handled) == 1


# --- robustness ----------------------------------------------------------------------------------

def test_matched_but_invalid_resource_is_skipped_and_counted(derive) -> None:
    bad = neck_pain()
    del bad["subject"]          # Condition.subject is required in R4
    bad_med = metformin()
    bad_med["intent"] = 42
    facts = derive(bad, bad_med, neck_pain(system=ICD10CM, id="good"))
    assert [e.reference for e in facts.neck_pain] == ["Condition/good"]
    assert facts.risk_factors == ()
    assert facts.skipped_resources == 2


def test_unmatched_invalid_resources_are_not_validated(derive) -> None:
    junk = {"resourceType": "Condition", "code": {"coding": [{"system": SNOMED, "code": "22298006"}]}}
    assert derive(junk).skipped_resources == 0


def test_wrongly_typed_fields_do_not_raise(derive) -> None:
    weird = [
        {"resourceType": "Condition", "code": "81680005"},
        {"resourceType": "Condition", "code": {"coding": {"system": SNOMED, "code": "81680005"}}},
        {"resourceType": "Condition", "code": {"coding": [None, 3, {"system": SNOMED, "code": 81680005}]}},
        {"resourceType": "Condition", "clinicalStatus": [], "verificationStatus": "x",
         "code": {"coding": [{"system": SNOMED, "code": "81680005"}]}, "onsetDateTime": "2024-13-45"},
        {"resourceType": "Observation", "status": ["final"], "code": {"coding": [{"system": LOINC, "code": "2132-9"}]}},
        {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": "2132-9"}]},
         "valueQuantity": {"value": "NaN", "unit": 5}},
        {"resourceType": "MedicationRequest", "status": {"a": 1}, "medicationCodeableConcept": 7},
        {"resourceType": "MedicationRequest", "status": "active", "medicationCodeableConcept": {"text": ["metformin"]}},
        {"resourceType": "Patient", "birthDate": 1950},
    ]
    facts = derive(*weird)
    assert facts.neck_pain == () and facts.risk_factors == () and facts.b12_results == ()


def test_unavailable_keys_are_carried(derive) -> None:
    assert derive(unavailable={"medicationRequests"}).unavailable == {"medicationRequests"}


@pytest.mark.parametrize("text,expected", [
    ("2024-03-05", date(2024, 3, 5)), ("2024-03-05T23:59:00+10:00", date(2024, 3, 5)),
    ("2024-03", date(2024, 3, 1)), ("2024", date(2024, 1, 1)), ("2024-02-30", None), ("soon", None),
    (None, None), (20240305, None),
])
def test_parse_date(text, expected) -> None:
    assert parse_date(text) == expected


def test_partial_dates_can_take_the_last_day() -> None:
    assert parse_date("2024-02", partial_end=True) == date(2024, 2, 29)
    assert parse_date("2023", partial_end=True) == date(2023, 12, 31)


def test_age_on_birthday() -> None:
    assert age_on(date(1950, 6, 15), date(2025, 6, 15)) == 75
    assert age_on(date(1950, 6, 16), date(2025, 6, 15)) == 74


def test_validation_verdicts_are_remembered_by_content_not_identity(monkeypatch):
    """The verdict cache: the same content is validated once; changed content is validated again;
    an invalid resource stays invalid when seen again."""
    from cds_service import facts as facts_module
    from cds_service import fhir_validation

    calls = []
    real = fhir_validation._model_for

    def counting(rtype):
        model = real(rtype)

        class Counting:
            @staticmethod
            def model_validate(resource):
                calls.append(resource.get("id"))
                return model.model_validate(resource)
        return Counting

    monkeypatch.setattr(fhir_validation, "_model_for", counting)
    verdicts = fhir_validation.ValidationVerdicts(16)
    good = condition("81680005", id="np1")
    bad = {**condition("81680005", id="np2"), "onsetDateTime": "not-a-date"}
    for _ in range(3):
        v = facts_module._Validator(verdicts)
        assert v.ok(json.loads(json.dumps(good)), "Condition") is True  # a fresh, equal dict each time
        assert v.ok(json.loads(json.dumps(bad)), "Condition") is False
        assert v.skipped == 1
    assert calls == ["np1", "np2"]
    changed = {**good, "note": [{"text": "edited"}]}
    assert facts_module._Validator(verdicts).ok(changed, "Condition") is True
    assert calls == ["np1", "np2", "np1"]
    off = facts_module._Validator(fhir_validation.ValidationVerdicts(0))
    off.ok(good, "Condition")
    assert calls[-1] == "np1" and len(calls) == 4


def test_validation_verdicts_are_bounded():
    from cds_service.fhir_validation import ValidationVerdicts

    verdicts = ValidationVerdicts(2)
    for i in range(5):
        verdicts.put(bytes([i]), True)
    assert verdicts.get(bytes([0])) is None and verdicts.get(bytes([4])) is True


# --- evidence provenance (what `evaluate` explains) -------------------------------------------

def test_evidence_names_the_coding_that_matched(derive) -> None:
    """The record entry, system and code behind a fact are kept, not only its label."""
    np = condition("M54.2", ICD10CM, id="np-icd")
    np["code"]["coding"].insert(0, {"system": "urn:oid:1.2.3.local", "code": "NECK1", "display": "Neck ache"})
    facts = derive(np, metformin(id="met"))
    [ev] = facts.neck_pain
    assert (ev.reference, ev.system, ev.code) == ("Condition/np-icd", ICD10CM, "M54.2")
    [risk] = facts.risk_factors
    assert risk.evidence[0].reference == "MedicationRequest/met"
    assert risk.evidence[0].code is not None


def test_medication_matched_by_text_has_no_code(derive) -> None:
    facts = derive(neck_pain(), medication_request(None, text="Metformin 500 mg tablets", id="txt"))
    [ev] = facts.risk("metformin").evidence
    assert (ev.system, ev.code, ev.label) == (None, None, "Metformin 500 mg tablets")


def test_skipped_references_name_invalid_entries(derive) -> None:
    bad = condition("81680005", id="broken")
    bad["onsetDateTime"] = "not-a-date"
    facts = derive(neck_pain(id="ok"), bad)
    assert facts.skipped_resources == 1
    assert facts.skipped_references == ("Condition/broken",)
