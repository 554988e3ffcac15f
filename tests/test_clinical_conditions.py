"""Clinical correctness on records shaped the way EHR feeds send them: red flags and the neurology
of B12, weighing the evidence (confirmed vs suspected, abatement, encounter diagnoses, remission,
long-term acid suppression, absent answers, stale orders), medications and orders however they are
coded, and the card itself.

Fixtures mix several codings per concept, text-only entries and local codes next to standard ones;
some start from the HL7 FHIR R4 example resources (tests/fixtures/hl7-r4-examples, CC0), with only
the clinical code swapped for the concept under test, so the surrounding shape is a real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.engine import ClinicalEngine, Evaluation
from cds_service.rules import (
    ACUTE_OR_EXPLAINED, ALREADY_HANDLED, NO_RISK_FACTOR, PENDING_ORDER, RISK_AND_SYMPTOMS, SUSPECTED_DEFICIENCY,
)
from tests.fhir_builders import (
    ICD10CM, LOINC, NOW, PATIENT_ID, RXNORM, SNOMED, VERIFICATION_STATUS, condition, days_before, hook_request,
    medication_request, medication_statement, metformin, neck_pain, observation, record, service_request,
)

EXAMPLES = Path(__file__).resolve().parent / "fixtures" / "hl7-r4-examples"
LOCAL = "http://ehr.example.org/fhir/CodeSystem/orderables"


@pytest.fixture(scope="module")
def engine() -> ClinicalEngine:
    return ClinicalEngine.load(Settings())


def run(engine: ClinicalEngine, *resources: dict[str, Any], draft_orders: list[dict[str, Any]] = (),
        hook: str = "patient-view", settings: Settings | None = None) -> Evaluation:
    eng = engine if settings is None else ClinicalEngine.load(settings)
    request = hook_request(hook, draft_orders=list(draft_orders) if draft_orders else None)
    return eng.evaluate(record(*resources, draft_orders=list(draft_orders)), request, NOW)


def outcome(ev: Evaluation) -> str:
    return ev.decision.kind or ev.decision.reason


def example(name: str, **replace: Any) -> dict[str, Any]:
    """An HL7 R4 example resource, re-pointed at our patient, with top-level fields replaced."""
    res = json.loads((EXAMPLES / f"{name}.json").read_text())
    res.pop("text", None)
    res["subject"] = {"reference": f"Patient/{PATIENT_ID}"}
    for key, value in replace.items():
        if value is None:
            res.pop(key, None)
        else:
            res[key] = value
    return res


def multi(*codings: tuple[str, str, str], text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with several codings (as EHRs send: SNOMED + ICD-10-CM + a local code)."""
    out: dict[str, Any] = {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]}
    if text:
        out["text"] = text
    return out


def cond(concept: dict[str, Any], *, onset_days: int | None = 30, **kw: Any) -> dict[str, Any]:
    res = condition("placeholder", **kw)
    res["code"] = concept
    if onset_days is not None:
        res["onsetDateTime"] = days_before(onset_days).isoformat()
    return res


MYELOPATHY = multi((SNOMED, "202664003", "Cervical myelopathy (disorder)"),
                   (ICD10CM, "G95.9", "Disease of spinal cord, unspecified"),
                   (LOCAL, "DX-4471", "Cervical myelopathy"), text="Cervical myelopathy")
STENOSIS = multi((SNOMED, "83561009", "Spinal stenosis in cervical region (disorder)"),
                 (ICD10CM, "M48.02", "Spinal stenosis, cervical region"), text="C5-6 canal stenosis")
RADICULOPATHY = multi((SNOMED, "54404000", "Cervical radiculopathy (disorder)"),
                      (ICD10CM, "M54.12", "Radiculopathy, cervical region"), text="Right C6 radiculopathy")
SPONDYLOSIS = multi((ICD10CM, "M47.812", "Spondylosis without myelopathy or radiculopathy, cervical region"),
                    (SNOMED, "267970006", "Cervical spondylosis without myelopathy (disorder)"))
POLYNEUROPATHY = multi((ICD10CM, "G62.9", "Polyneuropathy, unspecified"),
                       (SNOMED, "42345000", "Polyneuropathy (disorder)"), text="Peripheral neuropathy, both feet")
PARAESTHESIA = multi((ICD10CM, "R20.2", "Paresthesia of skin"), (SNOMED, "91019004", "Paresthesia (finding)"),
                     text="Tingling right hand")


