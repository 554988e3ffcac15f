"""The shortcuts of a hook call's fixed cost (outside the engine) answer exactly what the longer
code they replace answers: each is compared here with that code, on ordinary and odd inputs."""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from typing import Any

import msgspec
import pytest
from werkzeug import Request
from werkzeug.test import EnvironBuilder

from cds_service import logs, metrics
from cds_service.http import hooks
from cds_service.http.hook_route import HookRequestObject
from cds_service.protocol import (HOOK_REQUIRED_CONTEXT, CdsError, HookContext, HookRequest, _hook_request,
                                  _plain, _require_str, parse_hook_request)
from cds_service.store import IssuedCard
from cds_service.wire import decode_hook_body

# --- the envelope's depth -----------------------------------------------------------------------


def envelope_copy_depth(body: dict[str, Any], limit: int) -> int:
    """The check as it was: a copy of the envelope (prefetch values as nulls), then its depth."""
    envelope = {k: v for k, v in body.items() if k != "prefetch"}
    if isinstance(body.get("prefetch"), dict):
        envelope["prefetch"] = dict.fromkeys(body["prefetch"])
    return hooks.json_depth(envelope, limit)


def nested(levels: int, kind: type) -> Any:
    node: Any = 1
    for _ in range(levels):
        node = {"x": node} if kind is dict else [node]
    return node


def random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth == 0 or roll < 0.3:
        return rng.choice([None, 1, "s", True, 2.5])
    if roll < 0.65:
        return {f"k{i}": random_value(rng, depth - 1) for i in range(rng.randint(0, 3))}
    return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]


BODIES: list[dict[str, Any]] = [
    {},
    {"hook": "patient-view"},
    {"prefetch": {}},
    {"prefetch": None},
    {"prefetch": [nested(10, dict)]},  # not an object: left out of the envelope
    {"prefetch": {"patient": nested(30, dict)}},  # contents never walked
    {"prefetch": {"patient": msgspec.Raw(b'{"a": 1}')}, "context": {"userId": "Practitioner/1"}},
    {"context": nested(3, dict), "extension": nested(5, list), "prefetch": {"a": None}},
    {"context": {}, "fhirAuthorization": {"scope": "x"}},
    {"a": nested(4, list), "b": nested(6, dict)},
]


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 4, 5, 6, 7, 8, 64])
def test_the_envelope_depth_judges_as_the_copied_envelope(limit: int) -> None:
    rng = random.Random(limit)
    bodies = BODIES + [{f"m{i}": random_value(rng, 8) for i in range(rng.randint(0, 5))}
                       | ({"prefetch": random_value(rng, 4)} if rng.random() < 0.5 else {})
                       for _ in range(300)]
    for body in bodies:
        expected = envelope_copy_depth(body, limit)
        got = hooks.envelope_depth(body, limit)
        assert (got > limit) == (expected > limit), body
        if expected <= limit:
            assert got == expected, body  # exact while within the limit


# --- the body's media type and length, from the environ ------------------------------------------

