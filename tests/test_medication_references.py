"""Medications given by reference: the referenced Medication resources are read from fhirServer,
the same way whether the requests came by prefetch or by fallback, within the outbound rules."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from cds_service.config import Settings
from cds_service.patient_data import MEDICATION_BATCH, MEDICATION_BATCHES, PatientDataGatherer
from cds_service.protocol import parse_hook_request
from tests.servers import Reply, StubServer, hook_body, resource, searchset
from tests.test_patient_data import TEMPLATES, TOKEN, full_prefetch, serve_all

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def metformin(mid: str = "med1") -> dict[str, Any]:
    return {"resourceType": "Medication", "id": mid,
            "code": {"coding": [{"system": RXNORM, "code": "6809", "display": "metformin"}]}}


def by_reference(rid: str, target: str, rtype: str = "MedicationRequest") -> dict[str, Any]:
    return resource(rtype, rid, status="active", intent="order", medicationReference={"reference": target})


def gather(stub: StubServer | None, prefetch: dict[str, Any] | None):
    base = stub.base if stub else "http://127.0.0.1:9"
    gatherer = PatientDataGatherer(Settings.from_env({"fhir_allowlist": base}, environ={}))
    body = hook_body(prefetch=prefetch, fhir_server=base + "/fhir" if stub else None,
                     token=TOKEN if stub else None)
    return gatherer.gather(parse_hook_request(body, body["hook"]), TEMPLATES)


def medication_reads(stub: StubServer) -> list[Any]:
    return [r for r in stub.requests if r.path == "/fhir/Medication"]


def test_fallback_reads_the_referenced_medications_once() -> None:
    data = full_prefetch() | {
        "medicationRequests": searchset(by_reference("mr1", "Medication/med1"),
                                        by_reference("mr2", "Medication/med1")),
        "medicationStatements": searchset(by_reference("ms1", "Medication/med2/_history/3",
                                                       "MedicationStatement"))}
    with StubServer() as stub:
        serve_all(stub, data)
        stub.route("/fhir/Medication", lambda req: Reply(body=searchset(metformin("med1"), metformin("med2"))))
        got = gather(stub, None)
        reads = medication_reads(stub)
    assert sorted(m["id"] for m in got.record.medications) == ["med1", "med2"]
    assert got.failed_keys == ()
    assert len(reads) == 1  # one read for both, de-duplicated
    assert parse_qs(reads[0].query)["_id"] == ["med1,med2"]
    assert reads[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_prefetched_requests_get_their_medications_read_the_same_way() -> None:
    with StubServer() as stub:
        stub.route("/fhir/Medication", Reply(body=searchset(metformin())))
        got = gather(stub, full_prefetch() | {"medicationRequests": searchset(by_reference("mr1", "Medication/med1"))})
        assert len(medication_reads(stub)) == 1 and len(stub.requests) == 1
    assert [m["id"] for m in got.record.medications] == ["med1"]
    assert got.failed_keys == ()


def test_medications_already_sent_contained_or_inline_need_no_read() -> None:
    contained = by_reference("mr2", "#m1") | {"contained": [metformin("m1")]}
    inline = resource("MedicationRequest", "mr3", status="active", intent="order",
                      medicationCodeableConcept={"text": "metformin 500 mg"})
    prefetch = full_prefetch() | {"medicationRequests": searchset(
        by_reference("mr1", "Medication/med1"), metformin("med1"), contained, inline)}
    with StubServer() as stub:
        got = gather(stub, prefetch)
        assert stub.requests == []
    assert [m["id"] for m in got.record.medications] == ["med1"] and got.failed_keys == ()


def test_unresolved_reference_makes_the_key_unavailable() -> None:
    with StubServer() as stub:
        stub.route("/fhir/Medication", Reply(body=searchset()))  # not found
        got = gather(stub, full_prefetch() | {"medicationRequests": searchset(by_reference("mr1", "Medication/gone"))})
    assert got.failed_keys == ("medicationRequests",) and "medicationRequests" in got.record.unavailable
    assert got.record.medications == ()


def test_failed_read_makes_the_key_unavailable() -> None:
    with StubServer() as stub:
        stub.route("/fhir/Medication", Reply(500, b"<html>down</html>", content_type="text/html"))
        got = gather(stub, full_prefetch() | {
            "medicationStatements": searchset(by_reference("ms1", "Medication/med1", "MedicationStatement"))})
    assert got.failed_keys == ("medicationStatements",)


def test_without_a_fhir_server_the_reference_is_reported_not_guessed() -> None:
    got = gather(None, full_prefetch() | {"medicationRequests": searchset(by_reference("mr1", "Medication/med1"))})
    assert got.failed_keys == ("medicationRequests",) and got.fhir_calls == 0


def test_references_elsewhere_or_malformed_are_never_fetched() -> None:
    refs = ["https://evil.example/fhir/Medication/med1", "Medication/a,b", "Medication/../Patient/p2",
            "Medication/" + "x" * 65, "Substance/s1"]
    prefetch = full_prefetch() | {"medicationRequests": searchset(
        *(by_reference(f"mr{n}", ref) for n, ref in enumerate(refs)))}
    with StubServer() as stub:
        got = gather(stub, prefetch)
        assert stub.requests == []  # nothing to read from fhirServer, and nothing sent elsewhere
    assert got.failed_keys == ("medicationRequests",)


def test_absolute_reference_under_the_fhir_server_is_read_there() -> None:
    with StubServer() as stub:
        stub.route("/fhir/Medication", Reply(body=searchset(metformin())))
        got = gather(stub, full_prefetch() | {"medicationRequests": searchset(
            by_reference("mr1", f"{stub.base}/fhir/Medication/med1"))})
    assert [m["id"] for m in got.record.medications] == ["med1"] and got.failed_keys == ()


def test_many_references_are_read_in_bounded_batches() -> None:
    count = MEDICATION_BATCH * MEDICATION_BATCHES + 3
    requests_ = [by_reference(f"mr{n}", f"Medication/m{n:04d}") for n in range(count)]

    def answer(req: Any) -> Reply:
        ids = parse_qs(req.query)["_id"][0].split(",")
        return Reply(body=searchset(*(metformin(i) for i in ids)))

    with StubServer() as stub:
        stub.route("/fhir/Medication", answer)
        got = gather(stub, full_prefetch() | {"medicationRequests": searchset(*requests_)})
        reads = medication_reads(stub)
    assert len(reads) == MEDICATION_BATCHES
    assert all(len(parse_qs(r.query)["_id"][0].split(",")) <= MEDICATION_BATCH for r in reads)
    assert len(got.record.medications) == MEDICATION_BATCH * MEDICATION_BATCHES
    assert got.failed_keys == ("medicationRequests",)  # the last 3 were not read: said so


def test_medication_read_shares_the_call_deadline() -> None:
    import time

    with StubServer() as stub:
        stub.route("/fhir/Medication", Reply(body=searchset(metformin()), delay=3.0))
        gatherer = PatientDataGatherer(Settings.from_env(
            {"fhir_allowlist": stub.base, "fhir_deadline": 0.5}, environ={}))
        body = hook_body(fhir_server=stub.base + "/fhir", token=TOKEN, prefetch=full_prefetch() | {
            "medicationRequests": searchset(by_reference("mr1", "Medication/med1"))})
        started = time.monotonic()
        got = gatherer.gather(parse_hook_request(body, body["hook"]), TEMPLATES)
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert got.failed_keys == ("medicationRequests",) and got.record.medications == ()
