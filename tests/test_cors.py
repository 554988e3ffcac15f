"""CDS_CORS_ORIGINS: exact origins and anchored wildcard-subdomain patterns, nothing looser."""

from __future__ import annotations

import pytest

from cds_service.cors import OriginPolicy

PV = "/cds-services/b12-neck-pain-patient-view"


def test_wildcard_subdomain_pattern_is_anchored_at_both_ends():
    policy = OriginPolicy.parse("https://*.example.org")
    assert policy.allows("https://ehr.example.org")
    assert policy.allows("https://a.b.example.org")
    assert policy.allows("HTTPS://EHR.Example.ORG")
    for origin in ("https://xexample.org.attacker.net",   # the reported bypass
                   "https://xexample.org",                 # '.' must be literal, not any character
                   "https://example.org",                  # the apex is not a subdomain
                   "https://ehr.example.org.attacker.net",
                   "https://ehr.example.org\n",            # `$` would match before a newline
                   "https://ehr.example.org:8443",         # other port
                   "http://ehr.example.org",               # other scheme
                   "https://evil.com/.example.org",
                   "https://evil.com#.example.org",
                   ""):
        assert not policy.allows(origin), origin


def test_exact_origins_match_only_themselves():
    policy = OriginPolicy.parse("https://ehr.example.org, http://localhost:3000")
    assert policy.allows("https://ehr.example.org") and policy.allows("http://localhost:3000")
    for origin in ("https://ehrXexample.org", "https://ehr.example.org.evil.net", "https://sub.ehr.example.org",
                   "http://localhost:30001", "http://localhost", None):
        assert not policy.allows(origin), origin


@pytest.mark.parametrize("entry", ["https://ehr.example.org/path", "ehr.example.org", "https://*example.org",
                                   "https://ehr.*.org", "https://.*\\.example\\.org", "https://ehr.example.org.*",
                                   "ftp://ehr.example.org", "*, https://ehr.example.org"])
def test_anything_else_is_refused_at_start(entry, make_app):
    with pytest.raises(ValueError, match="CDS_CORS_ORIGINS"):
        OriginPolicy.parse(entry)
    with pytest.raises(ValueError, match="CDS_CORS_ORIGINS"):
        make_app(cors_origins=entry)