CONTENT_TYPES = ["application/json", "Application/JSON", "application/json; charset=utf-8",
                 "application/fhir+json;charset=UTF-8", " application/json ", "application/json;",
                 "text/plain", "", ";", "application/json, text/plain", 'application/json; x="a;b"',
                 "APPLICATION/FHIR+JSON", "multipart/form-data; boundary=x"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_the_mimetype_is_werkzeugs(content_type: str) -> None:
    environ = EnvironBuilder(method="POST", data=b"{}").get_environ()
    environ["CONTENT_TYPE"] = content_type
    assert hooks._mimetype(content_type) == Request(environ).mimetype
    hooks._mimetype.cache_clear()
    assert hooks._mimetype(content_type) == Request(environ).mimetype


@pytest.mark.parametrize("length,encoding", [
    ("2", None), (None, None), (None, "chunked"), ("2", "chunked"), ("2", "gzip, chunked"), ("2", "gzip"),
    ("abc", None), ("-3", None), (" 2 ", None), ("+2", None), ("", None),
])
def test_the_body_length_is_werkzeugs(length: str | None, encoding: str | None) -> None:
    """`read_body` reads the declared length from the environ; werkzeug's `content_length` is
    what it replaces (a declared length is read in one piece, anything else as before)."""
    environ = EnvironBuilder(method="POST", data=b"{}", content_type="application/json").get_environ()
    for key, value in (("CONTENT_LENGTH", length), ("HTTP_TRANSFER_ENCODING", encoding)):
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    expected = Request(dict(environ)).content_length
    read = hooks.read_body(Request(dict(environ, **{"wsgi.input": io.BytesIO(b"{}")})))
    if expected is not None:
        assert read == b"{}"[:expected]
    else:  # no declared length and a stream the server does not end: nothing is read
        assert read == b""


# --- the request object of the hook route --------------------------------------------------------

ENVIRONS = [
    {},
    {"QUERY_STRING": "a=1&b=%20", "SCRIPT_NAME": "/prefix/", "REMOTE_ADDR": "10.0.0.1"},
    {"PATH_INFO": "//cds-services/x", "REQUEST_METHOD": "post"},
    {"PATH_INFO": "/caf\xc3\xa9", "SERVER_PORT": "not-a-port"},
    {"SERVER_NAME": None, "wsgi.url_scheme": "https", "HTTP_HOST": "ehr.example.org:8443"},
    {"PATH_INFO": "", "SCRIPT_NAME": "", "QUERY_STRING": "", "REQUEST_METHOD": "GET"},
]

ATTRIBUTES = ("method", "scheme", "server", "root_path", "path", "query_string", "remote_addr", "url",
              "host", "full_path", "content_length", "mimetype", "args", "is_secure")


@pytest.mark.parametrize("changes", ENVIRONS)
def test_the_hook_routes_request_reads_as_werkzeugs(changes: dict[str, Any]) -> None:
    environ = EnvironBuilder(path="/cds-services/x", method="POST", data=b'{"a": 1}',
                             content_type="application/json").get_environ()
    for key, value in changes.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    reference = Request(dict(environ, **{"wsgi.input": io.BytesIO(b'{"a": 1}')}))
    lazy = HookRequestObject(dict(environ, **{"wsgi.input": io.BytesIO(b'{"a": 1}')}))
    for name in ATTRIBUTES:
        assert getattr(lazy, name) == getattr(reference, name), name
        assert getattr(lazy, name) == getattr(lazy, name)  # kept, and the same when read again
    assert list(lazy.headers.items()) == list(reference.headers.items())
    assert lazy.get_data() == reference.get_data() == b'{"a": 1}'
    assert lazy.environ["werkzeug.request"] is lazy
    lazy.path = "/changed"  # an attribute can still be set, as on werkzeug's request
    assert lazy.path == "/changed"


# --- the parse's shortcuts -------------------------------------------------------------------------

STRINGS = ["x", "Practitioner/1", " x", "\tx", "\u00a0", "\u3000x", "", " ", "~" * 64, "~" * 65, "!",
           "\x7f", "é", "x" * 129, 42, None, True, ["x"], {"x": 1}]


class StrSub(str):
    pass


@pytest.mark.parametrize("max_len", [1, 64, 128])
def test_a_plain_string_is_one_require_str_accepts_as_is(max_len: int) -> None:
    accepted = []
    for value in [*STRINGS, StrSub("x")]:
        if _plain(value, max_len):
            assert _require_str({"k": value}, "k", "", max_len=max_len) is value
            accepted.append(value)
    assert "x" in accepted and " x" not in accepted and "" not in accepted and 42 not in accepted


def reference_parse(body: Any, hook: str) -> HookRequest:
    """What `parse_hook_request` built before its shortcuts: every string through `_require_str`,
    the dataclasses through their own constructors."""
    request = parse_hook_request(body, hook)
    context = request.context
    for where, obj, key, max_len in [("", body, "hookInstance", 128), ("context.", body["context"], "userId", 256),
                                     ("context.", body["context"], "patientId", 64)]:
        assert _require_str(obj, key, where, max_len=max_len) == obj[key]
    return HookRequest(hook=request.hook, hook_instance=request.hook_instance,
                       context=HookContext(user_id=context.user_id, patient_id=context.patient_id,
                                           encounter_id=context.encounter_id,
                                           draft_orders=context.draft_orders, selections=context.selections),
                       fhir_server=request.fhir_server, fhir_authorization=request.fhir_authorization,
                       prefetch=request.prefetch)


def outcome(body: Any, hook: str = "patient-view") -> tuple[str, Any]:
    try:
        return "ok", parse_hook_request(body, hook)
    except CdsError as err:
        return "error", (err.status, err.diagnostics, err.expression)


BASE = {"hook": "patient-view", "hookInstance": "h-1", "context": {"userId": "Practitioner/1", "patientId": "p1"}}


@pytest.mark.parametrize("value", STRINGS)
@pytest.mark.parametrize("where", ["hook", "hookInstance", "fhirServer", "userId", "patientId", "encounterId"])
def test_the_parse_answers_every_string_as_require_str_does(where: str, value: Any) -> None:
    """Each field's answer (accepted, or the 400 and its wording) is `_require_str`'s: the
    shortcut only skips it for values it accepts unchanged."""
    body = {**BASE, "context": dict(BASE["context"])}
    target = body["context"] if where in ("userId", "patientId", "encounterId") else body
    target[where] = value
    kind, result = outcome(body)
    max_len = {"hook": 128, "hookInstance": 128, "fhirServer": 2048, "userId": 256}.get(where, 64)
    prefix = "context." if target is not body else ""
    try:
        checked = _require_str(target, where, prefix, max_len=max_len,
                               required=where not in ("fhirServer", "encounterId"))
    except CdsError as err:
        assert (kind, result) == ("error", (err.status, err.diagnostics, err.expression))
        return
    if kind == "ok":
        assert result == reference_parse(body, "patient-view")
        field = {"hook": result.hook, "hookInstance": result.hook_instance, "userId": result.context.user_id,
                 "patientId": result.context.patient_id, "encounterId": result.context.encounter_id,
                 "fhirServer": result.fhir_server}[where]
        assert field == (checked.rstrip("/") if where == "fhirServer" and checked else checked)
    else:  # a later check refused the value `_require_str` accepted (a FHIR id, a URL, the hook)
        assert result[0] == 400


def test_the_parse_builds_what_the_dataclass_constructors_build() -> None:
    from cds_service.protocol import FhirAuthorization

    context = HookContext("Practitioner/1", "p1", "e1", None, ())
    auth = FhirAuthorization(access_token="t", scope="s", subject="x")
    fast = _hook_request("patient-view", "h", context, "https://fhir", auth, {"a": None})
    plain = HookRequest(hook="patient-view", hook_instance="h", context=context, fhir_server="https://fhir",
                        fhir_authorization=auth, prefetch={"a": None})
    assert fast == plain and repr(fast) == repr(plain) and hash(fast.context) == hash(plain.context)
    assert list(vars(fast)) == [f.name for f in dataclasses.fields(HookRequest)] == list(vars(plain))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.hook = "order-sign"  # type: ignore[misc]
    # HookContext and IssuedCard are built positionally on the hot path: their field orders.
    assert [f.name for f in dataclasses.fields(HookContext)] == [
        "user_id", "patient_id", "encounter_id", "draft_orders", "selections"]
    assert [f.name for f in dataclasses.fields(IssuedCard)] == [
        "card_uuid", "kind", "suggestion_uuids", "delivery", "situation", "withheld_by"]
    assert IssuedCard("c", "k") == IssuedCard(card_uuid="c", kind="k", suggestion_uuids=(), delivery="shown")
    with pytest.raises(dataclasses.FrozenInstanceError):
        IssuedCard("c", "k").kind = "other"  # type: ignore[misc]
    assert set(HOOK_REQUIRED_CONTEXT) == {"patient-view", "order-select", "order-sign"}


@pytest.mark.parametrize("value", [None, {}, {"resourceType": "Patient"}, msgspec.Raw(b"{}"), [], "x", 1, 0.5, True])
def test_prefetch_values_are_judged_as_before(value: Any) -> None:
    body = {**BASE, "prefetch": {"patient": value, "conditions": None}}
    kind, result = outcome(body)
    allowed = value is None or isinstance(value, dict) or type(value) is msgspec.Raw
    assert kind == ("ok" if allowed else "error")
    lazy = decode_hook_body(b'{"hook": "patient-view", "hookInstance": "h", "context": {"userId": "Practitioner/1",'
                            b' "patientId": "p"}, "prefetch": {"conditions": {"resourceType": "Bundle", "entry": []},'
                            b' "patient": {"resourceType": "Patient"}}}')
    assert lazy is not None and outcome(lazy)[0] == "ok"


# --- the log line ----------------------------------------------------------------------------------


def reference_line_fields(attributes: dict[str, Any]) -> dict[str, Any]:
    return {name: attributes[name] for name in logs.ALLOWED_FIELDS if attributes.get(name) is not None}


def test_the_log_line_writes_the_allowed_fields_present_in_their_order() -> None:
    import orjson

    formatter = logs.JsonFormatter()
    rng = random.Random(7)
    names = [*logs.ALLOWED_FIELDS, "token", "patient_id", "msg", "args"]
    for _ in range(300):
        attributes = {name: rng.choice([None, 1, "v", ["a"]]) for name in rng.sample(names, rng.randint(0, len(names)))}
        line = orjson.loads(formatter.line(1.7e9, 5.0, "INFO", "cds_service.hooks", "hook", attributes))
        assert list(line)[:4] == ["ts", "level", "logger", "msg"]
        assert {k: line[k] for k in list(line)[4:]} == reference_line_fields(attributes)
        assert list(line)[4:] == list(reference_line_fields(attributes))


def test_the_hook_line_is_flushed_as_the_handler_flushes_it(client: Any) -> None:
    """The sole-handler shortcut flushes the stream itself (StreamHandler.flush without its
    second lock): once per line, after the whole line.  (tests/test_logs.py compares its text
    with the record path's.)"""
    from tests.test_logs import SoleJsonHandler

    class Counting(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())
            super().flush()

    logger = logs.get_logger("hooks")
    with SoleJsonHandler() as sole:
        stream = Counting()
        sole.handler.setStream(stream)
        logs.write_event(logger, logging.INFO, "hook", {"event": "hook", "status": 200, "token": "secret"})
        assert len(stream.flushed) == 1 and stream.flushed[0] == stream.getvalue()
        assert stream.getvalue().endswith("\n") and '"status":200' in stream.getvalue()
        assert "secret" not in stream.getvalue()


# --- the card counters -----------------------------------------------------------------------------


def test_the_card_counters_are_the_labelled_children() -> None:
    hooks._cards_counter.cache_clear()
    assert hooks._cards_counter("b12-test", "shown") is metrics.CARDS_ISSUED.labels("b12-test")
    assert hooks._cards_counter("b12-test", "silent") is metrics.CARDS_WITHHELD.labels("b12-test", "silent")
    assert hooks._cards_counter("b12-test", "locked-out") is metrics.CARDS_WITHHELD.labels("b12-test", "locked-out")
