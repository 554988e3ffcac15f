"""The fact derivation answers exactly what it answered before its per-call cost work (issue #16):
`tests/reference_facts.py`, the derivation as it was, is the oracle.  Records are EHR-shaped
patients (tests/ehr_shapes.py), then perturbed where the fast paths read (dates in every FHIR
form and malformed ones, statuses, abatements, values, references), mixed with junk resources;
both derivations must give equal `PatientFacts` (compared by repr, so a NaN value compares too),
or both raise the same error."""

from __future__ import annotations

import copy
from datetime import date, datetime, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from cds_service import facts
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.protocol import HookContext
from cds_service.record import PatientRecord
from tests import ehr_shapes, reference_facts
from tests.test_engine_properties import fhir_resource
from tests.test_hook_fuzz import json_values, resources as junk_resources

ENGINE = ClinicalEngine.load(Settings())
OTHER = Settings(chronic_days=30, encounter_diagnosis_days=10, older_age_years=60, pending_order_max_days=5,
                 acid_suppressant_min_days=30, pregnancy_days=100)
RUN = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

DATES = ["2024-01-02", "2024-01-02T10:30:00Z", "2024-01-02T23:59:59+05:00", "2024-01-02T00:00:00.123-11:00",
         "2025-06-15", "2025-06-16", "2025-06-14T12:00:00Z", "2030-01-01", "1900-01-01", "2024", "2024-05",
         "2024-12", "2023-02", "2024-02-29", "2023-02-29", "2024-13-01", "2024-00-10", "2024-01-32",
         " 2024-01-02", "2024-01-02 ", "2024-1-2", "20240102", "2024/01/02", "2024-01-0x", "T12:00", "", " ",
         "\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0662", "2024-0\u00b2-01", "2024-01-02\u00e9",
         "9999-12-31", "0000-01-01", "0001-01-01", "2024-W01-1", "2024-001", "+2024-01-02", None, 20240102,
         True, ["2024-01-02"], {"start": "2024-01-02"}]
DATE_KEYS = ["onsetDateTime", "recordedDate", "abatementDateTime", "effectiveDateTime", "issued",
             "effectiveInstant", "authoredOn", "dateAsserted", "performedDateTime", "occurrenceDateTime",
             "birthDate"]
PERIOD_KEYS = ["onsetPeriod", "abatementPeriod", "effectivePeriod", "performedPeriod", "occurrencePeriod"]
STATUSES = ["active", "final", "amended", "corrected", "preliminary", "registered", "partial", "completed",
            "on-hold", "entered-in-error", "cancelled", "draft", "stopped", "revoked", "unknown", "", " ", None, 1]
STATUS_CODES = ["active", "recurrence", "relapse", "inactive", "remission", "resolved", "confirmed",
                "provisional", "differential", "unconfirmed", "refuted", "entered-in-error", "", " "]
ANY = st.one_of(st.sampled_from(DATES), json_values)


def _status_concept(draw: Any) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    codes = draw(st.lists(st.sampled_from(STATUS_CODES), max_size=2))
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": c}
                       for c in codes]}


