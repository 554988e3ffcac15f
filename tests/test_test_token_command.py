"""`b12-cds test-token` (through the real entry point) mints a JWT the service accepts outside
demo mode once `CDS_TRUSTED_ISSUERS` trusts the printed configuration, and only for its `aud`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.servers import hook_body

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
PV = "/cds-services/b12-neck-pain-patient-view"
BASE = "http://127.0.0.1:8080"


def b12_cds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([B12_CDS, *args], capture_output=True, text=True, timeout=60)


def test_minted_token_is_accepted_for_its_url_only(make_app, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "issuer.pem"
    config = b12_cds("test-token", "--key", str(key), "--print-config")
    assert config.returncode == 0, config.stderr
    trusted = json.loads(config.stdout)
    assert key.stat().st_mode & 0o777 == 0o600

    app = make_app(auth_disabled=False, trusted_issuers=json.dumps(trusted))
    client = app.test_client()
    body = hook_body(patient_id="p1", prefetch={"patient": None, "conditions": None})

    def call(aud: str) -> int:
        minted = b12_cds("test-token", "--key", str(key), "--aud", aud)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert token.count(".") == 2 and "CDS_TRUSTED_ISSUERS" in minted.stderr
        return client.post(PV, json=body, headers={"Authorization": f"Bearer {token}"}, base_url=BASE).status_code

    # Accepted (past the JWT: the empty prefetch then gives 412, not 401).
    assert call(BASE + PV) == 412
    assert call("http://localhost:8080" + PV) == 401  # another URL
    unknown = make_app(auth_disabled=False, data_dir=str(tmp_path / "other"))  # issuer not trusted
    token = b12_cds("test-token", "--key", str(key), "--aud", BASE + PV).stdout.strip()
    assert unknown.test_client().post(PV, json=body, headers={"Authorization": f"Bearer {token}"},
                                      base_url=BASE).status_code == 401


def test_missing_aud_is_a_one_line_error(tmp_path: Path) -> None:
    proc = b12_cds("test-token", "--key", str(tmp_path / "k.pem"))
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "b12-cds test-token: --aud URL is required (the exact URL the token will be sent to)")
