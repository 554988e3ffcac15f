"""JWT verification of CDS client calls (issue #4): one test per rejection, accepted token shapes,
JWKS caching, the shared replay cache, the demo signer, and log safety."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from pytest_httpserver import HTTPServer

from cds_service.config import Settings
from cds_service.logs import LOGGER_NAME, JsonFormatter
from cds_service.protocol import CdsError
from cds_service.security import DemoIssuer, RequestVerifier, expected_audience
from tests.jwt_helpers import (
    SANDBOX_ISSUER,
    SANDBOX_KID,
    SigningIssuer,
    hs256_with_public_key,
    jwks_of,
    make_issuer,
    sandbox_issuer,
    tamper_payload,
    trusted_issuers_json,
    unsigned_token,
    write_jwks,
)

BASE = "https://cds.example.org"
PATH = "/cds-services/b12-neck-pain-patient-view"
AUD = BASE + PATH

_app = flask.Flask("security-tests")


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


class MemoryJtiStore:
    """In-memory stand-in for `Store.remember_jti` (shared by several verifiers = several workers)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], float] = {}

    def remember_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        key = (issuer, jti)
        if key in self.seen and self.seen[key] > time.time():
            return False
        self.seen[key] = expires_at
        return True


class FakeClock:
    """A monotonic clock the tests advance by hand (drives JWKS cache expiry only)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LogCapture(logging.Handler):
    """Collects records of the `cds_service` logger and their JSON rendering."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(JsonFormatter().format(record))

    def reasons(self) -> list[str]:
        return [r.reason for r in self.records if getattr(r, "event", None) == "auth_rejected"]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def auth_log() -> Iterator[LogCapture]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, old_level = LogCapture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture
def server(jwks_server: HTTPServer) -> Iterator[HTTPServer]:
    jwks_server.clear()
    yield jwks_server
    jwks_server.clear()


@pytest.fixture
def ehr() -> SigningIssuer:
    return make_issuer("ES384")


def settings_for(tmp_path: Path, trusted: str = "{}", **overrides: Any) -> Settings:
    values: dict[str, Any] = {"trusted_issuers": trusted, "data_dir": str(tmp_path / "data")}
    values.update(overrides)
    return Settings.from_env(values, environ={})


def file_verifier(tmp_path: Path, issuer: SigningIssuer, store: Any = None, **entry: Any) -> RequestVerifier:
    """A verifier trusting `issuer` with its JWKS in a file (plus any extra entry fields)."""
    trusted = trusted_issuers_json((issuer, issuer.entry(jwks=write_jwks(tmp_path, issuer), **entry)))
    return RequestVerifier(settings_for(tmp_path, trusted), store or MemoryJtiStore())


def call(verifier: RequestVerifier, token: str | None = None, *, path: str = PATH, base_url: str = BASE,
         authorization: str | None = None) -> dict[str, Any] | None:
    """Run `verifier.verify` inside a request to `base_url + path` carrying `token`."""
    headers = {}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with _app.test_request_context(path, method="POST", base_url=base_url, headers=headers):
        return verifier.verify(flask.request)


def assert_rejected(verifier: RequestVerifier, token: str | None, reason: str, log: LogCapture,
                    **kwargs: Any) -> None:
    with pytest.raises(CdsError) as info:
        call(verifier, token, **kwargs)
    assert info.value.status == 401
    assert info.value.diagnostics == "unauthorized"
    assert log.reasons()[-1] == reason
    if token:
        assert token not in log.text


# ---------------------------------------------------------------------------------------------
# Accepted tokens
# ---------------------------------------------------------------------------------------------


def test_es384_token_from_jwks_file_is_accepted(tmp_path: Path, ehr: SigningIssuer) -> None:
    verifier = file_verifier(tmp_path, ehr)
    claims = call(verifier, ehr.token(AUD))
    assert claims is not None and claims["iss"] == ehr.iss and claims["aud"] == AUD


def test_rs384_token_from_jwks_url_is_accepted(tmp_path: Path, server: HTTPServer) -> None:
    ehr = make_issuer("RS384")
    server.expect_request("/jwks").respond_with_json(ehr.jwks)
    trusted = trusted_issuers_json((ehr, ehr.entry(jwks=server.url_for("/jwks"))))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert call(verifier, ehr.token(AUD))["iss"] == ehr.iss