def acute_neck(**kw: Any) -> dict[str, Any]:
    return neck_pain(onset_days=10, **kw)


# --- red flags and the neurology of B12 ----------------------------------------------------------

def test_myelopathy_with_acute_pain_and_a_compressive_cause_still_gets_a_warning_card(engine) -> None:
    ev = run(engine, acute_neck(), metformin(), cond(MYELOPATHY), cond(STENOSIS))
    assert outcome(ev) == "b12-test" and ev.decision.indicator == "warning"
    card = ev.cards[0]
    assert card.summary.startswith("Red flags: assess urgently and check B12 alongside")
    # red flags first, with the facts a clinician needs: acute or chronic, compressive cause or not
    first = card.detail.split("\n\n**")[0]
    assert "Cervical myelopathy" in first and "alongside" in first
    assert "Neck pain: acute" in first and "Compressive cause documented: C5-6 canal stenosis" in first
    assert "before any routine test" not in card.detail and "before ordering" not in card.detail
    assert card.model().suggestions[0].isRecommended is True


def test_myelopathy_without_a_compressive_cause_says_so(engine) -> None:
    card = run(engine, neck_pain(onset_days=200), metformin(), cond(MYELOPATHY)).cards[0]
    first = card.detail.split("\n\n**")[0]
    assert "Neck pain: chronic" in first and "No compressive cause documented." in first


@pytest.mark.parametrize("finding", [
    observation("394616008", SNOMED, effective=days_before(3)),                        # unsteady gait, as an Observation
    cond(multi((ICD10CM, "R26.81", "Unsteadiness on feet"), text="Unsteady on feet, falls x2")),
    cond(multi((SNOMED, "22325002", "Abnormal gait (finding)"), (ICD10CM, "R26.89", "Other abnormalities of gait and mobility"))),
    observation(code_text="Neuro exam", value_code=(SNOMED, "22325002"), effective=days_before(3)),
])
def test_gait_or_balance_disturbance_never_switches_the_card_off(engine, finding) -> None:
    ev = run(engine, acute_neck(), cond(RADICULOPATHY), medication_request("7646", authored=days_before(800)), finding)
    assert outcome(ev) == "b12-test" and ev.decision.indicator == "warning"
    assert ev.facts.neurological_red_flags


def test_a_red_flag_without_any_risk_factor_gives_no_b12_card(engine) -> None:
    # The B12 question needs a risk factor (NICE NG239); the red flag itself is for urgent assessment.
    assert outcome(run(engine, acute_neck(), cond(MYELOPATHY))) == NO_RISK_FACTOR


def test_radiculopathy_is_a_compressive_explanation_not_a_b12_feature(engine) -> None:
    ev = run(engine, cond(RADICULOPATHY, onset_days=10), metformin())
    assert ev.facts.neck_pain and ev.facts.compressive and not ev.facts.neuropathic
    assert outcome(ev) == ACUTE_OR_EXPLAINED
    # it appears among the documented mechanical causes
    assert any(e.code == "54404000" for e in ev.facts.mechanical)


def test_root_compression_explains_radicular_paraesthesia(engine) -> None:
    assert outcome(run(engine, acute_neck(), cond(RADICULOPATHY), cond(PARAESTHESIA), metformin())) == ACUTE_OR_EXPLAINED


def test_root_compression_does_not_explain_a_distal_polyneuropathy(engine) -> None:
    ev = run(engine, acute_neck(), cond(RADICULOPATHY), cond(POLYNEUROPATHY), metformin())
    assert outcome(ev) == "b12-test" and ev.decision.recommended
    assert "does not explain a distal polyneuropathy" in ev.cards[0].detail


def test_spondylosis_without_radiculopathy_explains_no_neurological_feature(engine) -> None:
    for feature in (PARAESTHESIA, POLYNEUROPATHY):
        ev = run(engine, acute_neck(), cond(SPONDYLOSIS), cond(feature), metformin())
        assert outcome(ev) == "b12-test", feature
        assert not ev.facts.compressive and ev.facts.mechanical


def test_diabetic_polyneuropathy_coded_with_icd_is_a_distal_feature(engine) -> None:
    dpn = cond(multi((ICD10CM, "E11.42", "Type 2 diabetes mellitus with diabetic polyneuropathy"),
                     (SNOMED, "1511000119107", "Peripheral neuropathy due to type 2 diabetes mellitus (disorder)")))
    ev = run(engine, acute_neck(), cond(STENOSIS), dpn, metformin())
    assert outcome(ev) == "b12-test" and ev.facts.peripheral_neuropathy
    assert "diabetes" in [r.key for r in ev.facts.risk_factors]


