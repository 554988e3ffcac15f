"""The Docker image, tested without a Docker engine (there is none on the build machines).

What is tested here: the base image is pinned by a version tag; `.dockerignore` (with Docker's
own matching rules, from the Docker SDK) keeps `.venv`, `data/` with its keys, `.git` and caches
out of the build context and keeps everything the Dockerfile COPYs; the image's CMD runs as its
non-root USER with its ENV, from the package installed the way the Dockerfile installs it (a
wheel, not the source tree), logs no error line at start, and the HEALTHCHECK command follows
`CDS_BIND`.  What is not: `docker build` itself, the base image's contents and digest, the
volume and the HEALTHCHECK timing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
from docker.utils.build import exclude_paths

from tests.integration.wheel_install import REPO, build_wheel, install_into_fresh_venv
from tests.servers import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.integration

DOCKERFILE = (REPO / "Dockerfile").read_text()
IMAGE_UID = int(re.search(r"useradd .*--uid (\d+)", DOCKERFILE).group(1))


def instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not exec form: {args}"
    return [part.strip().strip('"') for part in args.strip("[]").split(",")]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in instructions("ENV"):
        env.update(dict(item.split("=", 1) for item in shlex.split(line)))
    return env


def test_base_image_is_pinned_by_version() -> None:
    [base] = instructions("FROM")
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base


def test_dockerignore_keeps_secrets_and_environments_out(tmp_path: Path) -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    ctx = tmp_path / "context"
    shutil.copytree(REPO, ctx, ignore=shutil.ignore_patterns(".git", ".venv", "data", "*.egg-info"))
    for junk in (".venv/bin/python", ".venv/lib/python3.11/site-packages/x.py", "data/demo-issuer-es384.pem",
                 "data/patient-hash.key", "data/cds.sqlite3", ".git/config", ".git/objects/ab/cdef",
                 "cds_service/__pycache__/app.cpython-311.pyc", ".pytest_cache/v/x", ".hypothesis/examples/x",
                 "b12_neck_cds.egg-info/PKG-INFO", "build/lib/x.py", "test-artifacts/shot.png", ".env"):
        (ctx / junk).parent.mkdir(parents=True, exist_ok=True)
        (ctx / junk).write_text("x")
    sent = set(exclude_paths(str(ctx), patterns))
    for prefix in (".venv", "data", ".git", "build", "test-artifacts", ".pytest_cache", ".hypothesis"):
        assert not any(p == prefix or p.startswith(prefix + "/") for p in sent), prefix
    assert not any("__pycache__" in p or p.endswith((".pem", ".key", ".pyc")) or ".egg-info" in p for p in sent)
    assert ".env" not in sent
    # Everything the Dockerfile COPYs is still in the context.
    for line in instructions("COPY"):
        for src in line.split()[:-1]:
            path = REPO / src
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                  and "__pycache__" not in p.parts]
            assert files, src
            for f in files:
                assert str(f.relative_to(REPO)) in sent, f


@pytest.fixture(scope="module")
def image_like_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package as the image has it: the wheel installed in a fresh environment (from the
    system Python when there is one, like the image's), in a directory the image's user can read."""
    wheel = build_wheel(tmp_path_factory.mktemp("docker-build"))
    root = Path(tempfile.mkdtemp(prefix="b12-image-"))
    os.chmod(root, 0o755)
    base = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else None
    try:
        yield install_into_fresh_venv(wheel, root / "venv", *( [base] if base else []))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_image_user() -> dict[str, int]:
    """Run as the image's uid when we are root (and it can run the interpreter), else as
    ourselves: either way not as root, like the image."""
    if os.geteuid() != 0:
        return {}
    return {"user": IMAGE_UID, "group": IMAGE_UID, "extra_groups": []}


def test_image_cmd_runs_as_its_user_with_its_environment(image_like_install: Path, tmp_path: Path) -> None:
    venv = image_like_install
    cmd = exec_form(instructions("CMD")[-1])
    health = exec_form(re.sub(r"^.*?CMD\s+", "", instructions("HEALTHCHECK")[-1]))
    assert cmd == ["b12-cds", "serve"] and health == ["b12-cds", "healthcheck"]
    env = image_env()
    assert env["CDS_BIND"] == "0.0.0.0:8080" and "CDS_CARDS_DIR" not in env  # shipped defaults

    # The image's data volume: owned by its user, mode 0700.  Only the address differs (tests
    # listen on loopback, on a free port); everything else is the image's ENV.
    work = Path(tempfile.mkdtemp(prefix="b12-image-run-"))
    os.chmod(work, 0o755)
    data = work / "var-lib-b12-cds"
    data.mkdir(mode=0o700)
    prom = work / "prom"
    prom.mkdir()
    user = _as_image_user()
    if user:
        os.chown(data, IMAGE_UID, IMAGE_UID)
        os.chown(prom, IMAGE_UID, IMAGE_UID)
    port = free_port()
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(work), **env,
               "CDS_DATA_DIR": str(data), "CDS_BIND": f"127.0.0.1:{port}", "CDS_WORKERS": "1",
               "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    probe = subprocess.run(["id", "-u"], env=run_env, capture_output=True, text=True, **user)
    assert probe.stdout.strip() != "0", "the image's command must not run as root"
    server = ServerProcess([str(venv / "bin" / cmd[0]), *cmd[1:]], env=run_env, cwd=work,
                           log_path=tmp_path / "image.log", user=user.get("user"))
    try:
        with server.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60):
            pid = server.proc.pid
            assert Path(f"/proc/{pid}").stat().st_uid != 0
            assert requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=5).status_code == 200
            # HEALTHCHECK: follows CDS_BIND, wildcard address checked on loopback.
            for bind, expected in ((f"127.0.0.1:{port}", 0), (f"0.0.0.0:{port}", 0), (f"127.0.0.1:{free_port()}", 1)):
                check = subprocess.run([str(venv / "bin" / health[0]), *health[1:]], capture_output=True,
                                       text=True, env={**run_env, "CDS_BIND": bind}, timeout=30, **user)
                assert check.returncode == expected, (bind, check.stderr)
        log = server.log_tail(100_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # No error line at start (e.g. gunicorn's control socket), no traceback.
    assert "Traceback" not in log and "control" not in log.lower(), log
    for line in log.splitlines():
        level = ""
        if line.startswith("{"):
            level = str(orjson.loads(line).get("level", ""))
        assert level.upper() not in ("ERROR", "CRITICAL") and "[ERROR]" not in line, line
