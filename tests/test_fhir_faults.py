"""The FHIR fallback against a misbehaving server: never an exception, never past the deadline.

A stub server on 127.0.0.1 answers the rendered prefetch templates; each test breaks one query
(or all of them) and checks that gather() degrades to "that key is unavailable" (412 only when
the Patient or Conditions cannot be had), returns within the deadline, and runs the fetches
concurrently.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from cds_service.config import Settings
from cds_service.patient_data import PatientDataGatherer
from cds_service.protocol import CdsError
from cds_service.record import PREFETCH_KEYS
from tests.servers import Reply, StubServer, free_port, resource, searchset
from tests.test_patient_data import TEMPLATES, full_prefetch, request, serve_all, serve_key

DEADLINE = 1.0
SLACK = 0.5  # scheduling slack on a loaded 2-core machine
"""Allowed overshoot over the deadline for thread start-up and scheduling on a busy CI box."""


@pytest.fixture()
def stub():
    with StubServer() as server:
        serve_all(server, full_prefetch())
        yield server


def gatherer(stub: StubServer, **overrides: Any) -> PatientDataGatherer:
    values = {"fhir_allowlist": stub.base, "fhir_deadline": DEADLINE, "fhir_connect_timeout": 0.3,
              "fhir_read_timeout": 0.6} | overrides
    return PatientDataGatherer(Settings.from_env(values, environ={}))


def no_prefetch(stub: StubServer):
    return request(fhir_server=stub.base + "/fhir", token="t0k3n")


def timed(fn, *args):
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


@pytest.mark.parametrize("reply", [
    Reply(500, {"resourceType": "OperationOutcome", "issue": []}),
    Reply(404, b"", content_type="text/plain"),
    Reply(200, b"<html><body>Login</body></html>", content_type="text/html"),
    Reply(200, b'{"resourceType": "Bundle", "entry": [{"resou'),
    Reply(200, b'{"resourceType": "Bundle"}garbage'),
    Reply(200, resource("Observation", "not-a-bundle")),
    Reply(200, {"resourceType": "OperationOutcome", "issue": []}),
    Reply(200, [1, 2, 3]),
    Reply(401, {"resourceType": "OperationOutcome", "issue": []}),
    Reply(301, b"", headers={"Location": "/fhir/Observation"}),
], ids=["500", "404", "html", "truncated-json", "trailing-garbage", "not-a-bundle", "outcome-200",
        "json-array", "401", "redirect"])
def test_a_broken_optional_query_makes_only_that_key_unavailable(stub: StubServer, reply: Reply) -> None:
    serve_key(stub, "labResults", reply)
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("labResults",)
    assert result.record.unavailable == {"labResults"}
    assert set(result.fetched_keys) == set(PREFETCH_KEYS) - {"labResults"}
    assert result.record.patient is not None and len(result.record.conditions) == 1


@pytest.mark.parametrize("key", ["patient", "conditions"])
@pytest.mark.parametrize("reply", [Reply(500, b"boom", content_type="text/plain"),
                                   Reply(200, b"<html></html>", content_type="text/html")],
                         ids=["500", "html"])
def test_a_broken_required_query_is_412(stub: StubServer, key: str, reply: Reply) -> None:
    serve_key(stub, key, reply)
    with pytest.raises(CdsError) as err:
        gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert err.value.status == 412 and key in err.value.diagnostics


def test_server_down_is_412_quickly() -> None:
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    g = PatientDataGatherer(Settings.from_env({"fhir_allowlist": base, "fhir_deadline": DEADLINE}, environ={}))
    with pytest.raises(CdsError) as err:
        timed(g.gather, request(fhir_server=base + "/fhir"), TEMPLATES)
    assert err.value.status == 412


def test_read_timeout(stub: StubServer) -> None:
    serve_key(stub, "findings", Reply(body=searchset(), delay=0.9))  # read timeout is 0.6 s
    result, elapsed = timed(gatherer(stub).gather, no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("findings",)
    assert elapsed < 0.6 + SLACK


def test_slow_answer_past_the_deadline(stub: StubServer) -> None:
    serve_key(stub, "procedures", Reply(body=searchset(), delay=5))
    result, elapsed = timed(gatherer(stub, fhir_read_timeout=10).gather, no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("procedures",)
    assert elapsed < DEADLINE + SLACK


def test_slow_drip_past_the_deadline(stub: StubServer) -> None:
    """Every chunk arrives within the read timeout, the whole body does not within the deadline."""
    body = searchset(*(resource("MedicationRequest", f"m{i}", note=[{"text": "y" * 200}]) for i in range(40)))
    serve_key(stub, "medicationRequests", Reply(body=body, chunk_delay=0.1))
    result, elapsed = timed(gatherer(stub).gather, no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("medicationRequests",)
    assert result.record.medication_requests == ()  # no half-read data
    assert elapsed < DEADLINE + SLACK


def test_everything_slow_still_returns_at_the_deadline_with_412(stub: StubServer) -> None:
    for key in PREFETCH_KEYS:
        serve_key(stub, key, Reply(body=full_prefetch()[key], delay=3))
    started = time.monotonic()
    with pytest.raises(CdsError) as err:
        gatherer(stub, fhir_read_timeout=10).gather(no_prefetch(stub), TEMPLATES)
    assert time.monotonic() - started < DEADLINE + SLACK
    assert err.value.status == 412


def test_invalid_resources_are_skipped_not_fatal(stub: StubServer) -> None:
    serve_key(stub, "conditions", Reply(body={"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": resource("Condition", "good")},
        {"resource": {"resourceType": "Condition"}},  # no subject
        {"resource": {"resourceType": "Unknown", "subject": {"reference": "Patient/p1"}}},
        {"resource": 42},
        {"fullUrl": "no resource"},
        {"resource": resource("Condition", "theirs", patient_id="p2")},
    ]}))
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert [c["id"] for c in result.record.conditions] == ["good"]
    assert result.skipped_resources == 5 and result.failed_keys == ()


def test_bundle_with_non_list_entry_is_empty(stub: StubServer) -> None:
    serve_key(stub, "procedures", Reply(body={"resourceType": "Bundle", "entry": {"oops": 1}, "link": "x"}))
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert result.record.procedures == () and result.failed_keys == ()


def test_next_link_loop_stops(stub: StubServer) -> None:
    page1 = f"{stub.base}/fhir/Procedure?page=1"
    page2 = f"{stub.base}/fhir/Procedure?page=2"
    serve_key(stub, "procedures", Reply(body=searchset(resource("Procedure", "a"), next_url=page2)))
    stub.route("/fhir/Procedure?page=2", Reply(body=searchset(resource("Procedure", "b"), next_url=page1)))
    stub.route("/fhir/Procedure?page=1", Reply(body=searchset(resource("Procedure", "a"), next_url=page2)))
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert sorted(p["id"] for p in result.record.procedures) == ["a", "b"]
    assert len([r for r in stub.requests if r.path == "/fhir/Procedure"]) == 3


def test_page_limit_marks_the_key_incomplete(stub: StubServer) -> None:
    def endless(req) -> Reply:
        n = int(req.query.rpartition("=")[2]) if "page=" in req.query else 0
        return Reply(body=searchset(resource("Procedure", f"pr{n}"), next_url=f"{stub.base}/fhir/Procedure?page={n + 1}"))
    serve_key(stub, "procedures", endless)
    stub.route("/fhir/Procedure", endless)
    result = gatherer(stub, fhir_max_pages=3).gather(no_prefetch(stub), TEMPLATES)
    assert [p["id"] for p in result.record.procedures] == ["pr0", "pr1", "pr2"]
    assert result.failed_keys == ("procedures",)  # the rules are told it could not be fully checked
    assert len([r for r in stub.requests if r.path == "/fhir/Procedure"]) == 3


def test_huge_bundle_is_capped(stub: StubServer) -> None:
    huge = searchset(*(resource("Observation", f"o{i}", valueString="z" * 1000) for i in range(3000)))  # ~3 MB
    serve_key(stub, "findingValues", Reply(body=huge, send_length=False))
    result, elapsed = timed(gatherer(stub, fhir_max_response_bytes=1_000_000).gather, no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("findingValues",)
    assert elapsed < DEADLINE + SLACK


def test_retry_once_on_429_with_retry_after(stub: StubServer) -> None:
    answers = iter([Reply(429, b"", headers={"Retry-After": "0"}), Reply(body=searchset(resource("Procedure", "r")))])
    serve_key(stub, "procedures", lambda req: next(answers))
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert [p["id"] for p in result.record.procedures] == ["r"]
    assert result.failed_keys == () and result.fhir_calls == len(PREFETCH_KEYS) + 1


def test_only_one_retry(stub: StubServer) -> None:
    serve_key(stub, "procedures", Reply(503, b"", headers={"Retry-After": "0"}))
    result = gatherer(stub).gather(no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("procedures",)
    assert len([r for r in stub.requests if r.path == "/fhir/Procedure"]) == 2


def test_retry_after_beyond_the_deadline_is_not_awaited(stub: StubServer) -> None:
    serve_key(stub, "procedures", Reply(503, b"", headers={"Retry-After": "30"}))
    result, elapsed = timed(gatherer(stub).gather, no_prefetch(stub), TEMPLATES)
    assert result.failed_keys == ("procedures",)
    assert elapsed < DEADLINE  # did not sleep 30 s, nor until the deadline
    assert len([r for r in stub.requests if r.path == "/fhir/Procedure"]) == 1


def test_fetches_run_concurrently(stub: StubServer) -> None:
    """Nine queries of 0.25-0.4 s each: the gather takes about the slowest, not the sum (~2.8 s)."""
    delays = {key: 0.25 + 0.15 * i / (len(PREFETCH_KEYS) - 1) for i, key in enumerate(PREFETCH_KEYS)}
    for key in PREFETCH_KEYS:
        serve_key(stub, key, Reply(body=full_prefetch()[key], delay=delays[key]))
    # Generous timeouts: this test is about overlap, not timeouts (those have their own tests),
    # and it must hold on a loaded 2-core CI machine.
    result, elapsed = timed(gatherer(stub, fhir_deadline=3.0, fhir_connect_timeout=2.0, fhir_read_timeout=2.5).gather,
                            no_prefetch(stub), TEMPLATES)
    print(f"\nconcurrency: {len(PREFETCH_KEYS)} fetches, sum of delays {sum(delays.values()):.2f}s, "
          f"slowest {max(delays.values()):.2f}s, gather took {elapsed:.3f}s")
    assert result.failed_keys == () and result.fhir_calls == len(PREFETCH_KEYS)
    # Serial fetching would take at least the sum (2.92 s); overlapping takes about the slowest.
    assert max(delays.values()) <= elapsed < sum(delays.values()) / 2


def test_retry_after_header_forms() -> None:
    """Delta-seconds, an HTTP date (in the past: no wait) and junk (the caller's default)."""
    from cds_service.retry_after import retry_after_seconds

    assert retry_after_seconds("3", 0.1) == 3.0
    assert retry_after_seconds(" 0 ", 0.1) == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 0.1) == 0.0
    assert retry_after_seconds("soon", 0.1) == 0.1
    assert retry_after_seconds(None, 2.5) == 2.5
