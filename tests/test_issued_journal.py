"""The issued-card journal (SQLite): a hook call's cards are a line appended to its process's
journal, folded into `issued_cards` later, and still every reader sees every card at once.

The other processes here are real interpreters (`python -c`, as gunicorn workers are separate
processes) that record cards through their own `Store` with folding turned off (so the cards
are only in their journal), then are killed with SIGKILL or kept alive while this process reads.
Each test first checks that the cards are not in the database yet: what follows then tests the
journal, not the database.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

import cds_service.store as store_module
from cds_service.config import Settings
from cds_service.store import IssuedCard, Store

SVC = "b12-neck-pain-order-select"
TS = "2024-03-01T10:00:00.000000Z"

# A worker: records the cards named on each stdin line ("card-uuid kind encounter"), answers
# "recorded <pid>" once each line's cards are recorded, never folds (interval: an hour).
WORKER = textwrap.dedent("""
    import sys
    import cds_service.store as store_module
    from cds_service.config import Settings
    from cds_service.store import IssuedCard, Store
    store_module.JOURNAL_FOLD_INTERVAL_SECONDS = 3600
    store_module.JOURNAL_RECOVERY_INTERVAL_SECONDS = 3600
    store = Store.open(Settings(data_dir=sys.argv[1]))
    import os
    for line in sys.stdin:
        uuid, kind, encounter = line.split()
        store.record_issued_cards("b12-neck-pain-order-select", "hook-" + uuid, "patient-1",
                                  [IssuedCard(uuid, kind, (uuid + "-s",), situation='{"b12":"x"}')],
                                  encounter_id=encounter)
        print("recorded", os.getpid(), flush=True)
""")


class Worker:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(data_dir)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def record(self, uuid: str, kind: str = "b12-test", encounter: str = "enc-1") -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{uuid} {kind} {encounter}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().startswith("recorded"), "the worker did not answer"

    def kill(self) -> None:
        """SIGKILL the moment its answer was read (nothing of it runs after)."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    Store.open(Settings(data_dir=str(path))).close()
    return path


@pytest.fixture
def worker(data_dir: Path):
    w = Worker(data_dir)
    yield w
    w.stop()


def _in_database(data_dir: Path) -> set[str]:
    """The card uuids in `issued_cards` itself (a plain connection: no journal read)."""
    conn = sqlite3.connect(data_dir / "cds.sqlite3")
    try:
        return {r[0] for r in conn.execute("SELECT card_uuid FROM issued_cards")}
    finally:
        conn.close()


def _journals(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "issued-journal").glob("*.journal"))


def _lockout(store: Store, encounter: str = "enc-1", kind: str = "b12-test"):
    now = datetime.now(timezone.utc)
    return store.policy_records("patient-1", kind, now, encounter, now - timedelta(hours=12)).lockout


def _accept(card: str) -> dict:
    return {"card": card, "outcome": "accepted", "acceptedSuggestions": [{"id": f"{card}-s"}],
            "outcomeTimestamp": TS}


def test_cards_of_a_killed_worker_lock_out_get_feedback_and_are_counted(data_dir, worker):
    worker.record("c1")
    worker.record("c2", kind="other-kind")
    worker.kill()
    assert _in_database(data_dir) == set() and len(_journals(data_dir)) == 1

    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        lock = _lockout(store)
        assert lock is not None and lock.service_id == SVC and lock.situation == '{"b12":"x"}'
        assert _lockout(store, encounter="enc-2") is None
        result = store.save_feedback(SVC, [_accept("c1")])
        assert result.unknown_cards == () and not store.feedback_rows()[0]["unknown_suggestions"]
        kinds = {k["kind"]: k["issued"] for k in store.feedback_report()["kinds"]}
        assert kinds == {"b12-test": 1, "other-kind": 1}
        # Folded by the feedback (before it read), and the dead worker's journal removed.
        assert _in_database(data_dir) == {"c1", "c2"} and _journals(data_dir) == []
    finally:
        store.close()


def test_a_killed_workers_journal_is_folded_when_the_service_starts(data_dir, worker):
    worker.record("c1")
    worker.kill()
    Store.open(Settings(data_dir=str(data_dir))).close()
    assert _in_database(data_dir) == {"c1"} and _journals(data_dir) == []


