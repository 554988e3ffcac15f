"""Verifying the EHR's JWT on every hook and feedback call (CDS Hooks 2.0, section "Trusting CDS Clients").

`RequestVerifier.verify(request)` accepts a call only when its `Authorization: Bearer <JWT>`:

* uses an asymmetric algorithm (ES*, RS*, PS*; never `none` or HMAC) and, if `typ` is present, `typ: JWT`;
* names a trusted issuer (`CDS_TRUSTED_ISSUERS`, plus the built-in demo issuer in demo mode);
* is signed by the key its `kid` selects in that issuer's JWKS: the configured `jwks` (URL or file path),
  or the header's `jku` only when that URL is on the issuer's `jku` allowlist (the configured `jwks` is
  tried first even then, so a pinned key set serves such tokens without fetching the `jku`);
* has `aud` equal to the URL being called (`CDS_PUBLIC_BASE_URL` + path behind a proxy);
* has `exp` in the future, `iat` not in the future (both with `CDS_JWT_LEEWAY_SECONDS`), a lifetime of at
  most `MAX_TOKEN_LIFETIME_SECONDS`, a `jti` never seen before (shared replay cache in the store) and, when
  the issuer has a `tenants` list, a `tenant` on it.

`RequestVerifier.verify_admin(request)` (the feedback report) verifies the same way against the hook issuers
plus `CDS_ADMIN_ISSUERS`, then requires an admin token: `CDS_ADMIN_SCOPE` in its `scope` claim when that is
set, otherwise an admin issuer; else `CdsError(403)`.  Nothing configured: the report is closed.

Any failure raises `CdsError(401, "unauthorized")` after one log line with a fixed reason code; the token and
unverified claim values are never logged (only a trusted `iss`, a sanitised `kid`, and a verified `jti`).

`DemoIssuer` is the signing side for demo mode: an ES384 key kept in the data directory (mode 0600, shared by
all workers) that mints tokens the way an EHR would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from cds_service.config import Settings
from cds_service.secret_files import read_or_create_secret
from cds_service.logs import get_logger
from cds_service.protocol import CdsError

log = get_logger("security")

ALLOWED_ALGORITHMS: frozenset[str] = frozenset({
    "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
})
"""Asymmetric signature algorithms only: `none` and HMAC (HS*) are never accepted."""

MAX_TOKEN_LENGTH = 8192
"""Longer Authorization values are rejected before any parsing."""
MAX_TOKEN_LIFETIME_SECONDS = 3600
"""`exp - iat` may not exceed this (CDS Hooks best practice: JWT lifetime at most one hour)."""
MAX_JTI_LENGTH = 256
JWKS_REFETCH_MIN_SECONDS = 60.0
"""A JWKS is fetched at most this often, whatever the cause (unknown `kid`, failures)."""
JWKS_CONNECT_TIMEOUT = 3.0
JWKS_READ_TIMEOUT = 5.0
JWKS_MAX_BYTES = 512 * 1024
MAX_VERIFYING_KEYS = 64
"""Key objects a verifier keeps built (`RequestVerifier._verifying_key`)."""

_SAFE_LOG_VALUE = re.compile(r"[^A-Za-z0-9._:/@+=-]")


class JtiStore(Protocol):
    """The part of `cds_service.store.Store` the verifier needs (the shared replay cache)."""

    def remember_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record `jti`; True if it was new, False if already seen (a replay)."""
        ...


class AuthFailure(Exception):
    """Internal: verification failed for `reason` (a fixed code, safe to log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or parsed (and no cached copy exists)."""


# ---------------------------------------------------------------------------------------------
# JWKS sources
# ---------------------------------------------------------------------------------------------


def is_url(location: str) -> bool:
    return location.lower().startswith(("https://", "http://"))