@st.composite
def perturbed(draw: Any, resource: Any) -> Any:
    """A copy of `resource` with a few of the fields the derivation reads changed."""
    if type(resource) is not dict:
        return resource
    res = copy.deepcopy(resource)
    for _ in range(draw(st.integers(0, 5))):
        what = draw(st.integers(0, 10))
        if what == 10:
            res[draw(st.sampled_from(facts.ABATEMENT_KEYS))] = draw(st.one_of(
                st.sampled_from([*DATES[:12], True, False, None, "resolved", 5, {}]),
                st.fixed_dictionaries({}, optional={"start": st.sampled_from(DATES), "end": st.sampled_from(DATES)})))
        elif what <= 2:
            res[draw(st.sampled_from(DATE_KEYS))] = draw(st.sampled_from(DATES))
        elif what == 3:
            res[draw(st.sampled_from(PERIOD_KEYS))] = draw(st.one_of(
                st.fixed_dictionaries({}, optional={"start": ANY, "end": ANY}), json_values))
        elif what == 4:
            res["status"] = draw(st.sampled_from(STATUSES))
        elif what == 5:
            res[draw(st.sampled_from(["clinicalStatus", "verificationStatus"]))] = _status_concept(draw)
        elif what == 6:
            res[draw(st.sampled_from(["abatementAge", "abatementString", "abatementBoolean", "abatementRange",
                                      "priorPrescription", "dataAbsentReason"]))] = draw(json_values)
        elif what == 7:
            res["valueQuantity"] = draw(st.fixed_dictionaries({}, optional={
                "value": st.one_of(st.floats(allow_nan=True), st.integers(-10, 10 ** 6), st.text(max_size=5)),
                "unit": st.sampled_from(["pg/mL", "pmol/L", "ng/L", "nmol/L", "umol/L", "", "?", None]),
                "comparator": st.sampled_from(["<", "<=", ">", ">=", "=", None])}))
        elif what == 8:
            res["category"] = draw(st.one_of(json_values, st.just([{"coding": [{
                "system": draw(st.sampled_from([facts.CONDITION_CATEGORY, None, "urn:x"])),
                "code": "encounter-diagnosis"}]}])))
        else:
            key = draw(st.sampled_from(sorted(res)))
            if draw(st.booleans()):
                del res[key]
            else:
                res[key] = draw(json_values)
    return res


def _extras() -> list[dict[str, Any]]:
    """What the EHR shapes rarely or never draw: pregnancy and its end, active B12, acid
    suppressants by statement and by request, a low-B12 finding, a B12-deficiency history,
    structural malabsorption, a B12 prescription, an answer recorded as absent."""
    sub = {"reference": "Patient/p1"}

    def cc(system: str, code: str, text: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"coding": [{"system": system, "code": code}]}
        if text:
            out["text"] = text
        return out

    snomed, loinc, rxnorm = ehr_shapes.SNOMED, ehr_shapes.LOINC, ehr_shapes.RXNORM
    return [
        {"resourceType": "Condition", "id": "x-preg", "subject": sub, "code": cc(snomed, "77386006"),
         "onsetDateTime": "2025-03-01"},
        {"resourceType": "Observation", "id": "x-preg-obs", "status": "final", "subject": sub,
         "code": cc(loinc, "82810-3"), "valueCodeableConcept": cc(loinc, "LA15173-0", "Pregnant"),
         "effectiveDateTime": "2025-05-01T09:00:00Z"},
        {"resourceType": "Condition", "id": "x-deliv", "subject": sub, "code": cc(snomed, "60001007"),
         "onsetDateTime": "2025-05-20"},
        {"resourceType": "Observation", "id": "x-active", "status": "final", "subject": sub,
         "code": cc(loinc, "72160-5"), "valueQuantity": {"value": 40, "unit": "pmol/L"},
         "effectiveDateTime": "2025-04-01"},
        {"resourceType": "MedicationStatement", "id": "x-ppi", "status": "active", "subject": sub,
         "medicationCodeableConcept": cc(rxnorm, "7646", "omeprazole"),
         "effectivePeriod": {"start": "2023-01-01"}, "dateAsserted": "2025-01-01"},
        {"resourceType": "MedicationRequest", "id": "x-ppi-rx", "status": "active", "intent": "order",
         "subject": sub, "medicationCodeableConcept": cc(rxnorm, "7646"), "authoredOn": "2025-05-01"},
        {"resourceType": "Observation", "id": "x-lowb12", "status": "final", "subject": sub,
         "code": cc(snomed, "165645009"), "effectiveDateTime": "2025-02-01"},
        {"resourceType": "Condition", "id": "x-hist", "subject": sub, "code": cc(snomed, "161457000")},
        {"resourceType": "Condition", "id": "x-crohn", "subject": sub, "code": cc(snomed, "34000006"),
         "clinicalStatus": {"coding": [{"system": ehr_shapes.CLINICAL, "code": "remission"}]}},
        {"resourceType": "MedicationRequest", "id": "x-b12rx", "status": "active", "intent": "order",
         "subject": sub, "medicationCodeableConcept": cc(rxnorm, "309594")},
        {"resourceType": "Observation", "id": "x-absent", "status": "final", "subject": sub,
         "code": cc(snomed, "91019004"), "valueCodeableConcept": cc(snomed, "373067005")},
        {"resourceType": "MedicationStatement", "id": "x-named", "status": "active", "subject": sub,
         "medicationCodeableConcept": {"coding": [{"system": ehr_shapes.LOCAL, "code": "m1",
                                                   "display": "Glucophage (metformin hydrochloride)"}],
                                       "text": "metformin 500 mg tablet"}},
        {"resourceType": "Condition", "id": "x-abated", "subject": sub, "code": cc(snomed, "81680005"),
         "clinicalStatus": {"coding": [{"system": ehr_shapes.CLINICAL, "code": "active"}]},
         "abatementString": "after physiotherapy", "onsetDateTime": "2024-01-01"},
        {"resourceType": "Condition", "id": "x-encounter", "subject": sub, "code": cc(snomed, "81680005"),
         "category": [{"coding": [{"system": facts.CONDITION_CATEGORY, "code": "encounter-diagnosis"}]}],
         "recordedDate": "2025-06-01"},
    ]


