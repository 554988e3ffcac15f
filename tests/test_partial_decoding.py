"""Partial decoding (cds_service.wire) and the resource gate (facts.resource_needed) change
nothing a hook call answers: the same cards, the same errors, the same facts, as a full parse of
every resource.

The reference is the former path: `orjson.loads` of the whole body and every resource given to
the facts.  It is still what runs when the fast decoder declines a body, so forcing it (by making
`wire.decode_hook_body` decline, and giving the gatherer no gate) is an exact A/B.
"""

from __future__ import annotations

import json
import re
import tempfile
from datetime import datetime, timezone
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service import create_app, facts, wire
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.protocol import parse_hook_request
from cds_service.record import PREFETCH_KEYS, PatientRecord
from tests import ehr_shapes
from tests.test_hook_fuzz import json_values, resources as junk_resources

ENGINE = ClinicalEngine.load(Settings())
NOW = datetime(2025, 6, 15, 12, tzinfo=timezone.utc)
RUN = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def materialise(value: Any) -> Any:
    """A decoded body with every raw value decoded in full (what the full parse gives; of a
    `LazyBundle`, the members it keeps: see `bundle_members`)."""
    if isinstance(value, wire.LazyBundle):
        return {"resourceType": "Bundle", "entry": [value.resource(i) for i in range(len(value.raws))],
                "link": value.link}
    if wire.is_raw(value):
        return orjson.loads(memoryview(value))
    if isinstance(value, dict):
        return {k: materialise(v) for k, v in value.items()}
    return value


def bundle_members(full: Any, decoded: Any) -> Any:
    """`full` (a fully parsed body) with each prefetch Bundle that `decoded` holds as a
    `LazyBundle` cut down to what one keeps: its entries' resources and its link."""
    prefetch = decoded.get("prefetch") if isinstance(decoded, dict) else None
    if not isinstance(prefetch, dict):
        return full
    cut = dict(full["prefetch"])
    for key, value in prefetch.items():
        if isinstance(value, wire.LazyBundle):
            entries = cut[key].get("entry") or []
            cut[key] = {"resourceType": "Bundle", "entry": [e.get("resource") for e in entries],
                        "link": cut[key].get("link")}
    return {**full, "prefetch": cut}


def _without_nulls(value: Any) -> Any:
    """What a typed head keeps of a value: nulls dropped from objects (struct fields left unset),
    members outside the typed shape (a coding's `version`...) dropped too."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def bundle(resources: list[Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


# --- the envelope ------------------------------------------------------------------------------

members = st.dictionaries(
    st.sampled_from(["hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "extension",
                     "prefetch", "unknownMember"]),
    json_values, max_size=6)
prefetch_values = st.dictionaries(st.sampled_from(PREFETCH_KEYS), st.one_of(
    st.none(), json_values, junk_resources, st.lists(junk_resources, max_size=4).map(bundle)), max_size=5)


@RUN
@given(body=members, prefetch=st.one_of(st.none(), prefetch_values), indent=st.booleans())
def test_decoded_body_is_the_full_parse_with_raw_values(body: dict, prefetch: Any, indent: bool) -> None:
    if prefetch is not None:
        body = {**body, "prefetch": prefetch}
    raw = json.dumps(body, indent=2 if indent else None).encode()  # Infinity, 2**64 and all
    decoded = wire.decode_hook_body(raw)
    try:
        full = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert decoded is None  # declined: the full parse answers its 400
        return
    assert decoded is not None
    assert materialise(decoded) == bundle_members(full, decoded)
    for value in (decoded.get("prefetch") or {}).values() if isinstance(decoded.get("prefetch"), dict) else ():
        assert not wire.is_raw(value) or isinstance(value, wire.LazyBundle) \
            or bytes(value).startswith(b"{")  # raw only for objects


search_keys = [k for k in PREFETCH_KEYS if k != "patient"]


@RUN
@given(values=st.dictionaries(st.sampled_from(search_keys), st.one_of(
           st.none(), st.lists(junk_resources, max_size=4).map(bundle))),
       patient=st.one_of(st.none(), json_values, junk_resources), indent=st.booleans())
def test_search_keys_holding_bundles_are_read_in_one_pass(values: dict, patient: Any, indent: bool) -> None:
    """The common body (search keys holding Bundles or null) is read in one pass: each Bundle
    arrives as a `LazyBundle`, the patient's value as it would on the other path."""
    prefetch = values if patient is None else {"patient": patient, **values}
    raw = json.dumps({"hook": "patient-view", "prefetch": prefetch}, indent=2 if indent else None).encode()
    decoded = wire.decode_hook_body(raw)
    try:
        full = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert decoded is None
        return
    assert materialise(decoded) == bundle_members(full, decoded)
    assert all(isinstance(decoded["prefetch"][k], wire.LazyBundle) for k, v in values.items() if v is not None)
    assert ("patient" in decoded["prefetch"]) is ("patient" in prefetch)