def _fetch_jwks_url(url: str) -> Any:
    """GET a JWKS document: timeouts, no redirects, size-capped."""
    with requests.get(url, timeout=(JWKS_CONNECT_TIMEOUT, JWKS_READ_TIMEOUT), allow_redirects=False,
                      stream=True, headers={"Accept": "application/json"}) as resp:
        if resp.status_code != 200:
            raise JwksUnavailable(f"HTTP {resp.status_code}")
        body = bytearray()
        for chunk in resp.iter_content(chunk_size=16384):
            body.extend(chunk)
            if len(body) > JWKS_MAX_BYTES:
                raise JwksUnavailable("JWKS document too large")
    return json.loads(bytes(body))


def _read_jwks_file(path: str) -> Any:
    p = Path(path)
    if p.stat().st_size > JWKS_MAX_BYTES:
        raise JwksUnavailable("JWKS file too large")
    return json.loads(p.read_text(encoding="utf-8"))


def parse_jwks(document: Any) -> dict[str, dict[str, Any]]:
    """Signature keys of a JWKS document by `kid`. Keys without `kid`, symmetric keys (`oct`), private
    keys and keys marked for encryption are dropped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable("not a JWKS document")
    keys: dict[str, dict[str, Any]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or jwk.get("kty") not in ("EC", "RSA"):
            continue
        if jwk.get("use", "sig") != "sig" or "d" in jwk:
            continue
        keys.setdefault(kid, jwk)
    return keys


@dataclass
class JwksCache:
    """One issuer key set (URL or file), cached for `ttl` seconds.

    An unknown `kid` triggers a refetch, but no location is fetched more than once per
    `min_interval` seconds; when a refresh fails, the previously fetched keys stay in use.
    """

    location: str
    ttl: float
    min_interval: float = JWKS_REFETCH_MIN_SECONDS
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, dict[str, Any]] | None = field(default=None, init=False)
    _fetched_at: float = field(default=0.0, init=False)
    _attempted_at: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    fetch_count: int = field(default=0, init=False)

    def get(self, kid: str) -> dict[str, Any] | None:
        """The JWK for `kid`, or None when the key set does not have it. Raises `JwksUnavailable`."""
        with self._lock:
            now = self.clock()
            fresh = self._keys is not None and now - self._fetched_at < self.ttl
            if fresh and kid in self._keys:  # type: ignore[operator]
                return self._keys[kid]  # type: ignore[index]
            if self._may_fetch(now):
                self._refresh(now)
            if self._keys is None:
                raise JwksUnavailable("no keys fetched yet")
            return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self.min_interval

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        self.fetch_count += 1
        try:
            document = _fetch_jwks_url(self.location) if is_url(self.location) else _read_jwks_file(self.location)
            keys = parse_jwks(document)
        except (OSError, ValueError, requests.RequestException, JwksUnavailable) as exc:
            log.warning("jwks_fetch_failed", extra={"event": "jwks_fetch_failed",
                                                    "reason": type(exc).__name__,
                                                    "detail": _loggable(self.location, 300)})
            return
        self._keys = keys
        self._fetched_at = now
        log.info("jwks_fetched", extra={"event": "jwks_fetched", "count": len(keys),
                                        "detail": _loggable(self.location, 300)})


# ---------------------------------------------------------------------------------------------
# Trusted issuers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedIssuer:
    """One entry of `CDS_TRUSTED_ISSUERS`."""

    issuer: str
    jwks: str | None = None
    jku: frozenset[str] = frozenset()
    tenants: frozenset[str] | None = None
    static_keys: Mapping[str, dict[str, Any]] | None = None  # in-process keys (the demo issuer)

    @classmethod
    def from_config(cls, issuer: str, entry: Any, setting: str = "CDS_TRUSTED_ISSUERS") -> "TrustedIssuer":
        """Validate one `issuer -> {"jwks": ..., "jku": [...], "tenants": [...]}` entry."""
        if not isinstance(entry, dict):
            raise ValueError(f"{setting}[{issuer!r}] must be an object")
        unknown = set(entry) - {"jwks", "jku", "tenants"}
        if unknown:
            raise ValueError(f"{setting}[{issuer!r}]: unknown keys {sorted(unknown)}")
        jwks = entry.get("jwks")
        if jwks is not None and (not isinstance(jwks, str) or not jwks):
            raise ValueError(f"{setting}[{issuer!r}].jwks must be a URL or file path")
        jku = _string_list(entry.get("jku", []), f"{setting}[{issuer!r}].jku")
        if any(not is_url(u) for u in jku):
            raise ValueError(f"{setting}[{issuer!r}].jku must list http(s) URLs")
        if jwks is None and not jku:
            raise ValueError(f"{setting}[{issuer!r}] needs a jwks location or a jku allowlist")
        tenants = entry.get("tenants")
        tenant_set = (frozenset(_string_list(tenants, f"{setting}[{issuer!r}].tenants"))
                      if tenants is not None else None)
        return cls(issuer=issuer, jwks=jwks, jku=frozenset(jku), tenants=tenant_set)

    def allowed_jku(self) -> frozenset[str]:
        """`jku` values honoured: the allowlist plus the configured JWKS URL itself."""
        return self.jku | ({self.jwks} if self.jwks and is_url(self.jwks) else set())


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return list(value)


def load_trusted_issuers(settings: Settings) -> dict[str, TrustedIssuer]:
    """Parse and validate `settings.trusted_issuers` (raises ValueError on a bad configuration)."""
    try:
        raw = settings.trusted_issuer_map
    except json.JSONDecodeError as exc:
        raise ValueError(f"CDS_TRUSTED_ISSUERS is not valid JSON: {exc.msg}") from None
    return {iss: TrustedIssuer.from_config(iss, entry) for iss, entry in raw.items()}


def load_admin_issuers(settings: Settings) -> dict[str, TrustedIssuer]:
    """Parse and validate `settings.admin_issuers` (same shape as `CDS_TRUSTED_ISSUERS`)."""
    try:
        raw = settings.admin_issuer_map
    except json.JSONDecodeError as exc:
        raise ValueError(f"CDS_ADMIN_ISSUERS is not valid JSON: {exc.msg}") from None
    return {iss: TrustedIssuer.from_config(iss, entry, "CDS_ADMIN_ISSUERS") for iss, entry in raw.items()}


def expected_audience(settings: Settings, request: Any) -> str:
    """The `aud` a token must carry for this request: the URL being called."""
    base = settings.public_base_url.rstrip("/") if settings.public_base_url else request.host_url.rstrip("/")
    return base + request.path


# ---------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------


class RequestVerifier:
    """Verifies the CDS client's JWT on each request (one instance per app / worker)."""

    def __init__(self, settings: Settings, store: JtiStore, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self._auth_off_warned = False
        self.issuers: dict[str, TrustedIssuer] = load_trusted_issuers(settings)
        self.admin_issuers: dict[str, TrustedIssuer] = load_admin_issuers(settings)
        self.demo_issuer: DemoIssuer | None = None
        if settings.demo_mode:
            self.demo_issuer = DemoIssuer(settings)
            demo_keys = {self.demo_issuer.kid: self.demo_issuer.public_jwk}
            self.issuers[DemoIssuer.ISSUER] = TrustedIssuer(issuer=DemoIssuer.ISSUER, static_keys=demo_keys)
            # A separate issuer name for the demo's report tokens: hook tokens are not admin tokens.
            self.admin_issuers[DemoIssuer.ADMIN_ISSUER] = TrustedIssuer(
                issuer=DemoIssuer.ADMIN_ISSUER, static_keys=demo_keys)
        self._report_issuers = {**self.issuers, **self.admin_issuers}
        self._caches: dict[str, JwksCache] = {}
        self._caches_lock = threading.Lock()
        self._verifying_keys: dict[tuple[int, str], tuple[dict[str, Any], jwt.PyJWK]] = {}
        """`_verifying_key`'s memo: (id of the JWK, alg) -> (that JWK, its key object)."""
        if not settings.auth_disabled:
            if not self.issuers:
                log.warning("no_trusted_issuers", extra={
                    "event": "no_trusted_issuers",
                    "detail": "CDS_TRUSTED_ISSUERS is empty: every hook and feedback call will get 401"})
            if not self.admin_issuers and not settings.admin_scope:
                log.info("admin_report_closed", extra={
                    "event": "admin_report_closed",
                    "detail": "no CDS_ADMIN_ISSUERS or CDS_ADMIN_SCOPE: /admin/feedback-report answers 403"})
            if not settings.public_base_url:
                log.info("public_base_url_unset", extra={
                    "event": "public_base_url_unset",
                    "detail": "JWT aud is checked against the request's Host; set CDS_PUBLIC_BASE_URL in production"})

    # -- public ------------------------------------------------------------------------------

    def verify(self, request: Any) -> dict[str, Any] | None:
        """Verified claims of the request's bearer token; None when auth is disabled.

        Raises `CdsError(401, "unauthorized")` on any failure (the reason is logged, never the token).
        """
        if self.settings.auth_disabled:
            # Said once per worker (and once at start by create_app): a warning on every request
            # cost ~10% of a hook call and buried the log lines that matter.
            if not self._auth_off_warned:
                self._auth_off_warned = True
                log.warning("auth_disabled", extra={"event": "auth_disabled", "path": request.path,
                                                    "detail": "JWT verification is OFF (CDS_AUTH_DISABLED=1)"})
            return None
        claims, _issuer = self._verified(request, self.issuers)
        return claims

    def verify_admin(self, request: Any) -> dict[str, Any] | None:
        """Verified claims of an admin token (the feedback report); None when auth is disabled.

        The token must verify as for `verify`, from a hook issuer or a `CDS_ADMIN_ISSUERS` one
        (else 401), and be an admin token (else 403): it carries `CDS_ADMIN_SCOPE` when that is
        set, otherwise it comes from an admin issuer.  Nothing configured: every token gets 403.
        """
        if self.settings.auth_disabled:
            return self.verify(request)
        claims, issuer = self._verified(request, self._report_issuers)
        scope = self.settings.admin_scope
        if scope:
            granted = claims.get("scope")
            scopes = granted.split() if isinstance(granted, str) else (
                granted if isinstance(granted, list) else [])
            allowed, reason = scope in scopes, "admin_scope_missing"
        else:
            allowed, reason = issuer.issuer in self.admin_issuers, "not_admin_issuer"
        if not allowed:
            log.warning("forbidden", extra={"event": "admin_forbidden", "reason": reason,
                                            "path": request.path, "iss": _loggable(issuer.issuer, 200),
                                            "jti": _loggable(claims["jti"], 80)})
            raise CdsError(403, "this needs an admin token (see CDS_ADMIN_ISSUERS and CDS_ADMIN_SCOPE)")
        return claims

    def _verified(self, request: Any, issuers: Mapping[str, TrustedIssuer]
                  ) -> tuple[dict[str, Any], TrustedIssuer]:
        context: dict[str, str] = {}
        try:
            claims, issuer = self._verify(request, context, issuers)
        except AuthFailure as failure:
            log.warning("unauthorized", extra={"event": "auth_rejected", "reason": failure.reason,
                                               "path": request.path, **context})
            error = CdsError(401, "unauthorized")
            error.log_reason = f"unauthorized: {failure.reason}"  # for the server's log only
            raise error from None
        log.debug("authorized", extra={"event": "auth_ok", "path": request.path, **context})
        return claims, issuer

    def jwks_cache(self, location: str) -> JwksCache:
        """The shared cache for a JWKS location (created on first use)."""
        with self._caches_lock:
            cache = self._caches.get(location)
            if cache is None:
                cache = JwksCache(location, ttl=float(self.settings.jwks_cache_seconds), clock=self._clock)
                self._caches[location] = cache
            return cache

    # -- steps -------------------------------------------------------------------------------

    def _verify(self, request: Any, context: dict[str, str], issuers: Mapping[str, TrustedIssuer]
                ) -> tuple[dict[str, Any], TrustedIssuer]:
        token = bearer_token(request.headers.get("Authorization"))
        header = self._checked_header(token)
        context["kid"] = _loggable(header["kid"], 80)
        issuer = self._trusted_issuer(token, issuers)
        context["iss"] = _loggable(issuer.issuer, 200)
        jwk = self._signing_key(issuer, header)
        claims = self._decode(token, jwk, header["alg"], issuer.issuer, expected_audience(self.settings, request))
        context["jti"] = _loggable(claims["jti"], 80)
        self._check_tenant(issuer, claims)
        self._check_not_replayed(issuer.issuer, claims)
        return claims, issuer

    def _checked_header(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure("malformed_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthFailure("alg_not_allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthFailure("typ_not_jwt")
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise AuthFailure("missing_kid")
        if "jku" in header and not isinstance(header["jku"], str):
            raise AuthFailure("jku_not_allowed")
        if "crit" in header:
            raise AuthFailure("unsupported_crit")
        return header

    def _trusted_issuer(self, token: str, issuers: Mapping[str, TrustedIssuer]) -> TrustedIssuer:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthFailure("malformed_token") from None
        iss = unverified.get("iss")
        issuer = issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthFailure("unknown_iss")
        return issuer

    def _signing_key(self, issuer: TrustedIssuer, header: dict[str, Any]) -> dict[str, Any]:
        kid: str = header["kid"]
        jku = header.get("jku")
        if jku is not None and jku not in issuer.allowed_jku():
            raise AuthFailure("jku_not_allowed")
        if issuer.static_keys is not None:
            jwk = issuer.static_keys.get(kid)
        elif issuer.jwks is None and jku is None:  # only a jku allowlist, and the token has none
            raise AuthFailure("no_key_source")
        else:
            # The configured (pinned) JWKS first, even when the token names an allowlisted `jku`:
            # a deployment can then trust an issuer offline, with no fetch of the `jku` URL.
            jwk = None
            for location in dict.fromkeys(loc for loc in (issuer.jwks, jku) if loc is not None):
                try:
                    jwk = self.jwks_cache(location).get(kid)
                except JwksUnavailable:
                    if jku is None or location == jku:
                        raise AuthFailure("jwks_unavailable") from None
                    continue  # the pinned set is unreadable: the allowlisted jku may still serve
                if jwk is not None:
                    break
        if jwk is None:
            raise AuthFailure("unknown_kid")
        return jwk

    def _decode(self, token: str, jwk: dict[str, Any], alg: str, iss: str, audience: str) -> dict[str, Any]:
        if jwk.get("alg") not in (None, alg):
            raise AuthFailure("key_alg_mismatch")
        try:
            key = self._verifying_key(jwk, alg)  # fails when the key type/curve does not fit `alg`
        except jwt.PyJWTError:
            raise AuthFailure("key_alg_mismatch") from None
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=audience, issuer=iss,
                leeway=self.settings.jwt_leeway_seconds,
                options={"require": ["iss", "aud", "exp", "iat", "jti"], "verify_sub": False},
            )
        except jwt.InvalidSignatureError:
            raise AuthFailure("bad_signature") from None
        except jwt.ExpiredSignatureError:
            raise AuthFailure("expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailure("not_yet_valid") from None
        except jwt.InvalidAudienceError:
            # The signature was good (PyJWT checks it before the claims): say which URL the
            # client signed for, so an integrator sees e.g. localhost vs 127.0.0.1 at once.
            received = jwt.decode(token, options={"verify_signature": False}).get("aud")
            log.warning("wrong_aud", extra={"event": "auth_wrong_aud", "detail": (
                f"expected aud {audience!r} (CDS_PUBLIC_BASE_URL + path, else this request's "
                f"host + path), received {_loggable(received, 300)!r}")})
            raise AuthFailure("wrong_aud") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthFailure(f"missing_{exc.claim}") from None
        except jwt.PyJWTError:
            raise AuthFailure("invalid_claims") from None
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise AuthFailure("invalid_jti")
        exp, iat = claims["exp"], claims["iat"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (exp, iat)):
            raise AuthFailure("invalid_claims")  # NumericDate must be a JSON number, not a string
        if exp - iat > MAX_TOKEN_LIFETIME_SECONDS:
            raise AuthFailure("lifetime_too_long")
        return claims

    def _verifying_key(self, jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
        """`jwt.PyJWK(jwk, algorithm=alg)`, built once per key and algorithm: building it parses
        the key's numbers into a public-key object, about as long as decoding the token's header.

        Keyed by the JWK object itself (the key-set caches and the demo issuer hand out the same
        dict for as long as they keep a key, and never change it); the entry holds that dict, so
        its id cannot be reused by another while the entry lives.  A refreshed key set brings new
        dicts, hence new entries; the memo is emptied when it reaches `MAX_VERIFYING_KEYS`.
        Failures are not remembered (they raise every time)."""
        entry = self._verifying_keys.get((id(jwk), alg))
        if entry is not None and entry[0] is jwk:
            return entry[1]
        key = jwt.PyJWK(jwk, algorithm=alg)
        if len(self._verifying_keys) >= MAX_VERIFYING_KEYS:
            self._verifying_keys.clear()
        self._verifying_keys[(id(jwk), alg)] = (jwk, key)
        return key

    @staticmethod
    def _check_tenant(issuer: TrustedIssuer, claims: dict[str, Any]) -> None:
        if issuer.tenants is not None and claims.get("tenant") not in issuer.tenants:
            raise AuthFailure("tenant_not_allowed")

    def _check_not_replayed(self, iss: str, claims: dict[str, Any]) -> None:
        try:
            is_new = self.store.remember_jti(iss, claims["jti"], float(claims["exp"]))
        except Exception as exc:  # noqa: BLE001 - fail closed if the replay cache is unavailable
            log.error("replay_cache_error", extra={"event": "replay_cache_error", "error_type": type(exc).__name__})
            raise AuthFailure("replay_cache_unavailable") from None
        if not is_new:
            raise AuthFailure("replayed_jti")


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value (raises AuthFailure)."""
    if not authorization:
        raise AuthFailure("missing_authorization")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthFailure("not_bearer")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthFailure("token_too_long")
    return token


def _loggable(value: Any, limit: int) -> str:
    """A short, character-restricted rendering of a value that is safe to put in a log line."""
    return _SAFE_LOG_VALUE.sub("?", str(value))[:limit]


# ---------------------------------------------------------------------------------------------
# Demo signer
# ---------------------------------------------------------------------------------------------


class DemoIssuer:
    """A stand-in EHR signer for demo mode: one ES384 key per data directory, shared by all workers."""

    ISSUER = "urn:b12-neck-cds:demo-ehr"
    ADMIN_ISSUER = "urn:b12-neck-cds:demo-admin"
    """The `iss` of the demo's report tokens (an admin issuer in demo mode, not a hook issuer)."""
    ALGORITHM = "ES384"
    KEY_FILE = "demo-issuer-es384.pem"
    TOKEN_LIFETIME_SECONDS = 300

    def __init__(self, settings: Settings) -> None:
        self._private_key = _load_or_create_key(Path(settings.data_dir) / self.KEY_FILE)
        public = ECAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        self.kid = jwk_thumbprint(public)
        self._admin_scope = settings.admin_scope
        self.public_jwk: dict[str, Any] = {**public, "kid": self.kid, "alg": self.ALGORITHM, "use": "sig"}

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS document (for a demo `/.well-known/jwks.json`, if one is served)."""
        return {"keys": [dict(self.public_jwk)]}

    def mint(self, audience: str, *, admin: bool = False) -> str:
        """A short-lived token for a call to `audience` (the full URL), shaped like an EHR's;
        `admin`: a report token (demo admin issuer, and `CDS_ADMIN_SCOPE` when one is set)."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.ADMIN_ISSUER if admin else self.ISSUER, "aud": audience,
                                  "iat": now, "exp": now + self.TOKEN_LIFETIME_SECONDS, "jti": uuid.uuid4().hex}
        if admin and self._admin_scope:
            claims["scope"] = self._admin_scope
        return jwt.encode(claims, self._private_key, algorithm=self.ALGORITHM,
                          headers={"kid": self.kid, "typ": "JWT"})


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC or RSA public JWK (base64url, no padding)."""
    members = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("e", "kty", "n")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the P-384 key at `path`, creating it (mode 0600, shared by workers) if missing."""
    pem = read_or_create_secret(path, lambda: ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ValueError(f"{path} is not an EC P-384 private key")
    return key