EXTRAS = _extras()


@st.composite
def records(draw: Any) -> tuple[PatientRecord, Any]:
    shaped = draw(ehr_shapes.patients("p1"))
    shaped += draw(st.lists(st.sampled_from(EXTRAS), max_size=4, unique_by=lambda r: r["id"]))
    resources = [draw(perturbed(r)) if draw(st.booleans()) else r for r in shaped]
    resources += draw(st.lists(st.one_of(fhir_resource(), junk_resources), max_size=3))
    resources = draw(st.permutations(resources))
    drafts = draw(st.lists(st.one_of(
        st.sampled_from([r for r in shaped if r.get("resourceType") in ("ServiceRequest", "MedicationRequest")]
                        or [{"resourceType": "ServiceRequest"}]).flatmap(perturbed), fhir_resource()), max_size=2))
    unavailable = draw(st.frozensets(st.sampled_from(["conditions", "labResults", "medicationRequests"])))
    return PatientRecord.from_resources(resources, draft_orders=drafts, unavailable=unavailable), \
        HookContext(user_id="Practitioner/1", patient_id=draw(st.sampled_from(["p1", ""])))


def _both(record: PatientRecord, context: Any, settings_: Settings, now: datetime | date) -> None:
    def run(module: Any) -> Any:
        try:
            return repr(module.derive_facts(record, context, ENGINE.knowledge, settings_, now, ENGINE.verdicts))
        except Exception as exc:  # noqa: BLE001 - the same error is the same answer
            return f"raised {type(exc).__name__}: {exc}"

    expected = run(reference_facts)
    assert run(facts) == expected


@RUN
@given(case=records(), other=st.booleans(),
       now=st.one_of(st.just(datetime(2025, 6, 15, 12, tzinfo=timezone.utc)),
                     st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1),
                                  timezones=st.just(timezone.utc)),
                     st.dates(min_value=date(2000, 1, 1), max_value=date(2040, 1, 1))))
def test_facts_are_what_the_former_derivation_derives(case: tuple[PatientRecord, Any], other: bool,
                                                      now: datetime | date) -> None:
    record, context = case
    _both(record, context, OTHER if other else ENGINE.settings, now)


@RUN
@given(resources=st.lists(st.one_of(fhir_resource(), json_values), max_size=20))
def test_malformed_records_give_the_former_facts(resources: list[Any]) -> None:
    # Grouped by hand, so every reader sees every shape (as tests/test_engine_properties.py does).
    dicts = tuple(resources)
    record = PatientRecord(patient=next((r for r in resources if type(r) is dict), None), conditions=dicts,
                           observations=dicts, medication_requests=dicts, medication_statements=dicts,
                           procedures=dicts, service_requests=dicts, draft_orders=dicts,
                           medications=dicts)
    _both(record, HookContext(user_id="Practitioner/1", patient_id="p1"), ENGINE.settings,
          datetime(2025, 6, 15, tzinfo=timezone.utc))


def test_the_oracle_is_not_the_module_itself() -> None:
    assert reference_facts.derive_facts is not facts.derive_facts
    assert reference_facts._match_concept is not facts._match_concept
