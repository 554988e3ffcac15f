"""Adversarial probes of the resource gate on the hook path (facts.resource_needed, facts.head_gate).

Each probe is one realistic but awkward EHR shape (several codings, text only, local codes,
ICD-10-CM without its dot, contained or display-only Medications, components, values, absolute
subject references...).  For each, the facts and the decision are the same whether the gatherer
decodes every resource (no gate, the full parse) or only those the gate lets through, on typed
heads and on dict heads (a resource with a head field of an unusual JSON type gets a dict head;
the dict-heads runs turn typed heads off for every resource).
And each probe matters: without its resource the facts differ, so a gate that dropped it would
fail here (a gate that dropped nothing would pass, which is why `test_the_gate_drops_noise` is
here too).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import msgspec
import orjson
import pytest

from cds_service import facts, wire
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.patient_data import PatientDataGatherer
from cds_service.protocol import parse_hook_request
from cds_service.record import PREFETCH_KEYS
from cds_service.rules import decide
from tests.servers import Reply, StubServer, searchset

ENGINE = ClinicalEngine.load(Settings())
GATHERER = PatientDataGatherer(ENGINE.settings)
TEMPLATES = GATHERER.prefetch_templates("patient-view", ENGINE)
NOW = datetime(2025, 6, 15, 12, tzinfo=timezone.utc)

SCT = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOCAL = "urn:oid:2.16.840.1.113883.3.7777.1"
ACTIVE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
CONFIRMED = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                         "code": "confirmed"}]}
ME = {"reference": "Patient/p1"}

PATIENT = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-03-01", "gender": "female"}
NECK = {"resourceType": "Condition", "id": "neck", "subject": ME, "clinicalStatus": ACTIVE,
        "verificationStatus": CONFIRMED, "onsetDateTime": "2024-01-10",
        "code": {"coding": [{"system": SCT, "code": "81680005", "display": "Neck pain"}]}}
VITAL = {"resourceType": "Observation", "id": "bp", "status": "final", "subject": ME,
         "code": {"coding": [{"system": LOINC, "code": "85354-9"}]}}
NOISE_CONDITION = {"resourceType": "Condition", "id": "htn", "subject": ME, "clinicalStatus": ACTIVE,
                   "code": {"coding": [{"system": SCT, "code": "38341003", "display": "Hypertension"}]}}
ODD_HEAD = {"resourceType": "Observation", "id": "odd", "status": "final", "subject": ME,
            "code": {"coding": [{"system": LOINC, "code": 8867}]}}  # a number: a dict head


class _NoTypedHeads:
    """In place of `wire.HEAD_DECODER`: every resource is judged on its dict head."""

    @staticmethod
    def decode(raw: Any) -> Any:
        raise msgspec.ValidationError("typed heads turned off by the test")


@pytest.fixture(autouse=True)
def _head_decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dict-heads runs decode no typed head at all."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("dict_heads"):
        monkeypatch.setattr(wire, "HEAD_DECODER", _NoTypedHeads())


def condition(rid: str, code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": rid, "subject": ME, "clinicalStatus": ACTIVE,
            "verificationStatus": CONFIRMED, "recordedDate": "2025-05-01", "code": code, **extra}


def observation(rid: str, code: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final", "subject": ME,
            "effectiveDateTime": "2025-05-20", "code": code, **extra}


def med_request(rid: str, **medication: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": ME, "authoredOn": "2022-01-05", **medication}


METFORMIN = {"resourceType": "Medication", "id": "m1",
             "code": {"coding": [{"system": RXNORM, "code": "860975", "display": "metformin 500 MG Oral Tablet"}]}}

# name -> (prefetch key, resources of the probe)
PROBES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "b12 deficiency, local coding first, SNOMED second": ("conditions", [condition("c-b12", {"coding": [
        {"system": LOCAL, "code": "DX-4471", "display": "B12 def"},
        {"system": SCT, "code": "190634004", "display": "Cobalamin deficiency"}]})]),
    "b12 deficiency, ICD-10-CM family member without its dot": ("conditions", [condition("c-d51", {
        "coding": [{"system": ICD, "code": "D510"}]})]),
    "b12 deficiency, ICD-10-CM in lowercase with spaces": ("conditions", [condition("c-d51b", {
        "coding": [{"system": ICD, "code": " d51.9 "}]})]),
    "diabetes, ICD-10-CM code family E11": ("conditions", [condition("c-dm", {
        "coding": [{"system": ICD, "code": "E11.9", "display": "Type 2 diabetes"}]})]),
    "myelopathy as text only": ("conditions", [condition("c-myel", {"text": "Cervical myelopathy"})]),
    "paraesthesia, local code whose display names it": ("conditions", [condition("c-par", {
        "coding": [{"system": LOCAL, "code": "PRB-1123", "display": "Paresthesia of both hands"}]})]),
    "pregnancy condition, ICD-10-CM Z34 family": ("conditions", [condition("c-preg", {
        "coding": [{"system": ICD, "code": "Z34.83"}]})]),
    "gastrectomy as a Condition (Z90.3, inactive: history counts)": ("conditions", [condition("c-z903", {
        "coding": [{"system": ICD, "code": "Z90.3", "display": "Acquired absence of stomach"}]},
        clinicalStatus={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                    "code": "inactive"}]})]),
    "coding null, text names the problem": ("conditions", [condition("c-null", {
        "coding": None, "text": "Numbness and tingling in fingers (paresthesia)"})]),
    "subject as an absolute, versioned URL": ("conditions", [{**condition("c-abs", {
        "coding": [{"system": SCT, "code": "64117007"}]}),
        "subject": {"reference": "https://ehr.example.org/fhir/Patient/p1/_history/4"}}]),
    "B12 in a panel's component": ("labResults", [observation("o-panel", {
        "coding": [{"system": LOCAL, "code": "B12FOL", "display": "B12 and folate panel"}]},
        component=[{"code": {"coding": [{"system": LOINC, "code": "2132-9"}]},
                    "valueQuantity": {"value": 150, "unit": "pg/mL", "system": "http://unitsofmeasure.org",
                                      "code": "pg/mL"}},
                   {"code": {"coding": [{"system": LOINC, "code": "2284-8"}]},
                    "valueQuantity": {"value": 9, "unit": "ng/mL"}}])]),
    "B12 result, LOINC second after a local code, null members": ("labResults", [observation("o-b12", {
        "coding": [{"system": LOCAL, "code": "VITB12"}, {"system": LOINC, "code": "2132-9 "}]},
        valueQuantity={"value": 140, "unit": "pg/mL"}, valueCodeableConcept=None, component=None,
        interpretation=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                     "code": "L"}]}])]),
    "MMA pending (preliminary)": ("labResults", [{**observation("o-mma", {
        "coding": [{"system": LOINC, "code": "13964-2"}]}, valueQuantity={"value": 0.5, "unit": "umol/L"}),
        "status": "preliminary"}]),
    "vegan diet as the value of a local diet question": ("findingValues", [observation("o-diet", {
        "coding": [{"system": LOCAL, "code": "DIET-Q", "display": "Diet"}], "text": "Diet type"},
        valueCodeableConcept={"coding": [{"system": SCT, "code": "1255165006", "display": "Vegan diet"}]})]),
    "pregnancy status Observation, LOINC answer as the value": ("findingValues", [observation("o-preg", {
        "coding": [{"system": LOINC, "code": "82810-3", "display": "Pregnancy status"}]},
        valueCodeableConcept={"coding": [{"system": LOINC, "code": "LA15173-0", "display": "Pregnant"}]})]),
    "low B12 finding coded only in the value": ("findingValues", [observation("o-low", {
        "text": "Lab comment"}, valueCodeableConcept={"coding": [{"system": SCT, "code": "165645009"}]})]),
    "paraesthesia finding with a 'present' value": ("findings", [observation("o-par", {
        "coding": [{"system": SCT, "code": "91019004"}]}, valueBoolean=True)]),
    "metformin from a contained Medication": ("medicationRequests", [{**med_request(
        "mr-cont", medicationReference={"reference": "#med"}),
        "contained": [{**METFORMIN, "id": "med"}]}]),
    "metformin named only by the reference's display": ("medicationRequests", [med_request(
        "mr-disp", medicationReference={"display": "Metformin 500 mg tablet"})]),
    "metformin by an absolute versioned reference to a Medication in the Bundle": ("medicationRequests", [
        med_request("mr-abs", medicationReference={
            "reference": "https://ehr.example.org/fhir/Medication/m1/_history/2"}), METFORMIN]),
    "omeprazole statement, local code and text": ("medicationStatements", [{
        "resourceType": "MedicationStatement", "id": "ms-ppi", "status": "active", "subject": ME,
        "effectivePeriod": {"start": "2020-02-01"},
        "medicationCodeableConcept": {"coding": [{"system": LOCAL, "code": "RX-889", "display": "OMEPRAZOLE 20MG CAP"}],
                                      "text": "omeprazole 20 mg capsule"}}]),
    "cyanocobalamin request by RxNorm, second coding": ("medicationRequests", [med_request(
        "mr-b12", medicationCodeableConcept={"coding": [{"system": LOCAL, "code": "RX-1"},
                                                        {"system": RXNORM, "code": "309594"}]})]),
    "B12 order with only a local code and a display naming the test": ("serviceRequests", [{
        "resourceType": "ServiceRequest", "id": "sr-b12", "status": "active", "intent": "order",
        "subject": ME, "authoredOn": "2025-06-10",
        "code": {"coding": [{"system": LOCAL, "code": "LAB-0042", "display": "Vitamin B12 level"}]}}]),
    "esomeprazole statement by brand name in the text only": ("medicationStatements", [{
        "resourceType": "MedicationStatement", "id": "ms-nex", "status": "active", "subject": ME,
        "dateAsserted": "2021-04-01", "medicationCodeableConcept": {"text": "Nexium 40 mg"}}]),
    "MMA order named in the text only": ("serviceRequests", [{
        "resourceType": "ServiceRequest", "id": "sr-mma", "status": "active", "intent": "order",
        "subject": ME, "authoredOn": "2025-06-12", "code": {"text": "Methylmalonic acid, serum"}}]),
    "alcohol use disorder, ICD-10-CM F10.20 without its dot": ("conditions", [condition("c-aud", {
        "coding": [{"system": ICD, "code": "F1020"}]})]),
    "Crohn's disease in remission (structural malabsorption persists)": ("conditions", [condition("c-crohn", {
        "coding": [{"system": ICD, "code": "K50.90", "display": "Crohn's disease, unspecified"}]},
        clinicalStatus={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                    "code": "remission"}]})]),
    "gastrectomy procedure": ("procedures", [{
        "resourceType": "Procedure", "id": "pr-gas", "status": "completed", "subject": ME,
        "performedDateTime": "2015-03-03",
        "code": {"coding": [{"system": LOCAL, "code": "SURG-7"}, {"system": SCT, "code": "53442002"}]}}]),
}


def _body(prefetch: dict[str, list[dict[str, Any]]], *, dict_heads: bool) -> bytes:
    values: dict[str, Any] = {"patient": PATIENT}
    for key in PREFETCH_KEYS:
        if key != "patient":
            entries = list(prefetch.get(key, [])) + ([ODD_HEAD] if dict_heads else [])
            values[key] = {"resourceType": "Bundle", "type": "searchset",
                           "entry": [{"resource": r} for r in entries]}
    return json.dumps({"hook": "patient-view", "hookInstance": "gate-review",
                       "context": {"userId": "Practitioner/1", "patientId": "p1"}, "prefetch": values}).encode()


def _facts(raw: bytes, *, gated: bool) -> facts.PatientFacts:
    """The facts of one hook body: lazily decoded and gated (the hook path), or fully parsed and
    every resource given to the derivation (the reference)."""
    if gated:
        decoded = wire.decode_hook_body(raw)
        assert decoded is not None
        request = parse_hook_request(decoded, "patient-view")
        record = GATHERER.gather(request, TEMPLATES, needed=ENGINE.resource_needed,
                                 needed_head=ENGINE.head_needed).record
    else:
        request = parse_hook_request(orjson.loads(raw), "patient-view")
        record = GATHERER.gather(request, TEMPLATES).record
    return facts.derive_facts(record, request.context, ENGINE.knowledge, ENGINE.settings, NOW)


def _typed(raw: bytes) -> bool:
    """Whether every resource of the Bundles gets a typed head (else some get dict heads)."""
    decoded = wire.decode_hook_body(raw)
    bundles = [v for k, v in decoded["prefetch"].items() if k != "patient"]
    assert bundles and all(isinstance(v, wire.LazyBundle) for v in bundles)  # the one-pass decoder
    return all(isinstance(head, wire.Head) for v in bundles for head in v.heads)


@pytest.mark.parametrize("dict_heads", [False, True], ids=["typed-heads", "dict-heads"])
@pytest.mark.parametrize("name", list(PROBES))
def test_probe_gives_the_same_facts_with_and_without_the_gate(name: str, dict_heads: bool) -> None:
    key, probe = PROBES[name]
    base = {"conditions": [NECK, NOISE_CONDITION], "findings": [VITAL]}
    with_probe = {**base, key: base.get(key, []) + probe}
    raw = _body(with_probe, dict_heads=dict_heads)
    assert _typed(raw) is not dict_heads  # the intended head decoder is the one under test
    full = _facts(raw, gated=False)
    assert _facts(raw, gated=True) == full
    assert decide(_facts(raw, gated=True), ENGINE.settings) == decide(full, ENGINE.settings)
    # The probe matters: without its resources the facts are not the same.
    assert _facts(_body(base, dict_heads=dict_heads), gated=False) != full, name


@pytest.mark.parametrize("dict_heads", [False, True], ids=["typed-heads", "dict-heads"])
def test_the_gate_drops_noise(dict_heads: bool) -> None:
    """The probes above are not passed by a gate that lets everything through: the same calls
    drop the vital sign and the unrelated problem."""
    raw = _body({"conditions": [NECK, NOISE_CONDITION], "findings": [VITAL]}, dict_heads=dict_heads)
    request = parse_hook_request(wire.decode_hook_body(raw), "patient-view")
    record = GATHERER.gather(request, TEMPLATES, needed=ENGINE.resource_needed,
                             needed_head=ENGINE.head_needed).record
    assert [c["id"] for c in record.conditions] == ["neck"]
    assert [o["id"] for o in record.observations] == []


# --- the same type/id more than once (another version of the resource) -------------------------

METFORMIN_ORDER = med_request("mr-met", medicationCodeableConcept={
    "coding": [{"system": RXNORM, "code": "6809", "display": "metformin"}]})
FATIGUE = condition("c-dup", {"coding": [{"system": LOCAL, "code": "DX-1", "display": "Fatigue"}]})
DEFICIENCY = condition("c-dup", {"coding": [{"system": SCT, "code": "190634004"}]})
OTHER_LAB = observation("o-dup", {"coding": [{"system": LOINC, "code": "2284-8", "display": "Folate"}]},
                        valueQuantity={"value": 9, "unit": "ng/mL"})
B12_LOW = observation("o-dup", {"coding": [{"system": LOINC, "code": "2132-9"}]},
                      valueQuantity={"value": 120, "unit": "pg/mL"})

DUPLICATES = {
    # PatientRecord keeps the first copy of a type/id: a dropped first copy must still win, or a
    # later one (here: a deficiency already handled) would silence the card the full path shows.
    "first copy unused, second a B12 deficiency": {"conditions": [NECK, FATIGUE, DEFICIENCY]},
    "first copy a B12 deficiency, second unused": {"conditions": [NECK, DEFICIENCY, FATIGUE]},
    # Keys are read in the templates' order (labResults before findings).
    "unused copy in an earlier key, B12 result in a later key": {
        "conditions": [NECK], "labResults": [OTHER_LAB], "findings": [B12_LOW]},
    "B12 result in an earlier key, unused copy in a later key": {
        "conditions": [NECK], "labResults": [B12_LOW], "findings": [OTHER_LAB]},
}


@pytest.mark.parametrize("dict_heads", [False, True], ids=["typed-heads", "dict-heads"])
@pytest.mark.parametrize("name", list(DUPLICATES))
def test_repeated_type_and_id_give_the_same_facts_with_and_without_the_gate(name: str, dict_heads: bool) -> None:
    prefetch = {**DUPLICATES[name], "medicationRequests": [METFORMIN_ORDER]}
    raw = _body(prefetch, dict_heads=dict_heads)
    full = _facts(raw, gated=False)
    gated = _facts(raw, gated=True)
    assert gated == full
    assert decide(gated, ENGINE.settings) == decide(full, ENGINE.settings)


PREGNANT = observation("o-pregnant", {"coding": [{"system": LOINC, "code": "82810-3"}]},
                       effectiveDateTime="2025-04-01",
                       valueCodeableConcept={"coding": [{"system": SCT, "code": "77386006"}]})


@pytest.mark.parametrize("dict_heads", [False, True], ids=["typed-heads", "dict-heads"])
@pytest.mark.parametrize("ended", [
    observation("o-notpreg", {"coding": [{"system": LOCAL, "code": "PREG-Q"}], "text": "Pregnant?"},
                effectiveDateTime="2025-06-01",
                valueCodeableConcept={"coding": [{"system": LOINC, "code": "LA26683-5", "display": "Not pregnant"}]}),
    condition("c-delivery", {"coding": [{"system": ICD, "code": "Z37.0"}]}, onsetDateTime="2025-06-02"),
], ids=["not-pregnant-value", "delivery-outcome-code-family"])
def test_a_pregnancy_that_ended_reads_the_same_with_and_without_the_gate(ended: dict, dict_heads: bool) -> None:
    """The pregnancy exception (no card) ends with a later "not pregnant" or delivery entry: a
    gate that dropped that entry would silence the card for good."""
    base = {"conditions": [NECK], "findingValues": [PREGNANT]}
    key = "conditions" if ended["resourceType"] == "Condition" else "findingValues"
    raw = _body({**base, key: base[key] + [ended]}, dict_heads=dict_heads)
    full = _facts(raw, gated=False)
    assert _facts(raw, gated=True) == full
    assert _facts(_body(base, dict_heads=dict_heads), gated=False).pregnancy and not full.pregnancy


def test_a_later_page_cannot_replace_a_dropped_copy() -> None:
    """The next page of a prefetched Bundle (fetched from the FHIR server) holds another copy of
    a resource the gate dropped from the first page: the first copy still wins, as in full."""
    with StubServer() as stub:
        stub.route("/fhir/Condition", Reply(body=searchset(DEFICIENCY)))
        gatherer = PatientDataGatherer(Settings.from_env({"fhir_allowlist": stub.base}, environ={}))
        try:
            first_page = searchset(NECK, FATIGUE, next_url=f"{stub.base}/fhir/Condition?page=2")
            body = {"hook": "patient-view", "hookInstance": "gate-review", "fhirServer": f"{stub.base}/fhir",
                    "context": {"userId": "Practitioner/1", "patientId": "p1"},
                    "prefetch": {"patient": PATIENT, "conditions": first_page,
                                 "medicationRequests": searchset(METFORMIN_ORDER),
                                 **{k: None for k in PREFETCH_KEYS
                                    if k not in ("patient", "conditions", "medicationRequests")}}}
            raw = json.dumps(body).encode()
            results = []
            for gated in (False, True):
                if gated:
                    request = parse_hook_request(wire.decode_hook_body(raw), "patient-view")
                    got = gatherer.gather(request, TEMPLATES, needed=ENGINE.resource_needed,
                                          needed_head=ENGINE.head_needed)
                else:
                    request = parse_hook_request(orjson.loads(raw), "patient-view")
                    got = gatherer.gather(request, TEMPLATES)
                assert got.fhir_calls == 1  # the next page was read
                results.append(facts.derive_facts(got.record, request.context, ENGINE.knowledge,
                                                  ENGINE.settings, NOW))
        finally:
            gatherer.close()
    full, gated_facts = results
    assert gated_facts == full and not full.already_handled
    assert decide(full, ENGINE.settings).kind  # the card the full parse shows


def test_a_dropped_copy_leaves_no_medication_reference_to_resolve() -> None:
    """A later copy (in another key) of a MedicationRequest the gate dropped has its
    medicationReference looked up (reported unresolved) as in full, though only the first copy
    is read."""
    dropped = med_request("mr-x", medicationCodeableConcept={"coding": [{"system": LOCAL, "code": "RX-5"}],
                                                             "text": "lisinopril 10 mg"})
    later = med_request("mr-x", medicationReference={"reference": "Medication/not-sent"})
    raw = _body({"conditions": [NECK], "medicationRequests": [dropped], "serviceRequests": [later]},
                dict_heads=False)
    full = _facts(raw, gated=False)
    assert _facts(raw, gated=True) == full
    assert full.unavailable == {"serviceRequests"}