@pytest.mark.parametrize("value", [
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
    {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}},
    {"resourceType": "Bundle", "entry": [{"resource": {}}, 7]},
    {"resourceType": "Bundle", "entry": {"resource": {}}},
    "text", 7, [],
])
def test_a_search_key_without_a_bundle_is_read_the_other_way(value: Any) -> None:
    """A search key's value that the one-pass decoder cannot keep (not a Bundle, or a Bundle it
    cannot cut into entries) sends the body to the other decoder: the value arrives raw (or
    decoded, when it is not an object), as the full parse reads it."""
    body = {"hook": "patient-view", "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"},
                                                 "conditions": {"resourceType": "Bundle", "entry": []},
                                                 "labResults": value}}
    decoded = wire.decode_hook_body(json.dumps(body).encode())
    assert decoded is not None and materialise(decoded) == body
    assert not isinstance(decoded["prefetch"]["labResults"], wire.LazyBundle)
    opened = {"prefetch": {k: wire.open_prefetch_value(v) if type(v) is wire.RawJson else v
                           for k, v in decoded["prefetch"].items()}}
    assert materialise(opened) == bundle_members({"prefetch": body["prefetch"]}, opened)


def test_repeated_members_read_as_the_full_parse_reads_them() -> None:
    """The last copy of a repeated member wins in both decoders, as in orjson."""
    raw = (b'{"hook": "a", "hook": "patient-view", "prefetch": {"conditions": {"resourceType": "Bundle",'
           b' "entry": [{"resource": {"id": "1"}}]}, "conditions": {"resourceType": "Bundle", "entry":'
           b' [{"resource": {"id": "2"}, "resource": {"id": "3"}}], "entry": [{"resource": {"id": "4"}}]},'
           b' "patient": {"id": "x"}, "patient": null}}')
    decoded = wire.decode_hook_body(raw)
    assert materialise(decoded) == bundle_members(orjson.loads(raw), decoded)
    assert decoded["hook"] == "patient-view" and decoded["prefetch"]["patient"] is None
    assert decoded["prefetch"]["conditions"].resource(0) == {"id": "4"}


@pytest.mark.parametrize("raw", [
    b"[1, 2]", b'"text"', b"", b"{", b'{"hook": "patient-view",}',
    b'{"hook": "x", "prefetch": {"conditions": {"resourceType": "Bundle", "entry": [{"resource": '
    b'{"resourceType": "Observation", "note": [{"text": "caf\xe9"}]}}]}}}',  # Latin-1, not UTF-8
    b'{"hook": "x", "prefetch": {"a": {"text": "\xed\xa0\x80"}}}',  # an encoded surrogate
    b'{"prefetch": ' + b"[" * 3000 + b"]" * 3000 + b"}",
])
def test_bodies_the_full_parse_refuses_are_declined(raw: bytes) -> None:
    """Declined bodies go to the full parse, which answers the usual 400 (or reads them)."""
    assert wire.decode_hook_body(raw) is None or raw.startswith(b"{")
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        assert wire.decode_hook_body(raw) is None


def test_utf8_bodies_are_taken() -> None:
    body = {"hook": "patient-view", "prefetch": {"patient": {"resourceType": "Patient", "name": [{"family": "Müller"}]}}}
    decoded = wire.decode_hook_body(json.dumps(body, ensure_ascii=False).encode())
    assert decoded is not None and materialise(decoded) == body


# --- Bundles: heads and resources ---------------------------------------------------------------

entries = st.one_of(
    st.fixed_dictionaries({"resource": st.one_of(junk_resources, json_values)}),
    st.fixed_dictionaries({"fullUrl": st.text(max_size=5)}),
    junk_resources.map(lambda r: {"resource": r, "search": {"mode": "match"}}))