# --- weighing the evidence: already handled ---------------------------------------------------------

B12_DEFICIENCY = multi((SNOMED, "190634004", "Cobalamin deficiency (disorder)"),
                       (ICD10CM, "D51.9", "Vitamin B12 deficiency anemia, unspecified"), text="B12 deficiency")


@pytest.mark.parametrize("status", ["provisional", "differential", "unconfirmed"])
def test_a_suspected_deficiency_is_a_reason_to_test_not_to_stay_silent(engine, status) -> None:
    ev = run(engine, acute_neck(), cond(B12_DEFICIENCY, verification=status))
    assert not ev.facts.already_handled
    assert (outcome(ev), ev.decision.reason, ev.decision.indicator) == ("b12-test", SUSPECTED_DEFICIENCY, "warning")
    card = ev.cards[0]
    assert "suspected but not confirmed" in card.summary
    assert "B12 deficiency suspected, not confirmed" in card.detail and card.model().suggestions[0].isRecommended


@pytest.mark.parametrize("verification", ["confirmed", None])
def test_a_confirmed_active_deficiency_is_already_handled(engine, verification) -> None:
    assert outcome(run(engine, neck_pain(), metformin(), cond(B12_DEFICIENCY, verification=verification))) == ALREADY_HANDLED


def test_differential_diagnosis_from_the_hl7_example_shape_is_not_handled(engine) -> None:
    # Condition-f204: verificationStatus differential, with a past abatementDateTime: inactive too
    ex = example("Condition-f204", code=B12_DEFICIENCY, abatementDateTime=None,
                 clinicalStatus={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                             "code": "active"}]})
    ev = run(engine, neck_pain(), metformin(), ex)
    assert not ev.facts.already_handled and ev.facts.suspected_deficiency


def test_low_b12_finding_is_not_a_confirmed_diagnosis(engine) -> None:
    finding = cond(multi((SNOMED, "165645009", "Serum vitamin B12 below reference range (finding)")))
    ev = run(engine, acute_neck(), finding)
    assert not ev.facts.already_handled and outcome(ev) == "b12-test"
    assert ev.decision.reason == SUSPECTED_DEFICIENCY


def test_history_of_b12_deficiency_is_a_risk_factor_not_handled(engine) -> None:
    history = cond(multi((SNOMED, "161457000", "History of anemia vitamin B12 deficient (situation)")))
    ev = run(engine, neck_pain(onset_days=200), history)
    assert not ev.facts.already_handled
    assert [r.key for r in ev.facts.risk_factors] == ["b12-deficiency-history"]
    assert outcome(ev) == "b12-test"


def test_a_resolved_deficiency_is_history(engine) -> None:
    resolved = cond(B12_DEFICIENCY, clinical="active")
    resolved["abatementDateTime"] = days_before(700).isoformat()
    ev = run(engine, neck_pain(onset_days=200), resolved)
    assert not ev.facts.already_handled and [r.key for r in ev.facts.risk_factors] == ["b12-deficiency-history"]


@pytest.mark.parametrize("text,handled", [
    ("Folate deficiency", False), ("Deficiency of other specified B group vitamins", False),
    ("Biotin deficiency", False), ("Vitamin B12 deficiency", True), ("Cobalamin deficiency", True),
])
def test_non_specific_e53_8_counts_only_when_its_text_names_b12(engine, text, handled) -> None:
    e538 = cond(multi((ICD10CM, "E538", "Deficiency of other specified B group vitamins")), onset_days=None)
    e538["code"]["text"] = text
    assert bool(run(engine, neck_pain(), metformin(), e538).facts.already_handled) is handled


def test_folate_deficiency_anaemia_is_not_b12_handled(engine) -> None:
    folate = cond(multi((ICD10CM, "D52.9", "Folate deficiency anemia, unspecified"), text="Folate deficiency anaemia"))
    assert outcome(run(engine, neck_pain(), metformin(), folate)) == "b12-test"


# --- abatement, encounter diagnoses, remission ----------------------------------------------------

NECK = multi((SNOMED, "81680005", "Neck pain (finding)"), (ICD10CM, "M54.2", "Cervicalgia"), text="Neck pain")


