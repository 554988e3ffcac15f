"""Grouping a patient's resources never trusts the shape of what arrived."""

from __future__ import annotations

from cds_service.record import PatientRecord


def test_groups_by_type_and_drops_duplicates():
    record = PatientRecord.from_resources([
        {"resourceType": "Patient", "id": "p"},
        {"resourceType": "Condition", "id": "c1"},
        {"resourceType": "Condition", "id": "c1"},
        {"resourceType": "Observation", "id": "o1"},
        {"resourceType": "Observation"},  # no id: kept
    ], draft_orders=[{"resourceType": "ServiceRequest"}, "junk"])
    assert record.patient == {"resourceType": "Patient", "id": "p"}
    assert [c["id"] for c in record.conditions] == ["c1"]
    assert len(record.observations) == 2
    assert record.draft_orders == ({"resourceType": "ServiceRequest"},)


def test_medication_resources_are_kept_for_references():
    """`_include`d Medication resources are what a `medicationReference` points to."""
    record = PatientRecord.from_resources([
        {"resourceType": "MedicationRequest", "id": "mr", "medicationReference": {"reference": "Medication/m1"}},
        {"resourceType": "Medication", "id": "m1"},
    ])
    assert [m["id"] for m in record.medications] == ["m1"]
    assert [m["id"] for m in record.medication_requests] == ["mr"]


def test_malformed_types_are_skipped_not_fatal():
    record = PatientRecord.from_resources([
        {"resourceType": ["Condition"], "id": "x"}, {"resourceType": {"a": 1}, "id": ["y"]},
        {"resourceType": None}, "text", 7, None, {"resourceType": "Condition", "id": {"z": 1}},
    ])
    assert record.patient is None
    assert record.conditions == ({"resourceType": "Condition", "id": {"z": 1}},)


def test_hook_with_malformed_prefetch_resources_answers_200(client):
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": ["Condition"], "id": "bad"}},
        {"resource": {"resourceType": "Condition", "id": "c", "code": "not-a-codeableconcept"}},
        {"resource": "string"}, "entry-as-string"]}
    body = {"hook": "patient-view", "hookInstance": "h-malformed",
            "context": {"userId": "Practitioner/1", "patientId": "p1"},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": bundle,
                         **{k: None for k in ("labResults", "findings", "findingValues", "medicationRequests",
                                              "medicationStatements", "procedures", "serviceRequests")}}}
    resp = client.post("/cds-services/b12-neck-pain-patient-view", json=body)
    assert resp.status_code == 200
    assert resp.get_json() == {"cards": []}