def test_a_live_workers_unfolded_cards_are_seen_at_once_and_counted_once(data_dir, worker):
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        assert _lockout(store) is None
        worker.record("c1")
        assert _in_database(data_dir) == set()
        assert _lockout(store) is not None  # read from the worker's journal
        assert _lockout(store, kind="other-kind") is None
        assert store.feedback_report()["totals"]["issued"] == 1
        # The report folded the live journal but left it to its writer, which goes on with it.
        (live,) = _journals(data_dir)
        worker.record("c2")
        assert _journals(data_dir) == [live]
        result = store.save_feedback(SVC, [_accept("c1"), _accept("c2")])
        assert result.unknown_cards == ()
        assert store.feedback_report()["totals"]["issued"] == 2  # c1 folded twice, counted once
        assert store.issued_per_day()[0]["issued"] == 2
        assert _in_database(data_dir) == {"c1", "c2"}
    finally:
        store.close()


def test_the_lockout_reads_the_journal_before_the_database(data_dir, worker, monkeypatch):
    """A card folded (committed, its journal removed) by another process just as the lockout
    reads is still found: the journal is read first, so a fold that empties it has committed
    before the database read.  (Read the other way round, the database read would come before
    the fold, the journal read after it, and both would miss the card.)"""
    worker.record("c1")
    worker.kill()
    store = Store.open(Settings(data_dir=str(data_dir)))
    # Store.open folded the dead worker's journal: record a card in a journal again, folded
    # (and its file removed) the moment the lockout reads the journals.
    store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c2", "b12-test")], encounter_id="enc-2")
    read = store._journal_lockout_rows

    def fold_then_read(*args):
        store.fold_journals()
        assert _journals(data_dir) == []
        return read(*args)

    monkeypatch.setattr(store, "_journal_lockout_rows", fold_then_read)
    try:
        assert _lockout(store, encounter="enc-2") is not None
        assert _in_database(data_dir) >= {"c2"}
    finally:
        store.close()


def test_a_process_folds_its_own_journal_by_itself(data_dir, monkeypatch):
    monkeypatch.setattr(store_module, "JOURNAL_FOLD_INTERVAL_SECONDS", 0.05)
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c1", "b12-test")])
        deadline = time.monotonic() + 10
        while _in_database(data_dir) != {"c1"} or _journals(data_dir):
            assert time.monotonic() < deadline, "the fold thread did not fold"
            time.sleep(0.02)
    finally:
        store.close()


def test_closing_the_store_folds_and_ends_its_thread(data_dir):
    store = Store.open(Settings(data_dir=str(data_dir)))
    store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c1", "b12-test")])
    journal = store._journal
    assert journal is not None and journal._thread is not None
    store.close()
    assert journal._thread is None and _in_database(data_dir) == {"c1"} and _journals(data_dir) == []
    store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c2", "b12-test")])  # usable again
    assert store.feedback_report()["totals"]["issued"] == 2
    store.close()


def test_unreadable_lines_lose_nothing(data_dir):
    """A finished journal with a line that cannot be read: the readable lines are folded and the
    file is kept (renamed), never removed; bytes after the last newline (a write that never
    completed) are ignored."""
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c1", "b12-test")])
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c2", "b12-test")])
        journal = store._journal
        assert journal is not None
        with journal._lock:
            path = journal._finish_current()  # as if its writer had died
        assert path is not None
        good = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(good[0] + b'[1,["half a row"]]\n' + b"{not json\n" + good[1] + b'[1,["c3", "b1')
        store.fold_journals()
        assert _in_database(data_dir) == {"c1", "c2"}
        assert not path.exists() and path.with_suffix(".unreadable").exists()
    finally:
        store.close()


def test_a_journal_that_cannot_be_written_falls_back_to_the_database(data_dir, monkeypatch):
    def full(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module._IssuedJournal, "append", full)
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c1", "b12-test")])
        assert _in_database(data_dir) == {"c1"}
    finally:
        store.close()


def test_a_short_write_finishes_the_file(data_dir, monkeypatch):
    """Nothing is ever appended after a partial line: the next card goes to a new file."""
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c1", "b12-test")])
        first = store._journal._path
        real_write = os.write
        monkeypatch.setattr(store_module.os, "write", lambda fd, data: real_write(fd, data[:10]))
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c2", "b12-test")])
        monkeypatch.undo()
        assert _in_database(data_dir) == {"c2"}  # written to the database instead
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c3", "b12-test")])
        assert store._journal._path != first
        store.fold_journals()
        assert _in_database(data_dir) == {"c1", "c2", "c3"} and _journals(data_dir) == []
    finally:
        store.close()