@pytest.mark.parametrize("name", ["Condition-f201", "Condition-f202", "Condition-f204"])
def test_an_abated_condition_is_not_active_whatever_its_status_says(engine, name) -> None:
    # abatementString (f201), abatementAge (f202), abatementDateTime (f204), status set to active
    ex = example(name, code=NECK, clinicalStatus={"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]})
    ex["verificationStatus"] = {"coding": [{"system": VERIFICATION_STATUS, "code": "confirmed"}]}
    ev = run(engine, ex, metformin())
    assert not ev.facts.neck_pain


@pytest.mark.parametrize("abatement", [{"abatementPeriod": {"start": "2024-01-01", "end": "2024-02-01"}},
                                       {"abatementRange": {"low": {"value": 50, "unit": "a"}}},
                                       {"abatementString": "resolved after physiotherapy"}])
def test_every_abatement_type_ends_the_condition(engine, abatement) -> None:
    res = neck_pain(onset_days=300, clinical=None)
    res.update(abatement)
    assert not run(engine, res, metformin()).facts.neck_pain


def test_a_future_abatement_date_leaves_the_condition_active(engine) -> None:
    res = neck_pain(onset_days=300)
    res["abatementDateTime"] = "2099-01-01"
    assert run(engine, res, metformin()).facts.neck_pain


@pytest.mark.parametrize("recorded_days,counted", [(30, True), (179, True), (400, False)])
def test_encounter_diagnosis_without_status_counts_only_while_recent(engine, recorded_days, counted) -> None:
    ex = example("Condition-stroke", code=NECK, clinicalStatus=None, verificationStatus=None,
                 onsetDateTime=days_before(recorded_days + 100).isoformat(),
                 recordedDate=days_before(recorded_days).isoformat())
    assert bool(run(engine, ex, metformin()).facts.neck_pain) is counted


def test_encounter_diagnosis_window_is_a_setting(engine) -> None:
    ex = example("Condition-stroke", code=NECK, clinicalStatus=None, recordedDate=days_before(300).isoformat())
    assert run(engine, ex, metformin(), settings=Settings(encounter_diagnosis_days=365)).facts.neck_pain


@pytest.mark.parametrize("concept,status,counted", [
    (multi((SNOMED, "38106008", "Crohn's disease of ileum (disorder)"), (ICD10CM, "K50.00", "Crohn's disease of small intestine without complications")), "remission", True),
    (multi((ICD10CM, "K50.90", "Crohn's disease, unspecified, without complications")), "inactive", True),
    (multi((SNOMED, "26629001", "Short bowel syndrome (disorder)")), "resolved", True),
    (multi((ICD10CM, "K29.40", "Chronic atrophic gastritis without bleeding")), "inactive", True),
    (multi((SNOMED, "396331005", "Celiac disease (disorder)"), (ICD10CM, "K90.0", "Celiac disease")), "remission", False),
])
def test_absorption_risks_that_persist_in_remission(engine, concept, status, counted) -> None:
    ev = run(engine, neck_pain(onset_days=200), cond(concept, clinical=status))
    assert ("malabsorption" in [r.key for r in ev.facts.risk_factors]) is counted


# --- codes that do not mean what the card says --------------------------------------------------

@pytest.mark.parametrize("text,counted", [
    ("History of cholecystectomy", False), ("Acquired absence of other specified parts of digestive tract", False),
    ("S/p ileal resection 2012", True), ("Status post partial gastrectomy", True),
])
def test_z90_49_counts_as_gastric_or_ileal_surgery_only_with_supporting_text(engine, text, counted) -> None:
    z = cond(multi((ICD10CM, "Z90.49", "Acquired absence of other specified parts of digestive tract"), text=text))
    ev = run(engine, neck_pain(onset_days=200), z)
    assert ("gastric-surgery" in [r.key for r in ev.facts.risk_factors]) is counted


def test_z98_0_bowel_anastomosis_after_colectomy_is_not_gastric_surgery(engine) -> None:
    z = cond(multi((ICD10CM, "Z98.0", "Intestinal bypass and anastomosis status"),
                   text="Colorectal anastomosis after sigmoid colectomy"))
    assert not run(engine, neck_pain(onset_days=200), z).facts.risk_factors


def test_chronic_pain_code_on_another_condition_does_not_make_neck_pain_chronic(engine) -> None:
    back = cond(multi((ICD10CM, "G89.29", "Other chronic pain"), text="Chronic low back pain"))
    ev = run(engine, acute_neck(), back, metformin())
    assert not ev.facts.chronic and outcome(ev) == ACUTE_OR_EXPLAINED
    same = acute_neck()
    same["code"]["coding"].append({"system": ICD10CM, "code": "G89.29", "display": "Other chronic pain"})
    assert run(engine, same, metformin()).facts.chronic


@pytest.mark.parametrize("concept,neck_relevant", [
    (multi((ICD10CM, "M79.18", "Myalgia, other site"), text="Myalgia of calf"), False),
    (multi((ICD10CM, "M62.838", "Other muscle spasm"), text="Muscle spasm of back"), False),
    (multi((ICD10CM, "M62.838", "Other muscle spasm"), text="Spasm of left trapezius"), True),
    (multi((SNOMED, "43029002", "Abnormal posture (finding)")), False),
    (multi((SNOMED, "43029002", "Abnormal posture (finding)"), text="Forward head posture, cervical"), True),
    (multi((ICD10CM, "M79.12", "Myalgia of auxiliary muscles, head and neck")), True),
])
def test_only_neck_relevant_mechanical_causes_are_listed(engine, concept, neck_relevant) -> None:
    ev = run(engine, neck_pain(onset_days=200), metformin(), cond(concept))
    assert bool(ev.facts.mechanical) is neck_relevant
    detail = ev.cards[0].detail
    assert ("Documented (assess these first)" in detail) is neck_relevant


# --- acid suppressants: long-term only --------------------------------------------------------------

def _risks(ev: Evaluation) -> list[str]:
    return [r.key for r in ev.facts.risk_factors]


def test_a_short_ppi_course_with_a_known_start_does_not_count(engine) -> None:
    ev = run(engine, neck_pain(onset_days=200), medication_request("7646", display="omeprazole", authored=days_before(60)))
    assert outcome(ev) == NO_RISK_FACTOR


def test_a_statement_with_a_recent_start_period_does_not_count(engine) -> None:
    st = medication_statement(text="Pantoprazole 40 mg daily")
    st["effectivePeriod"] = {"start": days_before(90).isoformat()}
    assert outcome(run(engine, neck_pain(onset_days=200), st)) == NO_RISK_FACTOR


def test_a_ppi_taken_for_more_than_a_year_counts(engine) -> None:
    st = medication_statement(text="Nexium 20mg")
    st["effectivePeriod"] = {"start": days_before(500).isoformat()}
    ev = run(engine, neck_pain(onset_days=200), st, medication_request("7646", authored=days_before(20)))
    risk = ev.facts.risk("acid-suppressants")
    assert risk is not None and risk.note is None and outcome(ev) == "b12-test"


@pytest.mark.parametrize("med", [
    medication_statement(text="Omeprazole 20 mg capsule"),                         # no date at all
    {**medication_request("7646", authored=days_before(20)), "priorPrescription": {"reference": "MedicationRequest/old"}},
])
def test_unknown_duration_counts_and_the_card_says_so(engine, med) -> None:
    ev = run(engine, neck_pain(onset_days=200), med)
    assert _risks(ev) == ["acid-suppressants"] and ev.facts.risk("acid-suppressants").note == "duration-unknown"
    assert "no start date recorded" in ev.cards[0].detail


def test_the_long_term_threshold_is_a_setting(engine) -> None:
    med = medication_request("7646", authored=days_before(200))
    assert outcome(run(engine, neck_pain(onset_days=200), med)) == NO_RISK_FACTOR
    assert outcome(run(engine, neck_pain(onset_days=200), med, settings=Settings(acid_suppressant_min_days=180))) == "b12-test"


# --- answers recorded as absent ---------------------------------------------------------------------

def _answer(**value: Any) -> dict[str, Any]:
    obs = observation("91019004", SNOMED, effective=days_before(2))   # paraesthesia asked about
    obs["code"]["coding"].append({"system": ICD10CM, "code": "R20.2", "display": "Paresthesia of skin"})
    obs.update(value)
    return obs


@pytest.mark.parametrize("value", [
    {"valueBoolean": False},
    {"valueString": "No"},
    {"valueString": "denies"},
    {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "373067005"}]}},            # code only, no display
    {"valueCodeableConcept": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0136", "code": "N"}]}},
    {"valueCodeableConcept": {"coding": [{"system": LOINC, "code": "LA32-8"}], "text": "Nein"}},
    {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "272519000"}]}},
    {"interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "NEG"}]}]},
    {"dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "asked-unknown"}]}},
])
def test_a_feature_recorded_as_absent_never_counts(engine, value) -> None:
    ev = run(engine, acute_neck(), metformin(), _answer(**value))
    assert not ev.facts.neuropathic and outcome(ev) == ACUTE_OR_EXPLAINED