@pytest.mark.parametrize("alg", ["ES256", "ES512", "RS256", "PS384"])
def test_other_asymmetric_algorithms_are_accepted(tmp_path: Path, alg: str) -> None:
    ehr = make_issuer(alg)
    assert call(file_verifier(tmp_path, ehr), ehr.token(AUD)) is not None


def test_sandbox_shaped_token_is_accepted_via_allowlisted_jku(tmp_path: Path, server: HTTPServer) -> None:
    """ES384, `jku` + `kid` in the header, exp = iat + 300, no `sub`; issuer configured with only a jku list."""
    jku = server.url_for("/.well-known/jwks.json")
    sandbox = sandbox_issuer(jku)
    server.expect_request("/.well-known/jwks.json").respond_with_json(sandbox.jwks)
    trusted = trusted_issuers_json((sandbox, sandbox.entry(jku=[jku])))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())

    token = sandbox.token(AUD)
    header = json.loads(_b64decode(token.split(".")[0]))
    assert header == {"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": jku}
    claims = call(verifier, token)
    assert claims["iss"] == SANDBOX_ISSUER and "sub" not in claims
    assert claims["exp"] - claims["iat"] == 300


def test_pinned_jwks_serves_tokens_with_an_allowlisted_jku_without_fetching_it(
        tmp_path: Path, server: HTTPServer) -> None:
    """Trusting the CDS Hooks Sandbox offline: its key pinned in a file, its `jku` allowlisted;
    the sandbox's tokens (which always carry that `jku`) verify with no outbound request."""
    jku = server.url_for("/.well-known/jwks.json")
    sandbox = sandbox_issuer(jku)
    server.expect_request("/.well-known/jwks.json").respond_with_json(sandbox.jwks)
    trusted = trusted_issuers_json((sandbox, sandbox.entry(jwks=write_jwks(tmp_path, sandbox), jku=[jku])))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    for _ in range(3):
        assert call(verifier, sandbox.token(AUD))["iss"] == SANDBOX_ISSUER
    assert len(server.log) == 0, "the pinned JWKS had the kid: the jku must not be fetched"


def test_allowlisted_jku_still_serves_a_kid_the_pinned_jwks_lacks(tmp_path: Path, server: HTTPServer) -> None:
    jku = server.url_for("/.well-known/jwks.json")
    sandbox = sandbox_issuer(jku)
    other = make_issuer("ES384", iss=sandbox.iss, kid="older-key")
    server.expect_request("/.well-known/jwks.json").respond_with_json(sandbox.jwks)
    trusted = trusted_issuers_json((sandbox, sandbox.entry(jwks=write_jwks(tmp_path, other), jku=[jku])))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert call(verifier, sandbox.token(AUD))["iss"] == SANDBOX_ISSUER
    assert len(server.log) == 1


def test_pinned_jwks_does_not_widen_the_jku_allowlist(tmp_path: Path, server: HTTPServer,
                                                      auth_log: LogCapture) -> None:
    jku = server.url_for("/.well-known/jwks.json")
    sandbox = sandbox_issuer(jku)
    trusted = trusted_issuers_json((sandbox, sandbox.entry(jwks=write_jwks(tmp_path, sandbox),
                                                           jku=[server.url_for("/other/jwks.json")])))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert_rejected(verifier, sandbox.token(AUD), "jku_not_allowed", auth_log)
    assert len(server.log) == 0


def test_aud_may_be_an_array_containing_the_endpoint(tmp_path: Path, ehr: SigningIssuer) -> None:
    verifier = file_verifier(tmp_path, ehr)
    assert call(verifier, ehr.token(["https://other.example.org/x", AUD])) is not None


