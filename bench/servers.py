"""Server processes the benchmark starts on 127.0.0.1 (and always stops)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import REPO_ROOT


MODELS = ("serve", "gthread")
"""Serving models: `serve` is `b12-cds serve` (gunicorn asyncio workers + whole-request front,
production); `gthread` is the former production model (gunicorn gthread, 4 threads), kept for
the before/after comparison."""


def _gthread_command(port: int, workers: int, app: str, threads: int = 4) -> list[str]:
    """gunicorn gthread with the settings `b12-cds serve` used before the asyncio workers."""
    return [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
            "--worker-class", "gthread", "--threads", str(threads), "--timeout", "30",
            "--graceful-timeout", "10", "--keep-alive", "5", "--chdir", str(REPO_ROOT), app]


def _service_command(port: int, workers: int, model: str = "serve") -> list[str]:
    if model == "gthread":
        return _gthread_command(port, workers, "cds_service.app:create_app()")
    script = Path(sys.executable).parent / "b12-cds"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]
    return [*base, "serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]


def _baseline_command(port: int, workers: int, model: str = "serve") -> list[str]:
    """The baseline app under the same server and settings as the service."""
    if model == "gthread":
        return _gthread_command(port, workers, "bench.baseline_app:create_baseline_app()")
    return [sys.executable, "-m", "bench.baseline_app", "--bind", f"127.0.0.1:{port}",
            "--workers", str(workers)]


class Server:
    """A server process in its own process group; a context manager that always stops it."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str],
                 log_path: Path) -> None:
        self.name, self.command, self.port, self.env, self.log_path = name, command, port, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> "Server":
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} did not become healthy in 60 s; see {self.log_path}")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group of the process we started
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self._log.close()
        self.proc = None

    def worker_pids(self) -> list[int]:
        """gunicorn workers: the children of the server process."""
        if self.proc is None:
            return []
        return children_of(self.proc.pid)


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return sorted(kids)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def service_server(port: int, workers: int, data_dir: str, log_path: Path, model: str = "serve",
                   **extra_env: str) -> Server:
    env = dict(os.environ)
    env.update({"CDS_AUTH_DISABLED": "1", "CDS_DATA_DIR": data_dir, "CDS_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1"})
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(extra_env)
    return Server("service", _service_command(port, workers, model), port, env, log_path)


def baseline_server(port: int, workers: int, log_path: Path, model: str = "serve") -> Server:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return Server("baseline", _baseline_command(port, workers, model), port, env, log_path)
