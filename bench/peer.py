"""Part 5: the closest Python peer, HealthChain, on the same prefetch, in process.

HealthChain's CDS Hooks service (`bench/peer_healthchain_app.py`, declared its documented way)
runs in its own virtual environment, because HealthChain pins fhir.resources < 8.2 and this
project needs >= 8.3.  The environment is created on first use under `bench/.peer-venv`
(`PEER_REQUIREMENT`, from PyPI) and reused afterwards.

Both sides are timed in process (Flask's test client for the service, Starlette's for the peer)
on the same request bytes, so the comparison is about the frameworks and the work each does
with the prefetch, not about HTTP servers (stock uvicorn with several workers adds ~44 ms per
keep-alive request: uvicorn issue 3149).  The peer applies no clinical logic at all, so the ratio
understates the difference for equal work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path

from bench.patients import Patient, hook_body

PEER_REQUIREMENT = "healthchain==0.16.1"
PEER_VENV = Path(__file__).resolve().parent / ".peer-venv"
PEER_APP = Path(__file__).resolve().parent / "peer_healthchain_app.py"


@dataclass
class PeerRow:
    size: str
    resources: int
    calls: int
    peer_p50_ms: float
    peer_p99_ms: float
    service_p50_ms: float
    service_p99_ms: float

    @property
    def ratio_p50(self) -> float:
        """How many times longer the peer takes than the service (p50)."""
        return self.peer_p50_ms / self.service_p50_ms


def ensure_peer_env(path: Path = PEER_VENV) -> Path:
    """The peer environment's python, creating the environment if needed (prints progress)."""
    python = path / "bin" / "python"
    marker = path / ".installed"
    if marker.exists() and marker.read_text() == PEER_REQUIREMENT:
        return python
    print(f"creating the peer's virtual environment in {path} ({PEER_REQUIREMENT}; once)...",
          file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", PEER_REQUIREMENT],
                   check=True)
    marker.write_text(PEER_REQUIREMENT)
    return python


def run_peer(patients: list[Patient], iterations: dict[str, int],
             service_ms: dict[str, tuple[float, float]]) -> list[PeerRow]:
    """Time the peer on each patient's hook body; `service_ms` is size -> (p50, p99) of the
    service on the same bytes, measured in this run (part 1)."""
    python = ensure_peer_env()
    with tempfile.TemporaryDirectory(prefix="b12-peer-") as tmp:
        args = []
        for p in patients:
            body = Path(tmp) / f"{p.size}.json"
            body.write_bytes(hook_body(p, hook_instance=f"bench-peer-{p.size}"))
            args.append(f"{body}:{iterations[p.size]}")
        done = subprocess.run([str(python), str(PEER_APP), *args], capture_output=True, text=True, timeout=1800)
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"peer benchmark failed: {done.stderr[-500:]}") from None
    if "error" in answer:
        raise RuntimeError(f"peer benchmark failed: {answer['error']}")
    rows = []
    for p, res in zip(patients, answer["results"]):
        p50, p99 = service_ms[p.size]
        rows.append(PeerRow(size=p.size, resources=p.resource_count, calls=res["calls"],
                            peer_p50_ms=res["p50_ms"], peer_p99_ms=res["p99_ms"],
                            service_p50_ms=p50, service_p99_ms=p99))
    return rows
