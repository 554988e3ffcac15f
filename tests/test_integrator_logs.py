"""What an integrator sees on the service side: discovery with or without the trailing slash,
a log line with the reason for every 4xx (no request values, no token), and a JWT refused for
its `aud` logged with the URL expected and the URL the client signed for."""

from __future__ import annotations

import pytest

from cds_service.services import services
from tests.log_capture import service_log  # noqa: F401 (fixture)

PV = "/cds-services/b12-neck-pain-patient-view"


def test_discovery_answers_with_and_without_trailing_slash(client) -> None:
    plain, slash = client.get("/cds-services"), client.get("/cds-services/")
    assert plain.status_code == slash.status_code == 200
    assert plain.get_json() == slash.get_json() and len(slash.get_json()["services"]) == 3


@pytest.mark.parametrize("call, status, reason", [
    (lambda c: c.post(PV, data=b"{not json", content_type="application/json"), 400, "request body is not valid JSON"),
    (lambda c: c.post(PV, json={"hook": "patient-view"}), 400, "hookInstance is required"),
    (lambda c: c.post("/cds-services/no-such-service", json={}), 404, "unknown CDS service"),
    (lambda c: c.get("/no/such/path"), 404, "no such endpoint"),
    (lambda c: c.delete(PV), 405, "method not allowed"),
    (lambda c: c.post(PV, data=b"x", content_type="text/plain"), 415, "must be application/json"),
    # Raised outside the views too: the limits checked before any view, the body the front refused.
    (lambda c: c.get("/healthz", headers={"X-Long": "a" * 9000}), 431, "longer than 8192 bytes"),
    (lambda c: c.post(PV, json={}, headers={"X-Cds-Front-Error": "413"}), 413, "request body too large"),
    (lambda c: c.get("/healthz", headers={"X-Cds-Front-Error": "408"}), 408, "not received in time"),
    (lambda c: c.post(PV, json={"hook": "patient-view", "hookInstance": "h-412", "prefetch": {"patient": None},
                                "context": {"userId": "Practitioner/1", "patientId": "p"}}), 412, "required FHIR data could not be obtained"),
])
def test_every_4xx_is_logged_with_its_reason(client, service_log, call, status, reason) -> None:
    resp = call(client)
    assert resp.status_code == status
    [line] = service_log.events("client_error")
    assert line.status == status and reason in line.reason and line.path


def test_401_is_logged_with_the_verifier_reason_and_no_token(make_app, service_log) -> None:
    client = make_app(auth_disabled=False).test_client()
    resp = client.post(PV, json={}, headers={"Authorization": "Bearer not.a.jwt-secret-value"})
    assert resp.status_code == 401 and resp.get_json()["issue"][0]["diagnostics"] == "unauthorized"
    [line] = service_log.events("client_error")
    assert line.status == 401 and line.reason == "unauthorized: malformed_token"
    assert "secret-value" not in service_log.text


def test_wrong_aud_logs_expected_and_received_url(make_app, service_log) -> None:
    app = make_app(auth_disabled=False, demo_mode=True)
    signer = services(app).verifier.demo_issuer
    client = app.test_client()
    token = signer.mint(f"http://localhost:8080{PV}")  # signed for localhost, called as 127.0.0.1
    resp = client.post(PV, json={}, headers={"Authorization": f"Bearer {token}"},
                       base_url="http://127.0.0.1:8080")
    assert resp.status_code == 401
    [aud] = service_log.events("auth_wrong_aud")
    assert f"expected aud 'http://127.0.0.1:8080{PV}'" in aud.detail
    assert f"received 'http://localhost:8080{PV}'" in aud.detail
    assert token not in service_log.text
    [line] = service_log.events("client_error")
    assert line.reason == "unauthorized: wrong_aud"
