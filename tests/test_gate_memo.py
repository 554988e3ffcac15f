"""The gate memo (cds_service.gate_memo) changes no decision: a chart read through it gives the
gatherer exactly the record, the counts and the errors it gives without it, however often the
chart is sent and whoever else's chart shares its resources; it is bounded, keeps no clinical
content, and spares the head decodes it is for.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service import wire
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.gate_memo import GateMemo, GateVerdict
from cds_service.patient_data import GatherResult, PatientDataGatherer
from cds_service.protocol import CdsError, parse_hook_request
from cds_service.record import PREFETCH_KEYS
from tests import ehr_shapes
from tests.test_hook_fuzz import resources as junk_resources

ENGINE = ClinicalEngine.load(Settings())
RUN = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SEARCH_KEYS = [k for k in PREFETCH_KEYS if k != "patient"]


def gatherer(entries: int) -> PatientDataGatherer:
    return PatientDataGatherer(Settings(gate_memo_entries=entries))


def body(patient_id: str, patient: dict[str, Any], rest: list[Any], split: bool) -> bytes:
    prefetch: dict[str, Any] = {"patient": patient}
    for i, key in enumerate(SEARCH_KEYS):  # EHRs ignore the filters: resources spread over keys
        part = rest[i::len(SEARCH_KEYS)] if split else (rest if i == 0 else [])
        prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in part]}
    return json.dumps({"hook": "patient-view", "hookInstance": "memo",
                       "context": {"userId": "Practitioner/1", "patientId": patient_id},
                       "prefetch": prefetch}).encode()


def gather(g: PatientDataGatherer, raw: bytes) -> GatherResult | tuple[int, str]:
    """What the gatherer makes of one hook call's body (the error, if it refuses it)."""
    decoded = wire.decode_hook_body(raw)
    if decoded is None:  # a body the fast reader declines (Infinity...): the full parse, as the hook path does
        try:
            decoded = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return 400, "invalid JSON"
    request = parse_hook_request(decoded, "patient-view", max_string_length=4096)
    try:
        return g.gather(request, g.prefetch_templates("patient-view", ENGINE),
                        needed=ENGINE.resource_needed, needed_head=ENGINE.head_needed)
    except CdsError as err:
        return err.status, str(err)


def other_patients_copy(resource: Any) -> Any:
    """`resource` as another patient's chart would hold it, or with its subject in another form."""
    if not isinstance(resource, dict) or "subject" not in resource:
        return resource
    return {**resource, "subject": {"reference": "https://ehr.example/fhir/Patient/p1/_history/2"}}


@RUN
@given(resources=ehr_shapes.patients("p1"), junk=st.lists(junk_resources, max_size=4),
       split=st.booleans(), moved=st.integers(0, 3))
def test_a_chart_read_through_the_memo_gives_what_it_gives_without(
        resources: list[dict], junk: list[Any], split: bool, moved: int) -> None:
    patient, rest = resources[0], resources[1:] + junk
    # some resources with the subject as an absolute, versioned reference (not remembered)
    rest = [other_patients_copy(r) if i % 4 == moved else r for i, r in enumerate(rest)]
    raw = body("p1", patient, rest, split)
    expected = gather(gatherer(0), raw)
    remembering = gatherer(4096)
    for sight in range(3):  # first sight, second (fills the memo), third (reads through it)
        assert gather(remembering, raw) == expected, sight
    # The same resources in another patient's call: none of p1's is taken for p2's.
    assert gather(remembering, body("p2", {"resourceType": "Patient", "id": "p2"}, rest, split)) == \
        gather(gatherer(0), body("p2", {"resourceType": "Patient", "id": "p2"}, rest, split))


@RUN
@given(resources=ehr_shapes.patients("p1"), entries=st.integers(1, 12))
def test_a_small_memo_stays_within_its_bound_and_decides_the_same(resources: list[dict], entries: int) -> None:
    raw = body("p1", resources[0], resources[1:], split=True)
    expected = gather(gatherer(0), raw)
    g = gatherer(entries)
    for _ in range(4):
        assert gather(g, raw) == expected
        assert len(g.gate_memo) <= entries