def test_aud_uses_public_base_url_behind_a_proxy(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    public = "https://gateway.example.org/b12/"
    trusted = trusted_issuers_json((ehr, ehr.entry(jwks=write_jwks(tmp_path, ehr))))
    verifier = RequestVerifier(settings_for(tmp_path, trusted, public_base_url=public), MemoryJtiStore())
    internal = "http://10.0.0.7:8080"
    assert call(verifier, ehr.token("https://gateway.example.org/b12" + PATH), base_url=internal) is not None
    assert_rejected(verifier, ehr.token(internal + PATH), "wrong_aud", auth_log, base_url=internal)


def test_feedback_endpoint_needs_its_own_url_as_aud(tmp_path: Path, ehr: SigningIssuer,
                                                      auth_log: LogCapture) -> None:
    verifier = file_verifier(tmp_path, ehr)
    feedback = PATH + "/feedback"
    assert call(verifier, ehr.token(BASE + feedback), path=feedback) is not None
    assert_rejected(verifier, ehr.token(AUD), "wrong_aud", auth_log, path=feedback)


def test_tenant_on_allowlist_is_accepted(tmp_path: Path, ehr: SigningIssuer) -> None:
    verifier = file_verifier(tmp_path, ehr, tenants=["hospital-a"])
    assert call(verifier, ehr.token(AUD, tenant="hospital-a"))["tenant"] == "hospital-a"


def test_small_clock_skew_is_tolerated(tmp_path: Path, ehr: SigningIssuer) -> None:
    now = int(time.time())
    verifier = file_verifier(tmp_path, ehr)
    assert call(verifier, ehr.token(AUD, iat=now + 30, exp=now + 330)) is not None


# ---------------------------------------------------------------------------------------------
# Rejections: one per rule
# ---------------------------------------------------------------------------------------------


def test_missing_authorization_header_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), None, "missing_authorization", auth_log)


def test_non_bearer_scheme_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    token = ehr.token(AUD)
    assert_rejected(file_verifier(tmp_path, ehr), None, "not_bearer", auth_log, authorization=f"Basic {token}")
    assert token not in auth_log.text


def test_garbage_token_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), "not-a-jwt", "malformed_token", auth_log)


def test_alg_none_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), unsigned_token(ehr, AUD), "alg_not_allowed", auth_log)


def test_hs256_signed_with_the_public_key_is_rejected(tmp_path: Path, ehr: SigningIssuer,
                                                     auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), hs256_with_public_key(ehr, AUD), "alg_not_allowed", auth_log)


def test_wrong_aud_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    verifier = file_verifier(tmp_path, ehr)
    assert_rejected(verifier, ehr.token(BASE + "/cds-services/b12-neck-pain-order-sign"), "wrong_aud", auth_log)
    assert_rejected(verifier, ehr.token("https://evil.example.org" + PATH), "wrong_aud", auth_log)


def test_expired_token_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    now = int(time.time())
    token = ehr.token(AUD, iat=now - 400, exp=now - 100)  # beyond the 60 s leeway
    assert_rejected(file_verifier(tmp_path, ehr), token, "expired", auth_log)


def test_iat_in_the_future_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    now = int(time.time())
    token = ehr.token(AUD, iat=now + 600, exp=now + 900)
    assert_rejected(file_verifier(tmp_path, ehr), token, "not_yet_valid", auth_log)


def test_unknown_iss_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    stranger = make_issuer("ES384", iss="https://stranger.example.org")
    assert_rejected(file_verifier(tmp_path, ehr), stranger.token(AUD), "unknown_iss", auth_log)
    # A trusted issuer's name on a stranger's key is a signature failure, not an acceptance.
    forged = make_issuer("ES384", iss=ehr.iss, kid=ehr.kid)
    assert_rejected(file_verifier(tmp_path, ehr), forged.token(AUD), "bad_signature", auth_log)


def test_jku_off_the_allowlist_is_rejected(tmp_path: Path, server: HTTPServer, auth_log: LogCapture) -> None:
    allowed = server.url_for("/good/jwks.json")
    attacker = server.url_for("/attacker/jwks.json")
    ehr = make_issuer("ES384")
    server.expect_request("/attacker/jwks.json").respond_with_json(ehr.jwks)
    trusted = trusted_issuers_json((ehr, ehr.entry(jku=[allowed])))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert_rejected(verifier, ehr.token(AUD, headers={"jku": attacker}), "jku_not_allowed", auth_log)
    assert len(server.log) == 0, "a jku off the allowlist must never be fetched"


def test_unknown_kid_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), ehr.token(AUD, headers={"kid": "no-such-key"}),
                    "unknown_kid", auth_log)


def test_missing_kid_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), ehr.token(AUD, headers={"kid": None}), "missing_kid", auth_log)


def test_bad_signature_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    tampered = tamper_payload(ehr.token(AUD), tenant="another-hospital")
    assert_rejected(file_verifier(tmp_path, ehr), tampered, "bad_signature", auth_log)


