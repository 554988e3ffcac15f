"""Property-based tests: random and malformed FHIR never make the engine raise; bad resources are
skipped (and counted) without changing what the good ones decide."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import orjson
from hypothesis import HealthCheck, given, settings, strategies as st

from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.record import PatientRecord
from tests.fhir_builders import (
    ICD10CM, LOINC, NOW, RXNORM, SNOMED, b12_result, condition, hook_request, medication_request,
    medication_statement, metformin, neck_pain, observation, patient, procedure, record, service_request,
)

ENGINE = ClinicalEngine.load(Settings())
RUN = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SYSTEMS = [SNOMED, ICD10CM, LOINC, RXNORM, "http://terminology.hl7.org/CodeSystem/diet", "urn:x"]
CODES = ["81680005", "M54.2", "M50.121", "1121000119107", "91019004", "R20.2", "202664003", "44054006",
         "E11.9", "6809", "7646", "309594", "2132-9", "14685-2", "13964-2", "1255165006", "vegan", "D51.0",
         "53442002", "Z90.3", "240215009", "39848009", "", " ", "x" * 300]
STATUSES = ["active", "final", "completed", "on-hold", "entered-in-error", "cancelled", "draft", "refuted", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30), st.sampled_from(CODES + STATUSES + ["2024-02-30", "2020", "T12:00"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)


@st.composite
def codeable(draw) -> dict:
    codings = draw(st.lists(st.fixed_dictionaries(
        {"system": st.sampled_from(SYSTEMS), "code": st.sampled_from(CODES)},
        optional={"display": st.text(max_size=40)}), max_size=3))
    out: dict = {"coding": codings}
    if draw(st.booleans()):
        out["text"] = draw(st.one_of(st.text(max_size=40), st.sampled_from(["metformin 500mg", "omeprazole",
                                                                           "cyanocobalamin"])))
    return out


@st.composite
def fhir_resource(draw) -> dict:
    """A plausible resource of a random type, then randomly corrupted."""
    rtype = draw(st.sampled_from(["Condition", "Observation", "MedicationRequest", "MedicationStatement",
                                  "Procedure", "ServiceRequest", "Patient", "Encounter"]))
    res: dict = {"resourceType": rtype, "id": draw(st.text(alphabet="abc123-", min_size=1, max_size=8)),
                 "subject": {"reference": "Patient/p1"}, "status": draw(st.sampled_from(STATUSES)),
                 "intent": "order", "code": draw(codeable()), "medicationCodeableConcept": draw(codeable()),
                 "valueCodeableConcept": draw(codeable()), "clinicalStatus": draw(codeable()),
                 "verificationStatus": draw(codeable()),
                 "onsetDateTime": draw(st.sampled_from(["2020-01-01", "2025-06-01", "2024", "bad", "2024-13-01"])),
                 "effectiveDateTime": draw(st.sampled_from(["2025-05-01", "2024-06-15T10:00:00Z", "never"])),
                 "valueQuantity": {"value": draw(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=5))),
                                   "unit": draw(st.sampled_from(["pg/mL", "pmol/L", "ng/L", "", "?"])),
                                   "comparator": draw(st.sampled_from(["<", ">", "=", None]))},
                 "birthDate": draw(st.sampled_from(["1940-02-29", "1950", "1990-06", "2030-01-01", "x"]))}
    for key in draw(st.lists(st.sampled_from(sorted(res)), max_size=4, unique=True)):
        if draw(st.booleans()):
            del res[key]
        else:
            res[key] = draw(json_values)
    return res


@RUN
@given(resources=st.lists(st.one_of(fhir_resource(), json_values), max_size=25),
       drafts=st.lists(st.one_of(fhir_resource(), json_values), max_size=3),
       unavailable=st.frozensets(st.sampled_from(["conditions", "labResults", "medicationRequests"])),
       now=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)))
def test_random_and_malformed_fhir_never_raises(resources, drafts, unavailable, now) -> None:
    # Grouped by hand rather than with PatientRecord.from_resources, so that the engine (not the
    # record grouping) sees every malformed shape, including non-dict entries.
    by_type: dict[str, list] = {}
    for r in resources:
        rtype = r.get("resourceType") if isinstance(r, dict) else None
        by_type.setdefault(rtype if isinstance(rtype, str) else "", []).append(r)
    rec = PatientRecord(
        patient=(by_type.get("Patient") or [None])[0],
        conditions=tuple(by_type.get("Condition", ())) + tuple(by_type.get("", ())),
        observations=tuple(by_type.get("Observation", ())),
        medication_requests=tuple(by_type.get("MedicationRequest", ())),
        medication_statements=tuple(by_type.get("MedicationStatement", ())),
        procedures=tuple(by_type.get("Procedure", ())),
        service_requests=tuple(by_type.get("ServiceRequest", ())) + tuple(by_type.get("Encounter", ())),
        draft_orders=tuple(drafts), unavailable=unavailable)
    ev = ENGINE.evaluate(rec, hook_request(), now)
    assert 0 <= ev.skipped_resources <= len(resources) + len(drafts) + 1
    assert len(ev.cards) == (1 if ev.decision.kind else 0)
    for card in ev.cards:
        # spec-conformant: a valid protocol.Card whose own JSON is exactly what is answered
        assert orjson.dumps(card.model().to_json()) == orjson.dumps(card.to_json())
        assert ev.card_kinds[card.uuid] == ev.decision.kind


@RUN
@given(tuples=st.lists(st.tuples(st.sampled_from(["Condition", "Observation", "MedicationRequest", "Patient"]),
                                 json_values), max_size=10))
def test_raw_record_fields_of_any_type_never_raise(tuples) -> None:
    resources = [{"resourceType": t, **(v if isinstance(v, dict) else {"code": v})} for t, v in tuples]
    rec = PatientRecord(patient=resources[0] if resources else None, conditions=tuple(resources),
                        observations=tuple(resources), medication_requests=tuple(resources),
                        medication_statements=tuple(resources), procedures=tuple(resources),
                        service_requests=tuple(resources), draft_orders=tuple(resources))
    ENGINE.evaluate(rec, hook_request(), NOW)


def _break(resource: dict) -> dict:
    """A copy that still matches its value set but fails R4 validation."""
    bad = copy.deepcopy(resource)
    bad["id"] = "bad-" + bad["id"]
    bad["subject"] = {"reference": ["not", "a", "string"]}
    return bad


GOOD_PATIENTS = [
    [neck_pain(onset_days=200), metformin()],
    [neck_pain(onset_days=10), condition("R20.2", ICD10CM), medication_statement("7646")],
    [neck_pain(), b12_result(150, on="2025-05-01")],
    [neck_pain(), metformin(), b12_result(300, on="2025-01-01")],
    [neck_pain(), metformin(), service_request()],
    [neck_pain(), procedure("53442002"), observation("91019004")],
    [neck_pain(), medication_request("309594")],
]


@RUN
@given(index=st.integers(0, len(GOOD_PATIENTS) - 1), picks=st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True))
def test_invalid_copies_of_matched_resources_are_skipped_and_change_nothing(index, picks) -> None:
    good = GOOD_PATIENTS[index]
    baseline = ENGINE.evaluate(record(patient("1960-01-01"), *good), hook_request(), NOW)
    broken = [_break(good[i]) for i in picks if i < len(good)]
    ev = ENGINE.evaluate(record(patient("1960-01-01"), *good, *broken), hook_request(), NOW)
    assert (ev.decision.kind, ev.decision.reason) == (baseline.decision.kind, baseline.decision.reason)
    assert ev.skipped_resources == len(broken)


def test_large_record_with_unrelated_filler_gives_the_same_decision() -> None:
    """~3,000 unrelated resources do not change the outcome (speed is measured in bench/)."""
    filler = [condition("22298006", id=f"f{i}") for i in range(1500)]
    filler += [observation("8867-4", LOINC, id=f"o{i}") for i in range(1500)]
    small = ENGINE.evaluate(record(patient("1950-01-01"), neck_pain(), metformin()), hook_request(), NOW)
    large = ENGINE.evaluate(record(patient("1950-01-01"), neck_pain(), metformin(), *filler), hook_request(), NOW)
    assert small.decision.kind == large.decision.kind == "b12-test"
    assert [c.summary for c in small.cards] == [c.summary for c in large.cards]