@pytest.mark.parametrize("value", [{}, {"valueBoolean": True},
                                   {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "373066001", "display": "Yes"}]}}])
def test_a_feature_recorded_as_present_counts(engine, value) -> None:
    ev = run(engine, acute_neck(), metformin(), _answer(**value))
    assert ev.facts.neuropathic and outcome(ev) == "b12-test"


def test_gait_recorded_as_absent_is_not_a_red_flag(engine) -> None:
    gait = observation("22325002", SNOMED, effective=days_before(1))
    gait["valueCodeableConcept"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0136", "code": "N", "display": "No"}]}
    ev = run(engine, acute_neck(), metformin(), gait)
    assert not ev.facts.red_flags and outcome(ev) == ACUTE_OR_EXPLAINED


# --- stale orders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("days,expected", [(30, PENDING_ORDER), (90, PENDING_ORDER), (120, "b12-test")])
def test_an_old_active_order_is_stale(engine, days, expected) -> None:
    sr = service_request()
    sr["authoredOn"] = days_before(days).isoformat()
    assert outcome(run(engine, neck_pain(onset_days=200), metformin(), condition("91019004"), sr)) == expected


# --- medications however they are coded ---------------------------------------------------------------

def _metformin_by_reference_contained() -> dict[str, Any]:
    # MedicationRequest-medrx0301: a contained Medication referenced by "#id"
    mr = example("MedicationRequest-medrx0301", status="active")
    mr["contained"][0]["code"] = {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0087-6060-05",
                                              "display": "Glucophage 500 mg tablet"}]}
    return mr


