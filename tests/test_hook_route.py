"""The hook route ahead of Flask (`cds_service.http.hook_route`) answers every hook call exactly
as Flask's view and error handlers do: the same status line, header list (order included), body
(card uuids aside), log lines and Prometheus counts, for each kind of answer.  Flask's view stays
registered; the app's WSGI stack without the route reaches it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flask
import pytest
from prometheus_client import REGISTRY
from werkzeug.test import Client

from cds_service.http.errors import AnswerHeaders
from cds_service.http.hook_route import HookRoute
from cds_service.logs import ALLOWED_FIELDS
from tests.jwt_helpers import make_issuer, trusted_issuers_json, write_jwks
from tests.log_capture import service_log  # noqa: F401 (fixture)

PV = "/cds-services/b12-neck-pain-patient-view"
EXAMPLE = (Path(__file__).resolve().parents[1] / "docs" / "examples" / "patient-view.json").read_bytes()
ORIGIN = "https://ehr.example.org"
MAX_BODY = 8192
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HOOK = {"hook": "patient-view", "hookInstance": "h-route", "prefetch": {"patient": None},
        "context": {"userId": "Practitioner/1", "patientId": "p"}}
JSON = "application/json"


@dataclass
class Case:
    label: str
    request: Callable[[], dict[str, Any]]
    """The test client's `open` arguments (a function: a token is minted per call)."""
    environ: dict[str, Any] = field(default_factory=dict)
    """Set in the WSGI environ as a server would (None removes the key)."""


def case(label: str, environ: dict[str, Any] | None = None, **request: Any) -> Case:
    request.setdefault("method", "POST")
    request.setdefault("path", PV)
    return Case(label, lambda: dict(request), environ or {})


def body(**changes: Any) -> bytes:
    import orjson

    return orjson.dumps({**HOOK, **changes})


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(levels):
        node["x"] = node = {}
    return root


CASES = [
    case("cards", data=EXAMPLE, content_type=JSON, headers={"Origin": ORIGIN}),
    case("cards, fhir+json, other origin", data=EXAMPLE, content_type="application/fhir+json; charset=utf-8",
         headers={"Origin": "https://elsewhere.example.com"}),
    case("cards, unknown fields tolerated", content_type=JSON,
         data=EXAMPLE[:-2] + b', "unknownField": {"a": [1]}}'),
    case("cards, query string", path=PV + "?x=1", data=EXAMPLE, content_type=JSON),
    case("cards, chunked", {"CONTENT_LENGTH": None, "wsgi.input_terminated": True},
         data=EXAMPLE, content_type=JSON),
    case("412 data not obtained", data=body(), content_type=JSON, headers={"Origin": ORIGIN}),
    case("400 malformed JSON", data=b'{"hook": ', content_type=JSON, headers={"Origin": ORIGIN}),
    case("400 empty body", data=b"", content_type=JSON),
    case("400 not an object", data=b"[1, 2]", content_type=JSON),
    case("400 wrong type", data=body(context="oops"), content_type=JSON),
    case("400 wrong field type", data=body(hookInstance=42), content_type=JSON),
    case("400 missing field", data=body(context={"userId": "Practitioner/1"}), content_type=JSON),
    case("400 other hook", data=body(hook="order-sign"), content_type=JSON),
    case("400 too deep", data=body(context={**HOOK["context"], "extension": deep(70)}), content_type=JSON),
    case("400 client disconnected", {"CONTENT_LENGTH": "5000"}, data=EXAMPLE, content_type=JSON),
    case("415 text/plain", data=b"hook=patient-view", content_type="text/plain", headers={"Origin": ORIGIN}),
    case("415 no content type", data=EXAMPLE),
    case("413 declared", data=b"{" + b" " * MAX_BODY + b"}", content_type=JSON, headers={"Origin": ORIGIN}),
    case("413 chunked", {"CONTENT_LENGTH": None, "wsgi.input_terminated": True},
         data=b"{" + b" " * MAX_BODY + b"}", content_type=JSON),
    case("431 header", data=EXAMPLE, content_type=JSON, headers={"X-Long": "a" * 9000, "Origin": ORIGIN}),
    case("431 request line", path=PV + "?q=" + "a" * 9000, data=EXAMPLE, content_type=JSON),
    case("front 413", {"HTTP_X_CDS_FRONT_ERROR": "413"}, data=b"", content_type=JSON, headers={"Origin": ORIGIN}),
    case("front 408", {"HTTP_X_CDS_FRONT_ERROR": "408"}, data=b"", content_type=JSON),
    case("500 unexpected", data=EXAMPLE.replace(b'"5f1f5e2e-0e1c-4a43-9a3f-2b9f8c1d7a10"', b'"boom"'),
         content_type=JSON, headers={"Origin": ORIGIN}),
]


