"""The feedback report needs an admin token: a hook-capable EHR token is not enough.

Admin tokens come from `CDS_ADMIN_ISSUERS` (issuers trusted for the report only) or, when
`CDS_ADMIN_SCOPE` is set, carry that scope.  With neither configured the report is closed (403);
demo mode mints report tokens from a separate demo admin issuer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cds_service.security import DemoIssuer
from cds_service.services import services
from tests.jwt_helpers import SigningIssuer, make_issuer, trusted_issuers_json, write_jwks
from tests.servers import hook_body

BASE = "https://cds.example.org"
REPORT = "/admin/feedback-report"
HOOK = "/cds-services/b12-neck-pain-patient-view"
SCOPE = "b12-cds/feedback-report.read"


@pytest.fixture
def ehr() -> SigningIssuer:
    return make_issuer("ES384", "https://ehr.example.org")


@pytest.fixture
def admin() -> SigningIssuer:
    return make_issuer("ES384", "https://idp.example.org")


def app_for(make_app, tmp_path: Path, ehr: SigningIssuer, admin: SigningIssuer | None = None,
            **overrides: Any):
    (tmp_path / "ehr").mkdir(exist_ok=True)
    (tmp_path / "admin").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "auth_disabled": False, "public_base_url": BASE,
        "trusted_issuers": trusted_issuers_json((ehr, ehr.entry(jwks=write_jwks(tmp_path / "ehr", ehr))))}
    if admin is not None:
        config["admin_issuers"] = trusted_issuers_json(
            (admin, admin.entry(jwks=write_jwks(tmp_path / "admin", admin))))
    return make_app(**(config | overrides))


def get_report(client, token: str):
    return client.get(REPORT, headers={"Authorization": f"Bearer {token}"})


def outcome_status(resp) -> int:
    if resp.status_code != 200:
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    return resp.status_code


def test_nothing_configured_closes_the_report_to_hook_tokens(make_app, tmp_path, ehr) -> None:
    client = app_for(make_app, tmp_path, ehr).test_client()
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT))) == 403
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT, scope=SCOPE))) == 403
    # ... while the same issuer's tokens still work on the hooks
    resp = client.post(HOOK, json=hook_body(prefetch={"patient": None}),
                       headers={"Authorization": f"Bearer {ehr.token(BASE + HOOK)}"})
    assert resp.status_code == 412  # authorised; the (empty) data is the only problem


def test_admin_issuer_token_reads_the_report_and_hook_tokens_do_not(make_app, tmp_path, ehr, admin) -> None:
    client = app_for(make_app, tmp_path, ehr, admin).test_client()
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT))) == 403
    resp = get_report(client, admin.token(BASE + REPORT))
    assert resp.status_code == 200 and "kinds" in resp.get_json()
    assert outcome_status(get_report(client, "not.a.jwt")) == 401
    assert outcome_status(client.get(REPORT)) == 401
    assert outcome_status(get_report(client, admin.token(BASE + HOOK))) == 401  # aud is checked


def test_admin_issuer_tokens_are_not_hook_tokens(make_app, tmp_path, ehr, admin) -> None:
    client = app_for(make_app, tmp_path, ehr, admin).test_client()
    resp = client.post(HOOK, json=hook_body(prefetch={"patient": None}),
                       headers={"Authorization": f"Bearer {admin.token(BASE + HOOK)}"})
    assert resp.status_code == 401
    resp = client.post(HOOK + "/feedback", json={"feedback": []},
                       headers={"Authorization": f"Bearer {admin.token(BASE + HOOK + '/feedback')}"})
    assert resp.status_code == 401


def test_admin_scope_is_required_of_every_report_token_when_set(make_app, tmp_path, ehr, admin) -> None:
    client = app_for(make_app, tmp_path, ehr, admin, admin_scope=SCOPE).test_client()
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT))) == 403
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT, scope="patient/*.read"))) == 403
    assert outcome_status(get_report(client, ehr.token(BASE + REPORT, scope=f"{SCOPE}x"))) == 403
    assert outcome_status(get_report(client, admin.token(BASE + REPORT))) == 403  # no scope
    assert get_report(client, ehr.token(BASE + REPORT, scope=f"openid {SCOPE}")).status_code == 200
    assert get_report(client, admin.token(BASE + REPORT, scope=SCOPE)).status_code == 200


def test_403_is_logged_with_a_reason_and_without_the_token(make_app, tmp_path, ehr, caplog) -> None:
    client = app_for(make_app, tmp_path, ehr).test_client()
    token = ehr.token(BASE + REPORT)
    get_report(client, token)
    line = next(r for r in caplog.records if getattr(r, "event", None) == "admin_forbidden")
    assert line.reason == "not_admin_issuer"
    assert all(token not in str(v) and token.split(".")[2] not in str(v)
               for r in caplog.records for v in vars(r).values())


def test_bad_admin_issuers_config_fails_at_start(make_app, tmp_path, ehr) -> None:
    with pytest.raises(ValueError, match="CDS_ADMIN_ISSUERS"):
        app_for(make_app, tmp_path, ehr, admin_issuers="[1]")
    with pytest.raises(ValueError, match="CDS_ADMIN_ISSUERS"):
        app_for(make_app, tmp_path, ehr, admin_issuers='{"https://idp.example.org": {}}')


def test_demo_report_tokens_are_admin_tokens_and_demo_hook_tokens_are_not(make_app) -> None:
    app = make_app(auth_disabled=False, demo_mode=True, public_base_url=BASE)
    client = app.test_client()
    demo = services(app).verifier.demo_issuer
    assert outcome_status(get_report(client, demo.mint(BASE + REPORT))) == 403
    assert get_report(client, demo.mint(BASE + REPORT, admin=True)).status_code == 200
    resp = client.post(HOOK, json=hook_body(prefetch={"patient": None}),
                       headers={"Authorization": f"Bearer {demo.mint(BASE + HOOK, admin=True)}"})
    assert resp.status_code == 401
    # the demo page's own path: /demo/api/token mints an admin token for the report
    minted = client.post("/demo/api/token", json={"path": REPORT}).get_json()
    assert get_report(client, minted["token"]).status_code == 200


def test_demo_report_token_carries_the_admin_scope_when_one_is_set(make_app) -> None:
    app = make_app(auth_disabled=False, demo_mode=True, public_base_url=BASE, admin_scope=SCOPE)
    client = app.test_client()
    minted = client.post("/demo/api/token", json={"path": REPORT}).get_json()
    assert get_report(client, minted["token"]).status_code == 200
    assert DemoIssuer.ADMIN_ISSUER not in services(app).verifier.issuers