def _record_medication() -> tuple[dict[str, Any], dict[str, Any]]:
    # Medication-med0301 shape: NDC product code + an RxNorm ingredient we do not list, display names it
    med = example("Medication-med0301")
    med.pop("subject", None)
    med["id"] = "janumet-1"
    med["code"] = {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0006-0575-61"}], "text": "Janumet 50-1000"}
    med["ingredient"][0]["itemCodeableConcept"] = {"coding": [{"system": RXNORM, "code": "861004",
                                                               "display": "metformin hydrochloride 1000 MG"}]}
    mr = medication_request(status="active")
    del mr["medicationCodeableConcept"]
    mr["medicationReference"] = {"reference": "https://ehr.example.org/fhir/Medication/janumet-1/_history/3"}
    return med, mr


@pytest.mark.parametrize("resources", [
    [medication_request(text="Janumet XR 50 mg/1000 mg")],                       # combination brand, text only
    [medication_request("999999", "urn:oid:2.16.840.1.113883.6.69", display="GLUCOPHAGE 850MG TAB")],  # NDC-like local code
    [medication_request(text="sitagliptin-metformin 50-500 mg tablet")],
    [_metformin_by_reference_contained()],
    list(_record_medication()),
])
def test_metformin_however_it_is_coded(engine, resources) -> None:
    ev = run(engine, neck_pain(onset_days=200), *resources)
    assert _risks(ev) == ["metformin"]


@pytest.mark.parametrize("text", ["Vitamin B-12 1000 mcg tablet", "vit B12 1mg daily", "B12 injection every 3 months",
                                  "Cobalamin 1 mg", "Cytamen 1000 micrograms/ml", "hydroxocobalamin 1mg/ml"])
def test_b12_replacement_spelled_every_common_way_is_already_handled(engine, text) -> None:
    assert outcome(run(engine, neck_pain(), metformin(), medication_statement(text=text))) == ALREADY_HANDLED


def test_a_multivitamin_with_b12_is_not_replacement(engine) -> None:
    ev = run(engine, neck_pain(), metformin(), condition("91019004"),
             medication_statement(text="Multivitamin with vitamin B12 and iron"))
    assert outcome(ev) == "b12-test"


def test_b12_given_by_reference_in_the_record_is_already_handled(engine) -> None:
    med = {"resourceType": "Medication", "id": "b12", "code": {"text": "Vitamin B-12 injection 1000 mcg/mL"}}
    mr = medication_request(status="active")
    del mr["medicationCodeableConcept"]
    mr["medicationReference"] = {"reference": "Medication/b12"}
    assert outcome(run(engine, neck_pain(), metformin(), mr, med)) == ALREADY_HANDLED


def test_a_contained_multi_ingredient_statement_is_read_ingredient_by_ingredient(engine) -> None:
    # MedicationStatement-example001: contained Medication with two ingredients
    st = example("MedicationStatement-example001")
    st["contained"][0]["ingredient"][1]["itemCodeableConcept"] = {
        "coding": [{"system": RXNORM, "code": "7646", "display": "omeprazole"}]}
    st["effectivePeriod"] = {"start": days_before(800).isoformat()}
    st.pop("effectiveDateTime")
    ev = run(engine, neck_pain(onset_days=200), st)
    assert _risks(ev) == ["acid-suppressants"]


# --- orders as EHRs send them -------------------------------------------------------------------------

def _local_order(text: str, display: str | None = None) -> dict[str, Any]:
    sr = {"resourceType": "ServiceRequest", "id": "draft-1", "status": "draft", "intent": "order",
          "subject": {"reference": f"Patient/{PATIENT_ID}"},
          "code": {"coding": [{"system": LOCAL, "code": "LAB1234", **({"display": display} if display else {})}],
                   "text": text}}
    return sr


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
@pytest.mark.parametrize("text,display", [("Vitamin B12 level", None), ("B12 & Folate", "VIT B12/FOLATE SERUM"),
                                          ("Lab order", "Methylmalonic acid, serum"), ("Active B12", None),
                                          ("Vitamin B-12", None)])
def test_a_draft_b12_or_mma_order_with_a_local_code_is_recognised(engine, hook, text, display) -> None:
    ev = run(engine, neck_pain(onset_days=200), metformin(), condition("91019004"),
             draft_orders=[_local_order(text, display)], hook=hook)
    assert outcome(ev) == PENDING_ORDER


def test_an_unrelated_local_order_is_not_a_b12_order(engine) -> None:
    lipid = example("ServiceRequest-lipid", status="draft")
    lipid.pop("contained"), lipid.pop("supportingInfo"), lipid.pop("specimen")
    ev = run(engine, neck_pain(onset_days=200), metformin(), condition("91019004"), draft_orders=[lipid],
             hook="order-select")
    assert outcome(ev) == "b12-test"


def test_an_active_record_order_with_a_local_code_counts_as_pending(engine) -> None:
    sr = _local_order("Vitamin B12, serum")
    sr.update(status="active", authoredOn=days_before(10).isoformat())
    assert outcome(run(engine, neck_pain(onset_days=200), metformin(), sr)) == PENDING_ORDER


# --- the card itself ----------------------------------------------------------------------------------

def test_without_a_listed_symptom_the_card_asks_and_does_not_preselect(engine) -> None:
    ev = run(engine, neck_pain(onset_days=200), metformin())
    card = ev.cards[0]
    assert ev.decision.reason == RISK_AND_SYMPTOMS and ev.decision.recommended is False
    assert card.model().suggestions[0].isRecommended is False
    assert "ask about neurological symptoms" in card.summary
    assert "not pre-selected" in card.detail


def test_with_a_listed_symptom_the_order_is_recommended(engine) -> None:
    card = run(engine, neck_pain(onset_days=200), metformin(), cond(PARAESTHESIA)).cards[0]
    assert card.model().suggestions[0].isRecommended is True
    assert "not pre-selected" not in card.detail


def test_explained_features_alone_do_not_preselect_the_order(engine) -> None:
    ev = run(engine, neck_pain(onset_days=200), metformin(), cond(RADICULOPATHY), cond(PARAESTHESIA))
    assert outcome(ev) == "b12-test" and ev.cards[0].model().suggestions[0].isRecommended is False


def test_mma_card_without_symptoms_is_not_preselected(engine) -> None:
    from tests.fhir_builders import b12_result
    ev = run(engine, neck_pain(onset_days=200), metformin(), b12_result(250, on=days_before(120)))
    assert outcome(ev) == "mma-test" and ev.cards[0].model().suggestions[0].isRecommended is False
    ev = run(engine, neck_pain(onset_days=200), metformin(), cond(POLYNEUROPATHY), b12_result(250, on=days_before(120)))
    assert outcome(ev) == "mma-test" and ev.cards[0].model().suggestions[0].isRecommended is True


def test_red_flag_wording_is_consistent_everywhere() -> None:
    # "assess the red flag urgently, with B12 checked alongside it", never "before"
    cards_dir = Path(Settings().cards_dir)
    texts = {p.name: p.read_text() for p in cards_dir.glob("*.json")}
    common = json.loads(texts["common.json"])
    assert "alongside" in common["red_flags_advice"] and "alongside" in common["headings"]["red_flags"]
    for kind in ("b12-test", "mma-test"):
        summary = json.loads(texts[f"{kind}.json"])["summary"]["red_flags"]
        assert summary.startswith("Red flags: assess urgently") and "alongside" in summary
    for name, text in texts.items():
        assert "before any routine test" not in text, name
    rules_md = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text()
    assert "before any routine test" not in rules_md


def test_low_b12_with_a_red_flag_says_treat_not_check(engine) -> None:
    from tests.fhir_builders import b12_result
    ev = run(engine, acute_neck(), cond(MYELOPATHY), b12_result(120, on=days_before(20)))
    card = ev.cards[0]
    assert outcome(ev) == "low-b12" and card.indicator == "warning"
    assert card.summary.startswith("Red flags: assess urgently") and "do not delay B12 treatment" in card.summary
    first = card.detail.split("\n\n**")[0]
    assert "do not delay B12 treatment" in first and "check B12 alongside" not in card.detail


def test_with_a_red_flag_mechanical_causes_no_longer_come_first(engine) -> None:
    detail = run(engine, acute_neck(), metformin(), cond(MYELOPATHY), cond(STENOSIS)).cards[0].detail
    assert "Mechanical causes first" not in detail and "assess these first" not in detail
    assert "**Mechanical causes (after the red flags)**" in detail


# --- problem-list entries without a standard code ---------------------------------------------------

def _text_only(text: str, local: bool = False, onset_days: int = 10) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": text}
    if local:
        concept["coding"] = [{"system": LOCAL, "code": "PL-1", "display": text}]
    return cond(concept, onset_days=onset_days)


@pytest.mark.parametrize("local", [False, True])
def test_text_only_myelopathy_and_neck_pain_are_read(engine, local) -> None:
    ev = run(engine, _text_only("Neck pain", local), _text_only("Cervical myelopathy - Hoffmann positive", local), metformin())
    assert outcome(ev) == "b12-test" and ev.facts.neurological_red_flags and ev.facts.neck_pain


@pytest.mark.parametrize("text", ["Cervical spondylosis without myelopathy", "No gait disturbance",
                                  "History of myelopathy", "Denies numbness or tingling"])
def test_negated_text_is_not_a_finding(engine, text) -> None:
    ev = run(engine, acute_neck(), metformin(), _text_only(text))
    assert not ev.facts.red_flags and not ev.facts.neuropathic and outcome(ev) == ACUTE_OR_EXPLAINED


def test_text_only_radiculopathy_explains_tingling(engine) -> None:
    ev = run(engine, acute_neck(), metformin(), _text_only("Tingling in right thumb"), _text_only("C6 radiculopathy"))
    assert ev.facts.compressive and ev.facts.neuropathic and outcome(ev) == ACUTE_OR_EXPLAINED


def test_a_standard_code_is_never_re_read_from_its_text(engine) -> None:
    # coded as headache (SNOMED 25064002 is not in any value set); the text mentions neck pain
    headache = cond(multi((SNOMED, "25064002", "Headache (finding)"), text="Headache and neck pain"))
    assert not run(engine, headache, metformin()).facts.neck_pain


def test_text_never_silences_the_card(engine) -> None:
    # "B12 deficiency" typed as text is not a confirmed, coded diagnosis: it does not suppress
    ev = run(engine, neck_pain(onset_days=200), metformin(), condition("91019004"), _text_only("Vitamin B12 deficiency"))
    assert outcome(ev) == "b12-test"


@pytest.mark.parametrize("text,red_flag", [
    ("Hoffmann sign positive bilaterally", True), ("Hyperreflexia both legs, ankle clonus", True),
    ("Babinski negative", False), ("Lhermitte's sign", True), ("Gait disturbance - resolved", False),
])
def test_text_only_cord_compression_signs(engine, text, red_flag) -> None:
    ev = run(engine, acute_neck(), metformin(), _text_only(text))
    assert bool(ev.facts.neurological_red_flags) is red_flag
    assert outcome(ev) == ("b12-test" if red_flag else ACUTE_OR_EXPLAINED)


def test_b_12_spelled_with_a_space_or_hyphen(engine) -> None:
    assert outcome(run(engine, neck_pain(), metformin(), medication_statement(text="B-12 1000 mcg daily"))) == ALREADY_HANDLED