def test_replayed_jti_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    verifier = file_verifier(tmp_path, ehr)
    token = ehr.token(AUD)
    assert call(verifier, token) is not None
    assert_rejected(verifier, token, "replayed_jti", auth_log)
    assert_rejected(verifier, ehr.token(AUD, jti=json.loads(_b64decode(token.split(".")[1]))["jti"]),
                    "replayed_jti", auth_log)


def test_replay_is_detected_across_workers_sharing_the_store(tmp_path: Path, ehr: SigningIssuer,
                                                              auth_log: LogCapture) -> None:
    store = MemoryJtiStore()
    worker_a, worker_b = file_verifier(tmp_path, ehr, store), file_verifier(tmp_path, ehr, store)
    token = ehr.token(AUD)
    assert call(worker_a, token) is not None
    assert_rejected(worker_b, token, "replayed_jti", auth_log)


def test_rejected_token_does_not_consume_its_jti(tmp_path: Path, ehr: SigningIssuer,
                                                 auth_log: LogCapture) -> None:
    store = MemoryJtiStore()
    verifier = file_verifier(tmp_path, ehr, store)
    assert_rejected(verifier, ehr.token("https://evil.example.org" + PATH, jti="j-1"), "wrong_aud", auth_log)
    assert store.seen == {}
    assert call(verifier, ehr.token(AUD, jti="j-1")) is not None


def test_replay_cache_failure_fails_closed(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    class BrokenStore:
        def remember_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
            raise OSError("database is locked")

    assert_rejected(file_verifier(tmp_path, ehr, BrokenStore()), ehr.token(AUD), "replay_cache_unavailable",
                    auth_log)


@pytest.mark.parametrize("claim", ["jti", "exp", "iat", "iss", "aud"])
def test_missing_required_claim_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture,
                                            claim: str) -> None:
    expected = "unknown_iss" if claim == "iss" else f"missing_{claim}"
    claims = ehr.claims(AUD)
    del claims[claim]
    token = ehr.sign(claims)
    assert_rejected(file_verifier(tmp_path, ehr), token, expected, auth_log)


def test_tenant_not_on_allowlist_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    verifier = file_verifier(tmp_path, ehr, tenants=["hospital-a"])
    assert_rejected(verifier, ehr.token(AUD, tenant="hospital-b"), "tenant_not_allowed", auth_log)
    assert_rejected(verifier, ehr.token(AUD), "tenant_not_allowed", auth_log)


def test_typ_other_than_jwt_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    assert_rejected(file_verifier(tmp_path, ehr), ehr.token(AUD, headers={"typ": "at+jwt"}), "typ_not_jwt",
                    auth_log)


def test_overlong_lifetime_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    now = int(time.time())
    token = ehr.token(AUD, iat=now, exp=now + 7 * 24 * 3600)
    assert_rejected(file_verifier(tmp_path, ehr), token, "lifetime_too_long", auth_log)


@pytest.mark.parametrize("claim", ["exp", "iat"])
def test_numeric_date_given_as_string_is_rejected(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture,
                                                  claim: str) -> None:
    value = str(int(time.time()) + (200 if claim == "exp" else 0))
    assert_rejected(file_verifier(tmp_path, ehr), ehr.token(AUD, **{claim: value}), "invalid_claims", auth_log)


def test_algorithm_must_match_the_key(tmp_path: Path, auth_log: LogCapture) -> None:
    """A PS256 token whose kid names a key published for RS256 is refused (no algorithm switching)."""
    rsa = make_issuer("RS256")
    token = rsa.token(AUD, headers={"alg": "PS256"})
    assert_rejected(file_verifier(tmp_path, rsa), token, "key_alg_mismatch", auth_log)


def test_unreachable_jwks_is_rejected(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer,
                                      auth_log: LogCapture) -> None:
    server.expect_request("/jwks").respond_with_data("down", status=503)
    trusted = trusted_issuers_json((ehr, ehr.entry(jwks=server.url_for("/jwks"))))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert_rejected(verifier, ehr.token(AUD), "jwks_unavailable", auth_log)


