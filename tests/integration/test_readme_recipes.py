"""The README's shell recipes run as written (from the repository root, with `.venv/bin/...`):
the three-line local FHIR server + `seed` + `evaluate`, and the `curl` hook call with a token
from `b12-cds test-token`.  Only the ports and /tmp paths are replaced (free ports, a private
directory), so the test never clashes with a server already running on the machine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
MARK = "<!-- tested by tests/integration/test_readme_recipes.py -->"


def recipes() -> list[str]:
    blocks = re.findall(re.escape(MARK) + r"\n```sh\n(.*?)```", README, re.S)
    assert len(blocks) == 2, "the README's tested recipes moved"
    return blocks


def run_script(script: str, tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `script` in bash from the repository root; background jobs are stopped afterwards."""
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDS_", "SEKMET_"))}
    # `.venv/bin/...` as written in the README, resolved to this test run's environment.
    script = script.replace(".venv/bin/", f"{venv_bin}/")
    wrapped = f"set -e\n{script}\nkill $(jobs -p) 2>/dev/null || true\nwait\n"
    proc = subprocess.Popen(["bash", "-c", wrapped], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the script left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_local_fhir_server_seed_and_evaluate(tmp_path: Path) -> None:
    script = recipes()[0]
    assert script.count("\n") == 3, "the recipe is three lines"
    port = free_port()
    script = script.replace("8090", str(port)).replace("/tmp/b12-fhir", str(tmp_path / "b12-fhir"))
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "me-demo-metformin-chronic" in done.stdout
    assert "Decision: card b12-test, reason risk-and-symptoms (rule 8" in done.stdout
    assert "Condition/me-demo-metformin-chronic-condition-1, code 81680005" in done.stdout
    assert "Writing" in done.stderr and "me-demo-metformin-chronic" in done.stderr


def test_curl_hook_call_with_a_test_token(tmp_path: Path) -> None:
    script = recipes()[1]
    port = free_port()
    script = script.replace("8080", str(port)).replace("/tmp/b12-data", str(tmp_path / "b12-data"))
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout)
    [card] = answer["cards"]
    shown = re.search(r'"summary": "([^"]+)"', README.split("The answer (abridged):", 1)[1]).group(1)
    assert card["summary"] == shown, "the README shows another answer than the service gives"
    assert card["indicator"] == "info" and card["suggestions"][0]["label"] == "Order serum vitamin B12"
    assert "extension" not in answer  # production mode: no explanation
