"""`pip install .` (not editable) gives a service that starts anywhere: a wheel built from the
source tree (`python -m build`) carries the default cards and value sets, installed into a fresh
virtualenv it serves `/healthz` and a hook call from a directory far from the source tree, and
`CDS_CARDS_DIR` / `CDS_VALUESETS_DIR` still replace the shipped defaults.  Offline: see
tests/integration/wheel_install.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import requests

from tests.fhir_builders import metformin, neck_pain, patient
from tests.integration.wheel_install import REPO, build_wheel, install_into_fresh_venv
from tests.servers import ServerProcess, free_port, hook_body, http_ok, searchset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("build"))


def test_wheel_ships_the_default_cards_and_valuesets(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("cards", "valuesets"):
        shipped = {p.name for p in (REPO / folder).glob("*.json")}
        assert shipped and {f"cds_service/_data/{folder}/{n}" for n in shipped} <= names, folder
    assert "cds_service/demo/static/index.html" in names and "cds_service/openapi.json" in names


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_into_fresh_venv(wheel, tmp_path_factory.mktemp("venv") / "env")


def _serve(venv: Path, tmp_path: Path, **env_extra: str) -> tuple[ServerProcess, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDS_", "PYTHON"))}
    env.update({"CDS_AUTH_DISABLED": "1", "CDS_BIND": f"127.0.0.1:{port}", "CDS_WORKERS": "1",
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), **env_extra})
    elsewhere = tmp_path / "elsewhere"  # far from the source tree: relative paths cannot find it
    elsewhere.mkdir(exist_ok=True)
    server = ServerProcess([str(venv / "bin" / "b12-cds"), "serve"], env=env, cwd=elsewhere,
                           log_path=tmp_path / "serve.log")
    return server, f"http://127.0.0.1:{port}"


def _hook(base: str) -> dict:
    prefetch = {"patient": patient("1960-01-01", id="p1"),
                "conditions": searchset(neck_pain(id="np1", onset_days=200, patient_id="p1")),
                "medicationRequests": searchset(metformin(id="met1", patient_id="p1"))}
    prefetch.update({k: None for k in ("labResults", "findings", "findingValues", "medicationStatements",
                                       "procedures", "serviceRequests")})
    resp = requests.post(f"{base}/cds-services/b12-neck-pain-patient-view", timeout=10,
                         json=hook_body(patient_id="p1", prefetch=prefetch))
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_installed_wheel_serves_from_anywhere(venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cds_service; print(cds_service.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), f"imported {where}, not the installed wheel"

    server, base = _serve(venv, tmp_path)
    with server.start(http_ok(f"{base}/healthz"), timeout=60):
        assert requests.get(f"{base}/healthz", timeout=5).json()["status"] == "ok"
        assert len(requests.get(f"{base}/cds-services/", timeout=5).json()["services"]) == 3
        cards = _hook(base)["cards"]
        assert len(cards) == 1 and "B12" in cards[0]["summary"]
    # The database and keys went to the working directory, not into site-packages.
    assert (tmp_path / "elsewhere" / "data").is_dir()
    assert not any(p.name == "data" for p in (venv / "lib").glob("python3*/site-packages/*"))


def test_card_and_valueset_folders_replace_the_shipped_ones(venv: Path, tmp_path: Path) -> None:
    cards = tmp_path / "my-cards"
    shutil.copytree(REPO / "cards", cards)
    spec = json.loads((cards / "b12-test.json").read_text())
    spec["summary"]["chronic"] = "LOCAL WORDING " + spec["summary"]["chronic"][:100]
    (cards / "b12-test.json").write_text(json.dumps(spec))
    valuesets = tmp_path / "my-valuesets"
    shutil.copytree(REPO / "valuesets", valuesets)

    server, base = _serve(venv, tmp_path, CDS_CARDS_DIR=str(cards), CDS_VALUESETS_DIR=str(valuesets))
    with server.start(http_ok(f"{base}/healthz"), timeout=60):
        [card] = _hook(base)["cards"]
        assert card["summary"].startswith("LOCAL WORDING")

    # A deployment whose neck-pain value set holds nothing the record uses: no neck pain, no card.
    vs = json.loads((valuesets / "neck-pain.json").read_text())
    vs["compose"]["include"] = [{"system": "urn:test:not-a-code-system", "concept": [{"code": "nothing"}]}]
    (valuesets / "neck-pain.json").write_text(json.dumps(vs))
    (tmp_path / "serve.log").unlink()
    server, base = _serve(venv, tmp_path, CDS_VALUESETS_DIR=str(valuesets))
    with server.start(http_ok(f"{base}/healthz"), timeout=60):
        assert _hook(base)["cards"] == []