def test_redirecting_jwks_url_is_not_followed(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer,
                                              auth_log: LogCapture) -> None:
    server.expect_request("/jwks").respond_with_data("", status=302, headers={"Location": "/elsewhere"})
    server.expect_request("/elsewhere").respond_with_json(ehr.jwks)
    trusted = trusted_issuers_json((ehr, ehr.entry(jwks=server.url_for("/jwks"))))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert_rejected(verifier, ehr.token(AUD), "jwks_unavailable", auth_log)
    assert [req.path for req, _ in server.log] == ["/jwks"]


def test_symmetric_keys_in_a_jwks_are_ignored(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": ehr.kid, "k": "c2VjcmV0"}]}))
    trusted = trusted_issuers_json((ehr, ehr.entry(jwks=str(path))))
    verifier = RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())
    assert_rejected(verifier, ehr.token(AUD), "unknown_kid", auth_log)


def test_401_is_a_bare_operation_outcome_saying_unauthorized(tmp_path: Path, ehr: SigningIssuer) -> None:
    with pytest.raises(CdsError) as info:
        call(file_verifier(tmp_path, ehr), unsigned_token(ehr, AUD))
    assert info.value.outcome() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}],
    }


# ---------------------------------------------------------------------------------------------
# Configuration and disabled auth
# ---------------------------------------------------------------------------------------------


def test_auth_disabled_returns_none_and_warns_once_per_worker(tmp_path: Path, auth_log: LogCapture) -> None:
    """Disabled auth is said loudly, but once: not a warning line on every hook call."""
    verifier = RequestVerifier(settings_for(tmp_path, auth_disabled=True), MemoryJtiStore())
    assert call(verifier) is None
    assert call(verifier) is None
    assert call(verifier) is None
    warnings = [r for r in auth_log.records if getattr(r, "event", None) == "auth_disabled"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_no_trusted_issuers_rejects_everything(tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    verifier = RequestVerifier(settings_for(tmp_path), MemoryJtiStore())
    assert_rejected(verifier, ehr.token(AUD), "unknown_iss", auth_log)


@pytest.mark.parametrize("trusted", [
    "not json",
    '["https://ehr.example.org"]',
    '{"https://ehr.example.org": {}}',
    '{"https://ehr.example.org": {"jwks": "/k.json", "jku": "https://x/jwks"}}',
    '{"https://ehr.example.org": {"jwks": "/k.json", "tenants": "a"}}',
    '{"https://ehr.example.org": {"jwks": "/k.json", "jwk": "typo"}}',
])
def test_invalid_trusted_issuers_config_fails_at_startup(tmp_path: Path, trusted: str) -> None:
    with pytest.raises(ValueError):
        RequestVerifier(settings_for(tmp_path, trusted), MemoryJtiStore())


def test_expected_audience_without_public_base_url_uses_host(tmp_path: Path) -> None:
    with _app.test_request_context(PATH, base_url="http://localhost:8080"):
        assert expected_audience(settings_for(tmp_path), flask.request) == "http://localhost:8080" + PATH


# ---------------------------------------------------------------------------------------------
# JWKS caching
# ---------------------------------------------------------------------------------------------


def url_verifier(tmp_path: Path, server: HTTPServer, *issuers: SigningIssuer,
                 clock: FakeClock, ttl: int = 3600) -> RequestVerifier:
    server.expect_request("/jwks").respond_with_json(jwks_of(*issuers))
    trusted = trusted_issuers_json((issuers[0], issuers[0].entry(jwks=server.url_for("/jwks"))))
    return RequestVerifier(settings_for(tmp_path, trusted, jwks_cache_seconds=ttl), MemoryJtiStore(), clock=clock)


def test_jwks_is_not_refetched_within_ttl(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer) -> None:
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock, ttl=600)
    for _ in range(3):
        call(verifier, ehr.token(AUD))
        clock.advance(100)
    assert len(server.log) == 1
    clock.advance(400)  # now past the TTL
    call(verifier, ehr.token(AUD))
    assert len(server.log) == 2


def test_unknown_kid_refetches_at_most_once_a_minute(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer,
                                                     auth_log: LogCapture) -> None:
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock)
    call(verifier, ehr.token(AUD))
    assert len(server.log) == 1

    clock.advance(61)
    for _ in range(5):  # a burst of unknown kids: one refetch only
        assert_rejected(verifier, ehr.token(AUD, headers={"kid": "rotated-in"}), "unknown_kid", auth_log)
        clock.advance(5)
    assert len(server.log) == 2

    clock.advance(60)
    assert_rejected(verifier, ehr.token(AUD, headers={"kid": "rotated-in"}), "unknown_kid", auth_log)
    assert len(server.log) == 3


