"""Every error status answers with an OperationOutcome and CORS headers; never a stack trace."""

from __future__ import annotations

import json

import pytest

PV = "/cds-services/b12-neck-pain-patient-view"
ORIGIN = {"Origin": "https://ehr.example.org"}


def assert_outcome(resp, status, text=None):
    assert resp.status_code == status
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] in ("error", "fatal")
    if text:
        assert text in body["issue"][0]["diagnostics"]
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


def test_unknown_service_is_404(client):
    assert_outcome(client.post("/cds-services/nope", json={}), 404, "unknown CDS service")


def test_unknown_route_is_404(client):
    assert_outcome(client.get("/nothing-here"), 404)


def test_wrong_method_is_405(client):
    assert_outcome(client.get(PV), 405)
    assert_outcome(client.delete("/cds-services"), 405)


def test_not_json_is_415(client):
    assert_outcome(client.post(PV, data="hook=patient-view", content_type="text/plain"), 415)
    assert_outcome(client.post(PV, data="x"), 415)


@pytest.mark.parametrize("raw", [b"{", b"[1,", b"\xff\xfe", b'{"hook": "patient-view",}', b""])
def test_malformed_json_is_400(client, raw):
    assert_outcome(client.post(PV, data=raw, content_type="application/json"), 400, "not valid JSON")


@pytest.mark.parametrize("body,field", [
    ([], None), ("text", None), (42, None),
    ({"hookInstance": "h", "context": {"userId": "Practitioner/1", "patientId": "p"}}, "hook"),
    ({"hook": "patient-view", "hookInstance": "h", "context": {"userId": "Practitioner/1"}},
     "context.patientId"),
    ({"hook": "patient-view", "hookInstance": "h", "context": "oops"}, "context"),
    ({"hook": "order-sign", "hookInstance": "h", "context": {"userId": "Practitioner/1", "patientId": "p"}},
     "hook"),
])
def test_invalid_request_is_400_naming_the_field(client, body, field):
    out = assert_outcome(client.post(PV, json=body), 400)
    if field:
        assert out["issue"][0]["expression"] == [field]


def test_body_too_large_is_413(make_app):
    client = make_app(max_body_bytes=1024).test_client()
    body = {"hook": "patient-view", "hookInstance": "h", "padding": "x" * 5000,
            "context": {"userId": "Practitioner/1", "patientId": "p"}}
    assert_outcome(client.post(PV, data=json.dumps(body), content_type="application/json"), 413)


def test_too_deep_json_is_400(make_app):
    client = make_app(max_json_depth=10).test_client()
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    body = {"hook": "patient-view", "hookInstance": "h",
            "context": {"userId": "Practitioner/1", "patientId": "p", "extension": deep}}
    assert_outcome(client.post(PV, json=body), 400, "nested deeper")


def test_pathologically_deep_prefetch_is_400_not_500(client):
    raw = b'{"hook":"patient-view","hookInstance":"h","context":{"userId":"Practitioner/1","patientId":"p"},' \
          b'"prefetch":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert_outcome(client.post(PV, data=raw, content_type="application/json"), 400)