@RUN
@given(items=st.lists(entries, max_size=6), link=st.one_of(st.none(), json_values))
def test_lazy_bundle_gives_every_resource_and_its_head(items: list[dict], link: Any) -> None:
    value = {"resourceType": "Bundle", "entry": items}
    if link is not None:
        value["link"] = link
    body = json.dumps({"prefetch": {"k": value}}).encode()
    try:
        value = orjson.loads(body)["prefetch"]["k"]  # what the full parse reads (2**64 as a float...)
    except orjson.JSONDecodeError:
        return  # Infinity: the whole body is declined (test above)
    raw = wire.decode_hook_body(body)["prefetch"]["k"]  # an unknown key: kept raw, opened by the gatherer
    one_pass = wire.decode_hook_body(body.replace(b'"k"', b'"conditions"'))["prefetch"]["conditions"]
    for opened in (wire.open_prefetch_value(raw), one_pass):
        assert isinstance(opened, wire.LazyBundle)
        assert opened.link == value.get("link")
        assert len(opened.heads) == len(items)
        for i, item in enumerate(value["entry"]):
            full = item.get("resource")
            assert opened.resource(i) == full
            head = opened.heads[i]
            if isinstance(head, dict):
                assert head == {k: full[k] for k in facts.HEAD_FIELDS if k in full}
            elif head is not None:
                assert_typed_head_matches(head, full)
            else:
                assert not isinstance(full, dict)  # only a resource that is not an object has none


def assert_typed_head_matches(head: wire.Head, full: dict) -> None:
    """A typed head says what the resource says: type, id, patient references, and the gate."""
    assert head.resourceType == full.get("resourceType") and head.id == full.get("id")
    for name in ("subject", "patient"):
        assert (getattr(head, name).reference if getattr(head, name) else None) == \
            (full.get(name) or {}).get("reference")
    assert ENGINE.resource_needed(head) == ENGINE.resource_needed(full)


@RUN
@given(resources=ehr_shapes.patients("p1"))
def test_ehr_shaped_bundles_get_typed_heads(resources: list[dict]) -> None:
    opened = wire.decode_hook_body(json.dumps({"prefetch": {"labResults": bundle(resources)}}).encode())[
        "prefetch"]["labResults"]
    assert isinstance(opened, wire.LazyBundle) and all(isinstance(h, wire.Head) for h in opened.heads)
    for i, full in enumerate(resources):
        assert opened.resource(i) == full
        assert_typed_head_matches(opened.heads[i], full)


def test_a_resource_the_full_parse_refuses_is_a_400_only_when_read() -> None:
    """1e999 is JSON grammar that orjson refuses: inside a resource the rules read it is the
    400 it always was; inside one they never read, the call is answered."""
    app = create_app({"auth_disabled": True, "data_dir": tempfile.mkdtemp(prefix="cds-lazy-")})
    client = app.test_client()

    def call(extra: str) -> Any:
        body = ('{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1",'
                ' "patientId": "p1"}, "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"},'
                ' "conditions": {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition",'
                ' "subject": {"reference": "Patient/p1"}, ' + extra + '}}]}}}')
        return client.post("/cds-services/b12-neck-pain-patient-view", data=body, content_type="application/json")

    read = call('"code": {"coding": [{"system": "http://snomed.info/sct", "code": "81680005"}]}, "x": 1e999')
    assert read.status_code == 400 and "not valid JSON" in read.get_json()["issue"][0]["diagnostics"]
    unread = call('"code": {"text": "knee pain"}, "x": 1e999')
    assert unread.status_code == 200


# --- the gate: same facts -----------------------------------------------------------------------

@RUN
@given(resources=ehr_shapes.patients("p1"), noise=st.lists(junk_resources, max_size=4))
def test_the_gate_keeps_every_resource_the_facts_use(resources: list[dict], noise: list[dict]) -> None:
    everything = resources + noise
    needed = ENGINE.resource_needed
    kept = [r for r in everything if not isinstance(r, dict) or needed(r)]
    context = parse_hook_request({"hook": "patient-view", "hookInstance": "x", "context": {
        "userId": "Practitioner/1", "patientId": "p1"}}, "patient-view").context
    full = facts.derive_facts(PatientRecord.from_resources(everything), context, ENGINE.knowledge,
                              ENGINE.settings, NOW)
    gated = facts.derive_facts(PatientRecord.from_resources(kept), context, ENGINE.knowledge,
                               ENGINE.settings, NOW)
    assert gated == full
    for res in everything:  # the head alone decides as the whole resource does, typed or not
        if isinstance(res, dict):
            assert needed({k: res[k] for k in facts.HEAD_FIELDS if k in res}) == needed(res)
            try:
                typed = msgspec.json.decode(json.dumps(res).encode(), type=wire.Head)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue  # another JSON type in a head field: such a resource gets a dict head
            assert needed(typed) == needed(res), res
            assert ENGINE.head_needed(typed) == needed(res), res