def test_the_app_reflects_only_matching_origins(make_app):
    client = make_app(cors_origins="https://*.example.org").test_client()
    ok = client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"
    bad = client.get("/cds-services", headers={"Origin": "https://xexample.org.attacker.net"})
    assert "Access-Control-Allow-Origin" not in bad.headers
    preflight = client.options(PV, headers={"Origin": "https://xexample.org.attacker.net",
                                            "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_default_allows_any_origin():
    policy = OriginPolicy.parse("*")
    assert policy.allow_all and policy.allows("https://anything.example")
    assert policy.response_headers(None) == [("Access-Control-Allow-Origin", "*")]


# The service's own CORS answer (OriginPolicy.answer_headers) against flask-cors, which it
# replaced: every kind of answer (success, 4xx from the views, from werkzeug and from the request
# checks, 413, 431, 500, preflight) for every kind of origin, under each form of the setting.

FLASK_CORS_SETTINGS = {"allow_headers": ["Content-Type", "Authorization"], "methods": ["GET", "POST", "OPTIONS"],
                       "max_age": 600}
"""How the service configured flask-cors before it answered CORS itself."""

HOOK = {"hook": "patient-view", "hookInstance": "h-cors", "context": {"userId": "Practitioner/1", "patientId": "p"},
        "prefetch": {"patient": {"resourceType": "Patient", "id": "p", "birthDate": "1950-01-01"},
                     **dict.fromkeys(("conditions", "labResults", "findings", "findingValues", "medicationRequests",
                                      "medicationStatements", "procedures", "serviceRequests"),
                                     {"resourceType": "Bundle", "type": "searchset", "entry": []})}}
ORIGINS = (None, "", "https://ehr.example.org", "HTTPS://EHR.Example.ORG", "https://a.b.example.org",
           "http://localhost:3000", "https://xexample.org.attacker.net", "https://evil.example.com", "null")
PREFLIGHTS = (
    {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"},
    {"Access-Control-Request-Method": "post", "Access-Control-Request-Headers": "X-Other,Content-Type, ,AUTHORIZATION"},
    {"Access-Control-Request-Method": "GET"},
    {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"},
    {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-custom"},
    {"Access-Control-Request-Method": ""},
    {"Access-Control-Request-Method": "OPT"},  # flask-cors tests a substring of "GET, OPTIONS, POST"
    {},
)


def _calls(client):
    """(label, response) for each kind of request, in a fixed order."""
    yield "discovery", client.get("/cds-services")
    yield "hook", client.post(PV, json=HOOK)
    yield "bad json", client.post(PV, data=b"{nope", content_type="application/json")
    yield "415", client.post(PV, data=b"x", content_type="text/plain")
    yield "unknown service", client.post("/cds-services/nope", json={})
    yield "unknown path", client.get("/no/such/path")
    yield "405", client.put("/cds-services")
    yield "413", client.post(PV, data=b'{"x": "' + b"a" * 3000 + b'"}', content_type="application/json")
    yield "431", client.get("/cds-services", headers={"X-Big": "b" * 9000})
    yield "front 413", client.post(PV, data=b"", content_type="application/json",
                                   environ_overrides={"HTTP_X_CDS_FRONT_ERROR": "413"})
    yield "healthz", client.get("/healthz")
    yield "private network", client.post(PV, json=HOOK, headers={"Access-Control-Request-Private-Network": "true"})
    for i, preflight in enumerate(PREFLIGHTS):
        yield f"preflight {i}", client.options(PV, headers=preflight)
    yield "preflight unknown path", client.options("/no/such/path", headers=PREFLIGHTS[0])
    yield "500", client.post(PV, json={**HOOK, "hookInstance": "boom"})


def _answers(app, origin):
    class OriginClient:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, method):
            def call(path, headers=None, **kwargs):
                headers = dict(headers or {})
                if origin is not None:
                    headers["Origin"] = origin
                return getattr(self.inner, method)(path, headers=headers, **kwargs)
            return call

    out = []
    for label, resp in _calls(OriginClient(app.test_client())):
        headers = sorted((k, v) for k, v in resp.headers if k != "Content-Length")
        out.append((label, resp.status_code, headers))
    return out


def _failing_on_boom(app):
    engine = app.extensions["cds"].engine
    evaluate = engine.evaluate

    def maybe_fail(record, hook_request, **kwargs):
        if hook_request.hook_instance == "boom":
            raise RuntimeError("unexpected")
        return evaluate(record, hook_request, **kwargs)

    engine.evaluate = maybe_fail
    return app


@pytest.mark.parametrize("setting", ["*", "https://ehr.example.org", "https://*.example.org, http://localhost:3000"])
def test_cors_answers_equal_flask_cors_for_every_answer_and_origin(make_app, monkeypatch, tmp_path, setting):
    from flask_cors import CORS

    settings = {"cors_origins": setting, "max_body_bytes": 2048}
    with monkeypatch.context() as patch:  # the reference: our CORS headers off, flask-cors as before
        patch.setattr(OriginPolicy, "answer_headers", lambda self, environ: [])
        reference = make_app(data_dir=str(tmp_path / "reference"), **settings)
    policy = OriginPolicy.parse(setting)
    CORS(reference, origins=policy.flask_cors_origins(), send_wildcard=policy.allow_all, **FLASK_CORS_SETTINGS)
    # flask-cors answers in Flask's dispatch: the reference's hook calls go through it, not
    # through the hook route ahead of Flask (tests/test_hook_route.py: the two answer alike).
    reference.wsgi_app.app = reference.wsgi_app.app.inner
    reference.config["PROPAGATE_EXCEPTIONS"] = False
    ours = make_app(data_dir=str(tmp_path / "ours"), **settings)
    ours.config["PROPAGATE_EXCEPTIONS"] = False
    _failing_on_boom(reference), _failing_on_boom(ours)
    for origin in ORIGINS:
        expected, actual = _answers(reference, origin), _answers(ours, origin)
        assert [status for _, status, _ in expected] == [status for _, status, _ in actual]
        assert {s for _, s, _ in actual} >= {200, 400, 404, 405, 413, 415, 431, 500}
        for (label, _, want), (_, _, got) in zip(expected, actual):
            assert got == want, (setting, origin, label)
    # The cases that matter, spelled out (the comparison above would pass if both were wrong).
    client = ours.test_client()
    preflight = client.options(PV, headers={"Origin": "https://ehr.example.org", **PREFLIGHTS[0]})
    assert preflight.headers["Access-Control-Allow-Origin"] == ("*" if policy.allow_all else "https://ehr.example.org")
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, OPTIONS, POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert preflight.headers["Access-Control-Max-Age"] == "600"
    too_large = client.post(PV, data=b"a" * 3000, content_type="application/json",
                            headers={"Origin": "https://ehr.example.org"})
    assert too_large.status_code == 413
    assert too_large.headers["Access-Control-Allow-Origin"] == ("*" if policy.allow_all else "https://ehr.example.org")
    refused = client.post(PV, json=HOOK, headers={"Origin": "https://evil.example.com"})
    assert ("Access-Control-Allow-Origin" in refused.headers) == policy.allow_all
    assert refused.headers.get("Vary") is None
