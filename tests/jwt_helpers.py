"""Test helpers: mint EC/RSA keys, JWKS documents and CDS-client JWTs (no network).

Typical use::

    ehr = make_issuer()                                   # ES384, iss https://ehr.example.org
    settings = {"trusted_issuers": trusted_issuers_json(ehr, jwks=write_jwks(tmp_path, ehr))}
    headers = {"Authorization": f"Bearer {ehr.token(aud='http://localhost/cds-services/x')}"}

`token(aud, headers=..., **claims)` overrides claims (and header fields); a value of None removes it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

DEFAULT_ISSUER = "https://ehr.example.org"
SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"

_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass
class SigningIssuer:
    """A fake CDS client (EHR) holding a private key."""

    iss: str
    alg: str
    kid: str
    private_key: Any
    public_jwk: dict[str, Any]
    jku: str | None = None
    """When set, every token carries this `jku` header."""

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS document for this issuer's key."""
        return {"keys": [dict(self.public_jwk)]}

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, aud: str, **overrides: Any) -> dict[str, Any]:
        """Sandbox-style claims (iss, aud, iat, exp = iat + 300, random jti, no sub), then overrides."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.iss, "aud": aud, "iat": now, "exp": now + 300,
                                  "jti": uuid.uuid4().hex}
        return _apply(claims, overrides)

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": self.alg, "typ": "JWT", "kid": self.kid}
        if self.jku:
            header["jku"] = self.jku
        return _apply(header, overrides)

    def token(self, aud: str, *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed JWT for `aud`; `claims`/`headers` override the defaults (None removes)."""
        return self.sign(self.claims(aud, **claims), headers=headers)

    def sign(self, claims: dict[str, Any], *, headers: dict[str, Any] | None = None) -> str:
        """Sign exactly `claims` (no defaults added) with this issuer's key and header."""
        header = self.header(**(headers or {}))
        alg = header.pop("alg")
        return jwt.encode(claims, self.private_key, algorithm=alg, headers=header, sort_headers=False)

    def entry(self, *, jwks: str | None = None, jku: list[str] | None = None,
              tenants: list[str] | None = None) -> dict[str, Any]:
        """This issuer's `CDS_TRUSTED_ISSUERS` entry."""
        entry: dict[str, Any] = {}
        if jwks is not None:
            entry["jwks"] = jwks
        if jku is not None:
            entry["jku"] = jku
        if tenants is not None:
            entry["tenants"] = tenants
        return entry


def make_issuer(alg: str = "ES384", iss: str = DEFAULT_ISSUER, *, kid: str | None = None,
                jku: str | None = None) -> SigningIssuer:
    """A new issuer with a fresh key: ES256/384/512 (EC) or RS*/PS* (RSA 2048)."""
    if alg in _EC_CURVES:
        private_key: Any = ec.generate_private_key(_EC_CURVES[alg]())
        public = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    elif alg[:2] in ("RS", "PS"):
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        raise ValueError(f"unsupported algorithm {alg}")
    kid = kid or uuid.uuid4().hex
    return SigningIssuer(iss=iss, alg=alg, kid=kid, private_key=private_key,
                         public_jwk={**public, "kid": kid, "alg": alg, "use": "sig"}, jku=jku)


def sandbox_issuer(jku: str) -> SigningIssuer:
    """An issuer shaped like the public CDS Hooks Sandbox (ES384, fixed kid, `jku` in every header)."""
    return make_issuer("ES384", SANDBOX_ISSUER, kid=SANDBOX_KID, jku=jku)


def jwks_of(*issuers: SigningIssuer) -> dict[str, Any]:
    """One JWKS document with the keys of all `issuers`."""
    return {"keys": [dict(i.public_jwk) for i in issuers]}


def write_jwks(directory: Path, *issuers: SigningIssuer, name: str = "jwks.json") -> str:
    """Write `jwks_of(issuers)` to `directory/name`; returns the path."""
    path = Path(directory) / name
    path.write_text(json.dumps(jwks_of(*issuers)), encoding="utf-8")
    return str(path)


def trusted_issuers_json(*entries: tuple[SigningIssuer, dict[str, Any]]) -> str:
    """`CDS_TRUSTED_ISSUERS` JSON from `(issuer, issuer.entry(...))` pairs."""
    return json.dumps({issuer.iss: entry for issuer, entry in entries})


# -- forged tokens (attacks) ---------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())


def unsigned_token(issuer: SigningIssuer, aud: str) -> str:
    """`alg: none` with otherwise valid claims and an empty signature."""
    return _segments(issuer.header(alg="none"), issuer.claims(aud)) + "."


def hs256_with_public_key(issuer: SigningIssuer, aud: str) -> str:
    """The classic key-confusion attack: HS256 keyed with the issuer's public key (PEM bytes)."""
    signing_input = _segments(issuer.header(alg="HS256"), issuer.claims(aud))
    mac = hmac.new(issuer.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(mac)


def tamper_payload(token: str, **changes: Any) -> str:
    """`token` with claims changed but the original signature kept (a bad signature)."""
    header_b64, payload_b64, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    return header_b64 + "." + b64url(json.dumps(_apply(payload, changes)).encode()) + "." + signature


def _apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result
