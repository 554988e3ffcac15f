"""Durability of feedback under a real gunicorn (3 pre-fork workers sharing one SQLite database).

Phase 1: 8 concurrent clients x 500 feedback POSTs; every acknowledged (200) entry must be in
the database, exactly once.
Phase 2: the same load again; once a third of it is acknowledged the whole server process group
is killed with SIGKILL, restarted on the same data directory, and the clients carry on.  Every
entry acknowledged before, during or after the crash must be in the database.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cds_service.config import Settings
from cds_service.store import IssuedCard, Store
from tests.servers import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.integration

SVC = "b12-neck-pain-order-sign"
CLIENTS = 8
POSTS_PER_CLIENT = 500
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    port: int
    data_dir: Path
    log_path: Path
    process: ServerProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "CDS_AUTH_DISABLED": "1", "CDS_DATA_DIR": str(self.data_dir),
               "CDS_DATABASE_URL": "", "CDS_LOG_LEVEL": "ERROR"}
        self.process = ServerProcess(
            [GUNICORN, "-w", "3", "--bind", f"127.0.0.1:{self.port}", "--graceful-timeout", "5",
             "cds_service.app:create_app()"], cwd=REPO, env=env, log_path=self.log_path)
        self.process.start(http_ok(f"{self.base}/healthz"), timeout=60)

    def kill(self) -> None:
        """SIGKILL the master and every worker at once (its own process group)."""
        assert self.process is not None
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=20)


@dataclass
class Load:
    """8 client threads, each POSTing its 500 entries once, recording which were acknowledged."""

    server: Server
    phase: str
    acknowledged: set[tuple[str, str]] = field(default_factory=set)
    failed: int = 0
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_client(self, client: int) -> None:
        session = requests.Session()
        for i in range(POSTS_PER_CLIENT):
            card = f"{self.phase}-c{client}-{i}"
            ts = f"2024-05-01T10:{client:02d}:{i % 60:02d}.{i:06d}Z"
            item = {"card": card, "outcome": "overridden", "outcomeTimestamp": ts,
                    "overrideReason": {"userComment": f"load {i}"}}
            if i % 2:
                item = {"card": card, "outcome": "accepted", "outcomeTimestamp": ts,
                        "acceptedSuggestions": [{"id": f"{card}-s"}]}
            try:
                resp = session.post(f"{self.server.base}/cds-services/{SVC}/feedback",
                                    json={"feedback": [item]}, timeout=10)
            except requests.RequestException:
                with self.lock:
                    self.failed += 1
                session = requests.Session()
                time.sleep(0.05)
                continue
            with self.lock:
                if resp.status_code == 200:
                    self.acknowledged.add((card, ts))  # ts is already in the stored form
                else:
                    self.failed += 1
                    if resp.status_code != 502 and len(self.unexpected) < 5:
                        self.unexpected.append(f"{resp.status_code} {resp.text[:200]}")

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run_client, args=(n,), daemon=True)
                   for n in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def snapshot(self) -> set[tuple[str, str]]:
        with self.lock:
            return set(self.acknowledged)


def _stored(data_dir: Path) -> list[tuple[str, str]]:
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        return [(r["card_uuid"], r["outcome_timestamp"]) for r in store.feedback_rows()]
    finally:
        store.close()


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "load clients did not finish in time"


def test_acknowledged_feedback_survives_concurrency_and_sigkill(tmp_path):
    data_dir = tmp_path / "data"
    server = Server(port=free_port(), data_dir=data_dir, log_path=tmp_path / "gunicorn.log")
    # Half of the cards are known (issued), half are not: both paths write under load.
    seed = Store.open(Settings(data_dir=str(data_dir)))
    seed.record_issued_cards(SVC, "seed", "patient-1", [
        IssuedCard(f"{phase}-c{c}-{i}", "consider-b12-test", (f"{phase}-c{c}-{i}-s",))
        for phase in ("p1", "p2") for c in range(CLIENTS) for i in range(0, POSTS_PER_CLIENT, 2)])
    seed.close()

    server.start()
    try:
        # Phase 1: steady load.
        started = time.monotonic()
        phase1 = Load(server, "p1")
        _join(phase1.start(), timeout=240)
        elapsed = time.monotonic() - started
        assert phase1.unexpected == []
        assert phase1.failed == 0
        assert phase1.count() == CLIENTS * POSTS_PER_CLIENT
        stored = _stored(data_dir)
        assert len(stored) == len(set(stored)) == CLIENTS * POSTS_PER_CLIENT
        assert phase1.acknowledged <= set(stored)

        # Phase 2: SIGKILL mid-load, restart, carry on.
        phase2 = Load(server, "p2")
        threads = phase2.start()
        deadline = time.monotonic() + 120
        while phase2.count() < CLIENTS * POSTS_PER_CLIENT // 3:
            assert time.monotonic() < deadline, "phase 2 load too slow"
            time.sleep(0.01)
        server.kill()
        time.sleep(0.2)  # let responses received just before the kill be recorded
        acked_at_kill = phase2.snapshot()
        after_kill = set(_stored(data_dir))
        missing = acked_at_kill - after_kill
        assert not missing, f"{len(missing)} acknowledged entries lost by SIGKILL"
        server.start()
        _join(threads, timeout=240)
        assert phase2.unexpected == []
        stored = _stored(data_dir)
        assert len(stored) == len(set(stored))
        assert phase1.acknowledged <= set(stored)
        assert phase2.acknowledged <= set(stored)
        assert phase2.failed > 0, "the kill did not interrupt any request: not a mid-load kill"
        assert phase2.count() >= CLIENTS * POSTS_PER_CLIENT - phase2.failed
    finally:
        server.stop()

    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        conn = store._connection()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        report = store.feedback_report()
    finally:
        store.close()
    # feedback on issued cards (even indexes) is tied to their kind; the rest is flagged unknown
    known = [c for c, _ in stored if int(c.rsplit("-", 1)[1]) % 2 == 0]
    (kind,) = report["kinds"]
    assert kind["kind"] == "consider-b12-test" and kind["with_feedback"] == len(known)
    assert report["unknown_card_feedback"]["entries"] == len(stored) - len(known)
    acked = phase1.acknowledged | phase2.acknowledged
    print(f"\ndurability: phase 1: {CLIENTS * POSTS_PER_CLIENT} posts, {phase1.count()} acknowledged "
          f"in {elapsed:.1f}s; phase 2: {CLIENTS * POSTS_PER_CLIENT} posts, {phase2.count()} "
          f"acknowledged ({len(acked_at_kill)} before SIGKILL), {phase2.failed} failed around the "
          f"crash; {len(acked)} acknowledged in all, all found ({len(stored)} rows stored)")
