"""docs/try-it.md's offline CDS Hooks Sandbox recipe works as written: the `CDS_TRUSTED_ISSUERS`
it gives (run from the repository root) finds the sandbox's signing key in the pinned
docs/sandbox-jwks.json for a sandbox-shaped token (ES384, `kid`, allowlisted `jku`) without any
outbound request; and the page warns about localhost versus 127.0.0.1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cds_service.config import Settings
from cds_service.security import RequestVerifier, parse_jwks

REPO = Path(__file__).resolve().parents[1]
TRY_IT = (REPO / "docs" / "try-it.md").read_text(encoding="utf-8")
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"  # what the sandbox puts in its JWT header


def offline_recipe() -> dict:
    configs = [json.loads(m) for m in re.findall(r"export CDS_TRUSTED_ISSUERS='([^']+)'", TRY_IT)]
    pinned = [c for c in configs if "jwks" in c.get(SANDBOX_ISS, {})]
    assert len(pinned) == 1, "try-it.md should give exactly one offline (pinned) recipe"
    return pinned[0]


def test_pinned_file_is_the_sandbox_es384_key() -> None:
    keys = parse_jwks(json.loads((REPO / "docs" / "sandbox-jwks.json").read_text()))
    assert set(keys) == {SANDBOX_KID}
    assert keys[SANDBOX_KID]["crv"] == "P-384" and keys[SANDBOX_KID]["alg"] == "ES384"
    assert "d" not in keys[SANDBOX_KID]  # public key only


def test_offline_recipe_finds_the_key_without_fetching(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = offline_recipe()
    assert config[SANDBOX_ISS]["jku"] == [SANDBOX_JKU]
    monkeypatch.chdir(REPO)  # "from the repository root"

    def no_network(*args, **kwargs):
        raise AssertionError("the offline recipe fetched the jku")

    monkeypatch.setattr("cds_service.security.requests.get", no_network)
    settings = Settings.from_env({"trusted_issuers": json.dumps(config), "data_dir": str(tmp_path)}, environ={})
    verifier = RequestVerifier(settings, store=None)  # type: ignore[arg-type]
    issuer = verifier.issuers[SANDBOX_ISS]
    jwk = verifier._signing_key(issuer, {"alg": "ES384", "typ": "JWT", "kid": SANDBOX_KID, "jku": SANDBOX_JKU})
    assert jwk["x"] == "dw_JGR8nB2I6XveNxUOl2qk699ZPLM2nYI5STSdiEl9avAkrm3CkfYMbrrjr8laB"


def test_try_it_warns_about_localhost_versus_127_0_0_1() -> None:
    assert "**`localhost` is not `127.0.0.1`.**" in TRY_IT
    assert "auth_wrong_aud" in TRY_IT