def test_unexpected_exception_is_a_500_outcome_without_details(make_app, monkeypatch):
    app = make_app()
    svc = app.extensions["cds"]

    def boom(*a, **k):
        raise RuntimeError("patient Jane Doe secret detail")

    monkeypatch.setattr(svc.engine, "evaluate", boom)
    monkeypatch.setattr(svc.patient_data, "gather", boom)
    resp = app.test_client().post(PV, json={"hook": "patient-view", "hookInstance": "h-500",
                                            "context": {"userId": "Practitioner/1", "patientId": "p"},
                                            "prefetch": {"patient": None}}, headers=ORIGIN)
    body = assert_outcome(resp, 500)
    assert "Jane" not in json.dumps(body)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_headers_on_success_and_errors(client):
    for resp in (client.get("/cds-services", headers=ORIGIN), client.post("/cds-services/nope", json={}, headers=ORIGIN),
                 client.post(PV, data="x", headers=ORIGIN)):
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight_allows_authorization_header(client):
    resp = client.options(PV, headers={**ORIGIN, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()


def test_cors_origins_are_configurable(make_app):
    client = make_app(cors_origins="https://ehr.example.org").test_client()
    ok = client.get("/cds-services", headers=ORIGIN)
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    other = client.get("/cds-services", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_405_lists_allowed_methods(client):
    resp = client.put("/cds-services")
    assert resp.status_code == 405
    assert "GET" in resp.headers["Allow"]


def test_401_asks_for_a_bearer_token(make_app):
    client = make_app(auth_disabled=False).test_client()
    resp = client.post(PV, json={"hook": "patient-view"})
    assert_outcome(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"


HOOK = {"hook": "patient-view", "hookInstance": "h-sec", "context": {"userId": "Practitioner/1", "patientId": "p"},
        "prefetch": {"patient": None}}


def test_every_answer_is_no_store_and_nosniff(client):
    """Hook answers carry patient-derived text: no cache may keep them, no browser may sniff them."""
    for resp in (client.post(PV, json=HOOK, headers=ORIGIN), client.get("/cds-services"), client.get("/healthz"),
                 client.post("/cds-services/nope", json={}), client.post(PV, data="x"),
                 client.options(PV, headers={**ORIGIN, "Access-Control-Request-Method": "POST"})):
        assert resp.headers["Cache-Control"] == "no-store", resp.status
        assert resp.headers["X-Content-Type-Options"] == "nosniff", resp.status


def test_oversized_authorization_header_is_a_431_outcome_with_cors(make_app):
    client = make_app(auth_disabled=False).test_client()
    resp = client.post(PV, json=HOOK, headers={**ORIGIN, "Authorization": "Bearer " + "a" * 9000})
    body = assert_outcome(resp, 431, "'Authorization'")
    assert "aaaa" not in json.dumps(body)  # the value (a token) is never echoed
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


def test_oversized_request_line_is_a_431_outcome(client):
    resp = client.get("/cds-services?x=" + "a" * 9000, headers=ORIGIN)
    assert_outcome(resp, 431, "request line")
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


def chunked_environ(payload: bytes) -> dict:
    """What a WSGI server passes for a chunked body: no Content-Length, a terminated stream."""
    import io

    return {"wsgi.input": io.BytesIO(payload), "wsgi.input_terminated": True,
            "CONTENT_TYPE": "application/json", "HTTP_TRANSFER_ENCODING": "chunked"}


def test_chunked_body_over_the_limit_is_413_not_truncated(make_app):
    """Read with the limit whatever the framing: a body that is valid JSON when cut at the
    limit must not be answered as if it were the whole request."""
    app = make_app(max_body_bytes=200)
    valid_prefix = json.dumps(HOOK).encode()
    assert len(valid_prefix) < 200
    payload = valid_prefix + b" " * 300  # whitespace after the JSON: the first 200 bytes parse
    client = app.test_client()
    resp = client.post(PV, environ_overrides=chunked_environ(payload))
    assert_outcome(resp, 413)
    whole = client.post(PV, environ_overrides=chunked_environ(valid_prefix))
    # Under the limit a chunked body is read whole and handled like any other (here: 412,
    # the prefetch says the patient has no Patient resource).
    assert whole.status_code == client.post(PV, json=HOOK).status_code == 412


class _Trickle:
    """A WSGI input that returns at most a few bytes per read, as a socket may."""

    def __init__(self, payload: bytes) -> None:
        import io

        self._stream = io.BytesIO(payload)

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(min(size, 7) if size >= 0 else 7)


def test_a_declared_length_is_read_whole_however_the_stream_delivers_it(client):
    payload = json.dumps(HOOK).encode()
    trickled = client.post(PV, environ_overrides={
        "wsgi.input": _Trickle(payload), "CONTENT_LENGTH": str(len(payload)), "CONTENT_TYPE": "application/json"})
    assert trickled.status_code == client.post(PV, json=HOOK).status_code == 412


@pytest.mark.parametrize("stream", ["short", "trickle-short"])
def test_a_body_shorter_than_its_content_length_is_400(client, stream):
    """The client went away before sending the length it declared: werkzeug's answer (400)."""
    import io

    payload = json.dumps(HOOK).encode()
    body = io.BytesIO(payload) if stream == "short" else _Trickle(payload)
    resp = client.post(PV, environ_overrides={
        "wsgi.input": body, "CONTENT_LENGTH": str(len(payload) + 10), "CONTENT_TYPE": "application/json"})
    assert_outcome(resp, 400)


def test_413_is_counted_and_logged_as_413(make_app):
    import logging
    import re

    def count(status: str) -> float:
        text = client.get("/metrics").get_data(as_text=True)
        m = re.search(r'^cds_requests_total\{service="b12-neck-pain-patient-view",status="%s"\} (\S+)$' % status,
                      text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    class Recorder(logging.Handler):
        statuses: list = []

        def emit(self, record):
            if getattr(record, "event", None) == "hook":
                self.statuses.append(record.status)

    client = make_app(max_body_bytes=1024).test_client()
    big = json.dumps({**HOOK, "padding": "x" * 5000})
    before_413, before_500 = count("413"), count("500")
    recorder = Recorder()
    logger = logging.getLogger("cds_service.hooks")
    logger.addHandler(recorder)
    try:
        assert_outcome(client.post(PV, data=big, content_type="application/json"), 413)
        assert_outcome(client.post(PV, environ_overrides=chunked_environ(big.encode())), 413)
    finally:
        logger.removeHandler(recorder)
    assert count("413") == before_413 + 2
    assert count("500") == before_500
    assert recorder.statuses == [413, 413]


def test_a_refused_body_from_the_front_is_answered_by_the_app(client):
    """The whole-request front (cds_service.asgi) hands a refused body over empty and marked."""
    for marker, status in (("413", 413), ("408", 408)):
        resp = client.post(PV, data=b"", content_type="application/json",
                           environ_overrides={"HTTP_X_CDS_FRONT_ERROR": marker}, headers=ORIGIN)
        assert_outcome(resp, status)
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert_outcome(client.get("/healthz", environ_overrides={"HTTP_X_CDS_FRONT_ERROR": marker}), status)


@pytest.mark.parametrize("name", ["X-Big", "Authorization", "Content-Type", "Cookie"])
@pytest.mark.parametrize("excess", [-1, 0, 1])
def test_the_header_size_check_measures_what_werkzeug_lists(name, excess):
    """`oversized_header` reads the WSGI environ; it must judge exactly the `name: value` lines
    werkzeug's `request.headers` gives (body headers from CONTENT_*, not their HTTP_ copies)."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from cds_service.http.errors import oversized_header

    limit = 1024
    value = "v" * (limit - len(name) - 2 + excess)
    headers = {"Origin": "https://ehr.example.org"}
    if name == "Content-Type":  # werkzeug's builder takes it apart from the other headers
        content_type = "application/json;x=" + value[len("application/json;x="):]
    else:
        content_type, headers[name] = "application/json", value
    environ = EnvironBuilder(path="/cds-services", method="POST", data=b"{}", content_type=content_type,
                             headers=headers).get_environ()
    environ["HTTP_CONTENT_TYPE"] = "w" * 2000  # a duplicate werkzeug does not list
    expected = next((n for n, v in Request(environ).headers.items() if len(n) + len(v) + 2 > limit), None)
    assert oversized_header(environ, limit) == expected
    assert (expected is not None) == (excess > 0)