def labs(n: int) -> list[dict[str, Any]]:
    """`n` vital-sign Observations of p1 (no rule reads them) and one B12 result."""
    out: list[dict[str, Any]] = [{
        "resourceType": "Observation", "id": f"bp{i}", "status": "final",
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": f"2025-01-{1 + i % 28:02d}",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
        "valueQuantity": {"value": 120 + i, "unit": "mm[Hg]"}} for i in range(n)]
    out.append({"resourceType": "Observation", "id": "b12", "status": "final",
                "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2025-03-01",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9", "display": "Cobalamin"}]},
                "valueQuantity": {"value": 140, "unit": "pg/mL"}})
    return out


def test_a_chart_seen_once_is_not_remembered_and_a_repeated_one_is_read_without_heads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = body("p1", {"resourceType": "Patient", "id": "p1"}, labs(40), split=False)
    g = gatherer(4096)
    decodes = []

    class CountingDecoder:
        def decode(self, raw: Any) -> wire.Head:
            decodes.append(1)
            return real.decode(raw)

    real = wire.HEAD_DECODER
    monkeypatch.setattr(wire, "HEAD_DECODER", CountingDecoder())
    first = gather(g, raw)
    assert len(g.gate_memo) == 0 and len(decodes) == 41  # seen once: one hash per Bundle, no entries
    assert gather(g, raw) == first and len(g.gate_memo) == 41 and len(decodes) == 82
    assert gather(g, raw) == first and len(decodes) == 82  # read through the memo: no head decoded
    assert isinstance(first, GatherResult)
    assert [o["id"] for o in first.record.observations] == ["b12"]  # the one lab the rules read


def test_the_memo_keeps_no_clinical_content() -> None:
    g = gatherer(4096)
    raw = body("p1", {"resourceType": "Patient", "id": "p1"}, labs(5), split=False)
    for _ in range(2):
        gather(g, raw)
    verdicts = list(g.gate_memo._verdicts.values())
    assert len(verdicts) == 6
    for verdict in verdicts:  # what each holds: the length, type, id, subject reference and verdict
        assert type(verdict.length) is int and type(verdict.needed) is bool
        assert verdict.resource_type == "Observation" and verdict.subject_reference == "Patient/p1"
        assert verdict.resource_id in {f"bp{i}" for i in range(5)} | {"b12"}
    assert sorted(v.resource_id for v in verdicts if v.needed) == ["b12"]


def test_a_verdict_is_used_only_for_bytes_of_its_length() -> None:
    memo = GateMemo(8)
    memo.put(123, GateVerdict(10, "Observation", "x", "Patient/p1", False))
    assert memo.get(123, 10) is not None
    assert memo.get(123, 11) is None  # another resource with a colliding hash: judged afresh
    assert memo.get(124, 10) is None


def test_the_memo_forgets_another_gates_answers_and_can_be_off() -> None:
    memo = GateMemo(8)
    memo.bind(ENGINE.head_needed)
    memo.put(1, GateVerdict(1, "Observation", None, "Patient/p1", True))
    memo.bind(ENGINE.head_needed)
    assert len(memo) == 1
    memo.bind(lambda head: True)
    assert len(memo) == 0
    assert not GateMemo(0).enabled and GateMemo(1).enabled
    off = gatherer(0)
    raw = body("p1", {"resourceType": "Patient", "id": "p1"}, labs(3), split=False)
    for _ in range(3):
        gather(off, raw)
    assert len(off.gate_memo) == 0


def test_a_remembered_resource_that_is_not_valid_json_after_all_is_still_a_400() -> None:
    # msgspec reads the head of this resource; orjson (the full parse) refuses 1e999 when the
    # rules need the resource: both with and without the memo, on every sight.
    lab = ('{"resourceType": "Observation", "id": "b12", "status": "final", "subject": {"reference": "Patient/p1"},'
           ' "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}, "valueQuantity": {"value": 1e999}}')
    raw = (b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
           b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "labResults": {"resourceType": "Bundle",'
           b' "entry": [{"resource": ' + lab.encode() + b'}]}}}')
    expected = gather(gatherer(0), raw)
    assert isinstance(expected, tuple) and expected[0] == 400
    g = gatherer(64)
    for _ in range(3):
        assert gather(g, raw) == expected