def test_typed_heads_name_the_head_fields() -> None:
    assert wire.Head.__struct_fields__ == facts.HEAD_FIELDS


# --- whole hook calls: lazy path vs full path ---------------------------------------------------

@pytest.fixture(scope="module")
def clients() -> Any:
    data = tempfile.TemporaryDirectory(prefix="cds-lazy-ab-")
    app = create_app({"auth_disabled": True, "data_dir": data.name})
    yield app.test_client()
    data.cleanup()


def _answer(client: Any, raw: bytes, *, full: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[int, bytes]:
    with monkeypatch.context() as patch:
        if full:
            patch.setattr(wire, "decode_hook_body", lambda raw: None)
            engine = client.application.extensions["cds"].engine
            patch.setattr(engine, "resource_needed", None, raising=False)
            patch.setattr(engine, "head_needed", None, raising=False)
        resp = client.post("/cds-services/b12-neck-pain-patient-view", data=raw, content_type="application/json")
    return resp.status_code, _UUID.sub(b"<uuid>", resp.get_data())


@RUN
@given(resources=ehr_shapes.patients("p1"), junk=st.lists(junk_resources, max_size=3),
       split=st.integers(0, 3))
def test_hook_answers_are_the_same_on_both_paths(clients: Any, monkeypatch: pytest.MonkeyPatch,
                                                 resources: list[dict], junk: list[dict], split: int) -> None:
    patient, rest = resources[0], resources[1:] + junk
    prefetch: dict[str, Any] = {"patient": patient}
    keys = [k for k in PREFETCH_KEYS if k != "patient"]
    for i, key in enumerate(keys):  # resources spread over the keys (EHRs ignore the filters)
        prefetch[key] = bundle(rest[i::len(keys)]) if split else (bundle(rest) if i == 0 else None)
    body = {"hook": "patient-view", "hookInstance": "ab", "context": {"userId": "Practitioner/1", "patientId": "p1"},
            "prefetch": prefetch}
    raw = json.dumps(body).encode()  # 2**64 and Infinity too: both paths see the same bytes
    assert _answer(clients, raw, full=False, monkeypatch=monkeypatch) == \
        _answer(clients, raw, full=True, monkeypatch=monkeypatch)


BROKEN = [
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": "not a resource"}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": null}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": [1]}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": {"resourceType": "Bundle",'
    b' "entry": [{"resource": "text"}, 7, {"resource": {"resourceType": "Condition"}}]}}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": {"resourceType": "Bundle",'
    b' "entry": {"resource": {}}}}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": {"resourceType": "Bundle",'
    b' "entry": [{"resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},'
    b' "code": {"coding": [{"system": "http://snomed.info/sct", "code": 81680005}]}}}]}}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "extra": {"deep": ' + b"[" * 80 + b"]" * 80 + b'}, "prefetch": {}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": {"resourceType": "Bundle",'
    b' "entry": [{"resource": {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}, '
    b'"code": {"text": "neck pain"}, "note": ' + b"[" * 900 + b"]" * 900 + b'}}]}}}',
    b'{"hook": "patient-view", "hookInstance": "x", "context": {"userId": "Practitioner/1", "patientId": "p1"},'
    b' "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}}, "prefetch": {"patient": null}}',
]


@pytest.mark.parametrize("raw", BROKEN)
def test_odd_and_broken_bodies_get_the_same_answer_on_both_paths(clients: Any, monkeypatch: pytest.MonkeyPatch,
                                                                 raw: bytes) -> None:
    lazy = _answer(clients, raw, full=False, monkeypatch=monkeypatch)
    assert lazy == _answer(clients, raw, full=True, monkeypatch=monkeypatch)
    assert lazy[0] in (200, 400, 412)