def test_unknown_kid_right_after_a_fetch_does_not_refetch(tmp_path: Path, server: HTTPServer,
                                                           ehr: SigningIssuer, auth_log: LogCapture) -> None:
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock)
    call(verifier, ehr.token(AUD))
    clock.advance(10)
    assert_rejected(verifier, ehr.token(AUD, headers={"kid": "rotated-in"}), "unknown_kid", auth_log)
    assert len(server.log) == 1


def test_rotated_key_is_picked_up_by_refetch(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer) -> None:
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock)
    call(verifier, ehr.token(AUD))
    rotated = make_issuer("ES384", iss=ehr.iss)
    server.clear()
    server.expect_request("/jwks").respond_with_json(jwks_of(ehr, rotated))
    clock.advance(61)
    assert call(verifier, rotated.token(AUD)) is not None
    assert len(server.log) == 1


def test_a_key_replaced_under_the_same_kid_is_the_one_used(tmp_path: Path, server: HTTPServer,
                                                           ehr: SigningIssuer, auth_log: LogCapture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Key objects are built once per published key (not per call), and a refreshed key set
    that publishes another key under the same kid is verified with the new key only."""
    import jwt

    built: list[str] = []
    real = jwt.PyJWK

    def counting(data: dict[str, Any], algorithm: str | None = None) -> Any:
        built.append(data["kid"])
        return real(data, algorithm=algorithm)

    monkeypatch.setattr(jwt, "PyJWK", counting)
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock, ttl=120)
    for _ in range(3):
        assert call(verifier, ehr.token(AUD)) is not None
    assert built == [ehr.kid]
    replaced = make_issuer("ES384", iss=ehr.iss, kid=ehr.kid)  # same kid, another key
    server.clear()
    server.expect_request("/jwks").respond_with_json(jwks_of(replaced))
    clock.advance(200)  # past the TTL: the next call refetches
    assert call(verifier, replaced.token(AUD)) is not None
    assert_rejected(verifier, ehr.token(AUD), "bad_signature", auth_log)
    assert built == [ehr.kid, ehr.kid]


def test_cached_keys_survive_a_failed_refresh(tmp_path: Path, server: HTTPServer, ehr: SigningIssuer) -> None:
    clock = FakeClock()
    verifier = url_verifier(tmp_path, server, ehr, clock=clock, ttl=120)
    call(verifier, ehr.token(AUD))
    server.clear()
    server.expect_request("/jwks").respond_with_data("down", status=500)
    clock.advance(200)
    assert call(verifier, ehr.token(AUD)) is not None
    assert len(server.log) == 1


# ---------------------------------------------------------------------------------------------
# Demo signer
# ---------------------------------------------------------------------------------------------


def test_demo_issuer_key_is_created_private_and_shared(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "nested", demo_mode=True)
    first, second = DemoIssuer(settings), DemoIssuer(settings)
    key_file = Path(settings.data_dir) / DemoIssuer.KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert first.kid == second.kid
    assert first.jwks["keys"][0]["kid"] == first.kid and "d" not in first.jwks["keys"][0]


def test_demo_issuer_creation_races_to_one_key(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, demo_mode=True)
    kids: list[str] = []
    threads = [threading.Thread(target=lambda: kids.append(DemoIssuer(settings).kid)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kids) == 8 and len(set(kids)) == 1
    assert [p.name for p in Path(settings.data_dir).iterdir()] == [DemoIssuer.KEY_FILE]


def test_demo_token_is_accepted_in_demo_mode_by_another_worker(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, demo_mode=True)
    token = DemoIssuer(settings).mint(AUD)  # e.g. minted by the demo page in one worker
    claims = call(RequestVerifier(settings, MemoryJtiStore()), token)  # verified in another
    assert claims["iss"] == DemoIssuer.ISSUER
    assert claims["exp"] - claims["iat"] <= 300


def test_demo_token_is_rejected_outside_demo_mode(tmp_path: Path, auth_log: LogCapture) -> None:
    token = DemoIssuer(settings_for(tmp_path, demo_mode=True)).mint(AUD)
    assert_rejected(RequestVerifier(settings_for(tmp_path), MemoryJtiStore()), token, "unknown_iss", auth_log)


def test_demo_token_for_another_endpoint_is_rejected(tmp_path: Path, auth_log: LogCapture) -> None:
    settings = settings_for(tmp_path, demo_mode=True)
    token = DemoIssuer(settings).mint(BASE + "/cds-services/b12-neck-pain-order-sign")
    assert_rejected(RequestVerifier(settings, MemoryJtiStore()), token, "wrong_aud", auth_log)


# ---------------------------------------------------------------------------------------------
# Log safety
# ---------------------------------------------------------------------------------------------


def test_rejection_logs_reason_but_never_the_token_or_unverified_claims(
        tmp_path: Path, ehr: SigningIssuer, auth_log: LogCapture) -> None:
    verifier = file_verifier(tmp_path, ehr)
    secret_jti = "JTI-SHOULD-NOT-BE-LOGGED-UNVERIFIED"
    token = tamper_payload(ehr.token(AUD, jti=secret_jti), aud=AUD)
    assert_rejected(verifier, token, "bad_signature", auth_log)
    line = json.loads(auth_log.lines[-1])
    assert line["event"] == "auth_rejected" and line["reason"] == "bad_signature"
    assert line["iss"] == ehr.iss and line["kid"] == ehr.kid
    for part in token.split("."):
        assert part not in auth_log.text
    assert secret_jti not in auth_log.text

    injected = ehr.token(AUD, headers={"kid": 'x" \n{"level": "critical"} ' + token})
    assert_rejected(verifier, injected, "unknown_kid", auth_log)
    assert "\n" not in auth_log.lines[-1] and token not in auth_log.text


def _b64decode(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# ---------------------------------------------------------------------------------------------
# Through HTTP: the hook and feedback endpoints, the real store, the logs
# ---------------------------------------------------------------------------------------------

SERVICE_IDS = ("b12-neck-pain-patient-view", "b12-neck-pain-order-select", "b12-neck-pain-order-sign")
PATIENT_FAMILY, PATIENT_GIVEN = "Zebedeeson", "Quillanora"
FHIR_ACCESS_TOKEN = "opaque-fhir-access-token-7f3a9c1e"
UNAUTHORIZED = {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "unauthorized"}]}


def patient_view_body() -> dict[str, Any]:
    """A complete patient-view call carrying a patient name and a FHIR access token."""
    empty = {"resourceType": "Bundle", "type": "searchset", "entry": []}
    keys = ("conditions", "labResults", "findings", "findingValues", "medicationRequests",
            "medicationStatements", "procedures", "serviceRequests")
    return {
        "hook": "patient-view", "hookInstance": "2f0d3c1e-5b7a-4f44-9a55-hook-log-test",
        "fhirServer": "https://fhir.example.org/r4",
        "fhirAuthorization": {"access_token": FHIR_ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 300,
                              "scope": "patient/*.read", "subject": "b12-cds"},
        "context": {"userId": "Practitioner/doc-1", "patientId": "pat-1"},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "pat-1", "birthDate": "1941-03-02",
                        "name": [{"family": PATIENT_FAMILY, "given": [PATIENT_GIVEN]}]},
            **{k: dict(empty) for k in keys},
        },
    }


@pytest.fixture
def secure_app(make_app: Any, tmp_path: Path, ehr: SigningIssuer) -> Any:
    """App factory with auth ON, trusting `ehr` (JWKS file); every app shares one data directory."""
    jwks_path = write_jwks(tmp_path, ehr)

    def factory(**overrides: Any) -> flask.Flask:
        config = {"auth_disabled": False, "public_base_url": BASE,
                  "trusted_issuers": trusted_issuers_json((ehr, ehr.entry(jwks=jwks_path)))}
        config.update(overrides)
        return make_app(**config)

    return factory


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("service_id", SERVICE_IDS)
def test_hook_endpoint_answers_401_bare_outcome_without_valid_token(secure_app: Any, ehr: SigningIssuer,
                                                                    service_id: str) -> None:
    client = secure_app().test_client()
    path = f"/cds-services/{service_id}"
    for headers in ({}, bearer("garbage"), bearer(unsigned_token(ehr, BASE + path)),
                    bearer(ehr.token(BASE + "/cds-services/another-service"))):
        resp = client.post(path, json={"hook": "patient-view"}, headers=headers)
        assert resp.status_code == 401
        assert resp.get_json() == UNAUTHORIZED


def test_hook_endpoint_accepts_a_valid_token(secure_app: Any, ehr: SigningIssuer) -> None:
    client = secure_app().test_client()
    resp = client.post(PATH, json=patient_view_body(), headers=bearer(ehr.token(AUD)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert "cards" in resp.get_json()


def test_authentication_comes_before_request_validation(secure_app: Any) -> None:
    """An unauthenticated caller learns nothing about the body rules: 401, not 400."""
    resp = secure_app().test_client().post(PATH, json={"not": "a hook call"})
    assert resp.status_code == 401 and resp.get_json() == UNAUTHORIZED


def test_feedback_endpoint_requires_a_token_for_its_own_url(secure_app: Any, ehr: SigningIssuer) -> None:
    client = secure_app().test_client()
    feedback = PATH + "/feedback"
    assert client.post(feedback, json={}).get_json() == UNAUTHORIZED
    assert client.post(feedback, json={}, headers=bearer(ehr.token(AUD))).status_code == 401
    # With a valid token the request gets past authentication (and fails body validation instead).
    assert client.post(feedback, json={}, headers=bearer(ehr.token(BASE + feedback))).status_code == 400


def test_replay_is_rejected_by_a_second_app_sharing_the_database(secure_app: Any, ehr: SigningIssuer,
                                                                   auth_log: LogCapture) -> None:
    worker_a, worker_b = secure_app().test_client(), secure_app().test_client()
    token = ehr.token(AUD)
    assert worker_a.post(PATH, json=patient_view_body(), headers=bearer(token)).status_code == 200
    replay = worker_b.post(PATH, json=patient_view_body(), headers=bearer(token))
    assert replay.status_code == 401 and replay.get_json() == UNAUTHORIZED
    assert auth_log.reasons() == ["replayed_jti"]
    assert worker_b.post(PATH, json=patient_view_body(), headers=bearer(ehr.token(AUD))).status_code == 200


def test_demo_mode_app_accepts_its_own_demo_tokens(secure_app: Any) -> None:
    app = secure_app(demo_mode=True)
    demo = app.extensions["cds"].verifier.demo_issuer
    client = app.test_client()
    assert client.post(PATH, json=patient_view_body(), headers=bearer(demo.mint(AUD))).status_code == 200
    other = secure_app(demo_mode=False).test_client()
    assert other.post(PATH, json=patient_view_body(), headers=bearer(demo.mint(AUD))).status_code == 401


def test_tokens_jwts_and_patient_names_never_reach_the_logs(
        secure_app: Any, ehr: SigningIssuer, auth_log: LogCapture, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    client = secure_app().test_client()
    jwt_token = ehr.token(AUD)
    forged = tamper_payload(ehr.token(AUD), tenant="x")
    body = patient_view_body()

    assert client.post(PATH, json=body, headers=bearer(jwt_token)).status_code == 200
    assert client.post(PATH, json=body, headers=bearer(jwt_token)).status_code == 401  # replay
    assert client.post(PATH, json=body, headers=bearer(forged)).status_code == 401  # bad signature
    assert client.post(PATH + "/feedback", json=body, headers=bearer(jwt_token)).status_code == 401

    assert any(getattr(r, "event", None) == "hook" for r in auth_log.records), "hook log lines expected"
    assert set(auth_log.reasons()) == {"replayed_jti", "bad_signature", "wrong_aud"}
    captured = capfd.readouterr()
    everything = "\n".join([
        auth_log.text,                                          # the JSON lines as written
        "\n".join(repr(vars(r)) for r in auth_log.records),     # every attribute, even unformatted extras
        caplog.text, captured.out, captured.err,                # anything else that was logged or printed
    ])
    secrets = [jwt_token, *jwt_token.split("."), forged.split(".")[2], FHIR_ACCESS_TOKEN,
               PATIENT_FAMILY, PATIENT_GIVEN]
    leaked = [s[:12] + "..." for s in secrets if s in everything]
    assert not leaked, f"secrets found in logs: {leaked}"