class EnvironEdit:
    """A WSGI app that edits the environ as the current case says, then calls `app`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.edit: dict[str, Any] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        for key, value in self.edit.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return self.app(environ, start_response)


class TwoPaths:
    """The app as every server runs it (`app.wsgi_app`: the hook route ahead of Flask), and the
    same stack without the route (hook calls reach Flask's view)."""

    def __init__(self, app: flask.Flask) -> None:
        stack = app.wsgi_app
        assert isinstance(stack, AnswerHeaders) and isinstance(stack.app, HookRoute)
        self.app = app
        self.fast, self.flask = EnvironEdit(app), EnvironEdit(AnswerHeaders(stack.app.inner, stack.cors_headers))
        self.dispatched: list[str] = []
        flask.request_started.connect(self._started, app)

    def _started(self, sender: Any, **extra: Any) -> None:
        self.dispatched.append(flask.request.path)

    def close(self) -> None:
        flask.request_started.disconnect(self._started, self.app)

    def answer(self, via: EnvironEdit, c: Case, log: Any) -> tuple[Any, ...]:
        """Everything observable about one call: status line, header list, body (uuids masked),
        the log lines it wrote (fields but the duration) and the metrics it moved."""
        via.edit = c.environ
        lines_before, counts_before = len(log.records), counters()
        resp = Client(via).open(**c.request())
        payload = resp.get_data()
        lines = [(r.name, r.levelname, r.getMessage(),
                  {k: getattr(r, k) for k in ALLOWED_FIELDS if k != "duration_ms" and getattr(r, k, None) is not None})
                 for r in log.records[lines_before:]]
        moved = {k: v - counts_before.get(k, 0.0) for k, v in counters().items() if v != counts_before.get(k, 0.0)}
        return resp.status, resp.headers.to_wsgi_list(), UUID.sub(b"<uuid>", payload), lines, moved

    def compare(self, c: Case, log: Any) -> tuple[Any, ...]:
        """The answers through both paths; fails unless they are identical and the fast one
        never entered Flask's dispatch while the other did."""
        before = len(self.dispatched)
        fast = self.answer(self.fast, c, log)
        assert len(self.dispatched) == before, f"{c.label}: the hook route left the call to Flask"
        slow = self.answer(self.flask, c, log)
        assert len(self.dispatched) == before + 1, f"{c.label}: the reference did not go through Flask"
        assert fast[0] == slow[0], c.label
        assert fast[1] == slow[1], c.label
        assert fast[2] == slow[2], c.label
        assert fast[3] == slow[3], c.label
        assert fast[4] == slow[4], c.label
        return fast


def counters() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the service's metrics, but the latency's buckets and sum (they depend on
    the call's duration) and creation times."""
    out = {}
    for metric in REGISTRY.collect():
        if not metric.name.startswith("cds_"):
            continue
        for sample in metric.samples:
            if sample.name.endswith(("_bucket", "_sum", "_created")):
                continue
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def paths(make_app: Callable[..., flask.Flask]) -> Iterator[TwoPaths]:
    app = make_app(max_body_bytes=MAX_BODY, cors_origins=ORIGIN)
    engine = app.extensions["cds"].engine
    evaluate = engine.evaluate

    def maybe_fail(record: Any, hook_request: Any, **kwargs: Any) -> Any:
        if hook_request.hook_instance == "boom":
            raise RuntimeError("patient Jane Doe detail")
        return evaluate(record, hook_request, **kwargs)

    engine.evaluate = maybe_fail
    two = TwoPaths(app)
    Client(app).post(PV, data=EXAMPLE, content_type=JSON)  # the once-per-worker auth_disabled warning
    yield two
    two.close()


@pytest.mark.parametrize("c", CASES, ids=[c.label for c in CASES])
def test_the_hook_route_answers_as_flask_does(paths: TwoPaths, service_log: Any, c: Case) -> None:
    status, headers, payload, lines, moved = paths.compare(c, service_log)
    # The comparison passes if both are wrong alike: what each kind must be, spelled out.
    code = int(status.split()[0])
    assert code == int(c.label.split()[0]) if c.label[0].isdigit() else code in (200, 413, 408)
    assert ("Cache-Control", "no-store") in headers and ("X-Content-Type-Options", "nosniff") in headers
    assert dict(headers)["Content-Type"] == JSON and int(dict(headers)["Content-Length"]) > 0
    if dict(c.request().get("headers", {})).get("Origin") == ORIGIN:
        assert ("Access-Control-Allow-Origin", ORIGIN) in headers
    events = [fields.get("event") for *_, fields in lines]
    if code == 200:
        assert b'"cards":[{' in payload and events[-1] == "hook"
    else:
        assert b'"resourceType":"OperationOutcome"' in payload and b"Jane" not in payload
    if code == 431:  # refused before the call: no hook line, nothing counted
        assert events == ["client_error"] and not moved
    elif code != 200:
        assert "hook" in events and events[-1] == ("unhandled_exception" if code == 500 else "client_error")
    if code != 431:
        assert moved[("cds_requests_total", (("service", "b12-neck-pain-patient-view"), ("status", str(code))))] == 1


def test_the_hook_route_answers_authenticated_calls_as_flask_does(make_app, tmp_path, service_log) -> None:
    ehr = make_issuer()
    app = make_app(auth_disabled=False, trusted_issuers=trusted_issuers_json((ehr, ehr.entry(jwks=write_jwks(tmp_path, ehr)))))
    aud = f"http://localhost{PV}"
    two = TwoPaths(app)
    # The key set is read (and logged) once: before the comparison.
    Client(app).post(PV, data=EXAMPLE, content_type=JSON, headers={"Authorization": f"Bearer {ehr.token(aud=aud)}"})
    try:
        answers = {}
        for c in [
            case("401 no token", data=EXAMPLE, content_type=JSON),
            case("401 garbage token", data=EXAMPLE, content_type=JSON, headers={"Authorization": "Bearer not.a.jwt"}),
            case("401 not bearer", data=EXAMPLE, content_type=JSON, headers={"Authorization": "Basic dTpw"}),
            Case("401 wrong aud", lambda: {"method": "POST", "path": PV, "data": EXAMPLE, "content_type": JSON,
                                           "headers": {"Authorization": f"Bearer {ehr.token(aud='http://other/x')}"}}),
            Case("200 valid token", lambda: {"method": "POST", "path": PV, "data": EXAMPLE, "content_type": JSON,
                                             "headers": {"Authorization": f"Bearer {ehr.token(aud=aud)}"}}),
        ]:
            answers[c.label] = two.compare(c, service_log)
    finally:
        two.close()
    for label, (status, headers, *_rest) in answers.items():
        assert status.startswith(label[:3]), label
        assert (("WWW-Authenticate", "Bearer") in headers) == label.startswith("401")


@pytest.mark.parametrize("label, request_args, environ, status", [
    ("unknown service", {"method": "POST", "path": "/cds-services/nope"}, {}, 404),
    ("405", {"method": "GET", "path": PV}, {}, 405),
    ("preflight", {"method": "OPTIONS", "path": PV, "headers": {
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"}}, {}, 200),
    ("feedback", {"method": "POST", "path": PV + "/feedback", "json": {}}, {}, 400),
    ("trailing slash", {"method": "POST", "path": PV + "/"}, {}, 404),
    ("repeated slashes", {"method": "POST", "path": "/cds-services//b12-neck-pain-patient-view"}, {}, 308),
    ("websocket upgrade", {"method": "POST", "path": PV, "headers": {"Connection": "upgrade", "Upgrade": "websocket"}},
     {}, 400),
    ("bad host", {"method": "POST", "path": PV}, {"HTTP_HOST": "a..b"}, 400),
    ("lowercase method", {"method": "POST", "path": PV, "data": EXAMPLE, "content_type": JSON},
     {"REQUEST_METHOD": "post"}, 200),
])
def test_what_the_route_leaves_to_flask(app, label, request_args, environ, status) -> None:
    """Everything but a hook call Flask's routing would certainly send to a known service's
    view goes to Flask, which answers it as before."""
    two = TwoPaths(app)
    try:
        two.fast.edit = environ
        resp = Client(two.fast).open(**request_args)
        assert resp.status_code == status, label
        assert len(two.dispatched) == 1, label
    finally:
        two.close()


def test_the_asgi_front_and_so_gunicorn_take_the_hook_route(tmp_path) -> None:
    """`b12-cds serve` runs `create_asgi_app`: its hook calls skip Flask's dispatch, and a body
    the front refused is answered by the route as Flask would."""
    import asyncio

    from cds_service.asgi import create_asgi_app
    from tests.test_body_budget import call, scope

    front = create_asgi_app({"data_dir": str(tmp_path / "data"), "auth_disabled": True, "max_body_bytes": MAX_BODY})
    flask_app = front.inner.app
    two = TwoPaths(flask_app)
    try:
        status, headers, payload = asyncio.run(call(front, scope(PV, len(EXAMPLE)), EXAMPLE))
        assert status == 200 and b'"cards":[{' in payload and headers["cache-control"] == "no-store"
        refused = scope(PV, MAX_BODY + 1)
        status, headers, payload = asyncio.run(call(front, refused, b"x" * (MAX_BODY + 1)))
        assert status == 413 and b"request body too large" in payload
        assert two.dispatched == []
        assert asyncio.run(call(front, scope("/cds-services", None, method="GET"), b""))[0] == 200
        assert two.dispatched == ["/cds-services"]
    finally:
        two.close()


def test_the_route_reads_the_body_limit_as_flask_does(paths: TwoPaths, service_log: Any) -> None:
    """flask.Request.max_content_length reads the app's config on each request: so does the route."""
    paths.app.config["MAX_CONTENT_LENGTH"] = 100
    status, *_ = paths.compare(case("413 declared", data=EXAMPLE, content_type=JSON), service_log)
    assert status.startswith("413")


def test_a_divergence_fails_the_comparison(paths: TwoPaths, service_log: Any, monkeypatch) -> None:
    """The comparison sees a header the route would answer differently."""
    import cds_service.http.hook_route as hook_route

    monkeypatch.setattr(hook_route, "_ANSWER_STATUS", "200 Ok")
    with pytest.raises(AssertionError):
        paths.compare(CASES[0], service_log)