def test_a_forked_child_writes_its_own_journal(data_dir):
    """A store used before fork(): the child never writes through (or keeps locked) the
    parent's journal file; its cards go to a file of its own."""
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("parent-card", "b12-test")])
        parent_file = store._journal._path
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                store_module.JOURNAL_FOLD_INTERVAL_SECONDS = 3600
                store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("child-card", "b12-test")])
                os.write(write_end, str(store._journal._path).encode())
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.close(write_end)
        child_file = Path(os.read(read_end, 4096).decode())
        os.close(read_end)
        os.waitpid(pid, 0)
        assert child_file != parent_file and child_file.name.startswith(f"{pid}-")
        assert b"parent-card" not in child_file.read_bytes()
        assert b"child-card" not in parent_file.read_bytes()
        # The child is gone: its file is finished (lock free), the parent's still the parent's.
        assert store_module.journal_files(data_dir / "issued-journal") == sorted([parent_file, child_file])
        store_module.fold_journal_files(data_dir / "issued-journal", [parent_file, child_file],
                                        store._insert_rows, finished_only=True)
        assert _in_database(data_dir) == {"child-card"} and parent_file.exists()
        assert store.feedback_report()["totals"]["issued"] == 2
    finally:
        store.close()


def test_a_fold_that_fails_keeps_every_line(data_dir, worker, monkeypatch):
    """A line leaves its journal only after the transaction that inserted it committed."""
    worker.record("c1")
    worker.kill()
    store = Store.__new__(Store)  # not Store.open: that would fold the dead worker's journal
    Store.__init__(store, "sqlite", sqlite_path=data_dir / "cds.sqlite3",
                   patient_hash_key=Store.open(Settings(data_dir=str(data_dir / "other")))._patient_key)
    store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard("c2", "b12-test")])

    def locked(rows):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_insert_rows", locked)
    with pytest.raises(sqlite3.OperationalError):
        store.fold_journals()
    assert len(_journals(data_dir)) == 2 and _in_database(data_dir) == set(), list((data_dir / "issued-journal").iterdir())
    monkeypatch.undo()
    store.fold_journals()
    assert _in_database(data_dir) == {"c1", "c2"} and _journals(data_dir) == []
    store.close()


def test_the_fold_thread_ends_when_idle_and_closes_its_connection(data_dir, monkeypatch):
    monkeypatch.setattr(store_module, "JOURNAL_FOLD_INTERVAL_SECONDS", 0.01)
    monkeypatch.setattr(store_module, "JOURNAL_IDLE_FOLDS", 3)
    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        for round_ in range(3):  # each round starts a thread again, which ends again
            store.record_issued_cards(SVC, "h", "patient-1", [IssuedCard(f"c{round_}", "b12-test")])
            journal = store._journal
            deadline = time.monotonic() + 10
            while journal._thread is not None:
                assert time.monotonic() < deadline, "the fold thread did not end"
                time.sleep(0.01)
            assert store._all_conns == []  # its connection closed with it
        assert _in_database(data_dir) == {"c0", "c1", "c2"}
    finally:
        store.close()


def test_the_lockout_reads_each_journal_on_from_where_it_stopped(data_dir):
    """A line the lockout read finds half-written is read whole next time; lines added later
    are read then; a journal that leaves the directory (folded) is forgotten, its cards then
    found in the database."""
    store = Store.open(Settings(data_dir=str(data_dir)))
    journal_dir = data_dir / "issued-journal"
    journal_dir.mkdir()
    path = journal_dir / "999999-0123456789abcdef.journal"
    now = datetime.now(timezone.utc)

    def line(card: str, encounter: str) -> bytes:
        row = [card, SVC, "b12-test", "h", store.patient_hash("patient-1"),
               store_module.timestamp_text(now), "shown", store.encounter_hash(encounter), None, None, "[]"]
        return orjson.dumps([1, row]) + b"\n"

    try:
        first = line("c1", "enc-1")
        path.write_bytes(first[:40])
        assert _lockout(store) is None
        with path.open("ab") as f:
            f.write(first[40:] + line("c2", "enc-2")[:-1])
        assert _lockout(store) is not None and _lockout(store, encounter="enc-2") is None
        with path.open("ab") as f:
            f.write(b"\n")
        assert _lockout(store, encounter="enc-2") is not None
        store.fold_journals()  # nobody holds its lock: folded and removed
        assert not path.exists() and _in_database(data_dir) == {"c1", "c2"}
        assert _lockout(store) is not None and store._journal_reader._files == {}
    finally:
        store.close()
