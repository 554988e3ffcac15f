"""Storage contract: issued cards, idempotent feedback, the acceptance report, the JWT replay cache.

`StoreContract` holds the dialect-independent tests; `TestSqliteStore` runs them on SQLite here
and `tests/integration/test_postgres.py` runs the same class against a real PostgreSQL server.
A subclass provides the `open_store` fixture: a factory returning a freshly migrated `Store`
(calling it twice gives two `Store` objects on the same database, as two workers would have).
"""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable
from datetime import timedelta, timezone, datetime
from pathlib import Path

import pytest

from cds_service.config import Settings
from cds_service.store import (SCHEMA_VERSION, IssuedCard, PolicyRecords, Store, timestamp_text,
                               utc_now_text, utc_text_of_micros)

SVC = "b12-neck-pain-patient-view"
OTHER_SVC = "b12-neck-pain-order-sign"
TS = "2024-03-01T10:00:00.000000Z"


def accepted(card: str, *suggestions: str, ts: str = TS) -> dict:
    return {"card": card, "outcome": "accepted",
            "acceptedSuggestions": [{"id": s} for s in suggestions], "outcomeTimestamp": ts}


def overridden(card: str, *, code: str | None = None, comment: str | None = None,
               ts: str = TS) -> dict:
    entry: dict = {"card": card, "outcome": "overridden", "outcomeTimestamp": ts}
    reason: dict = {}
    if code:
        reason["reason"] = {"system": "https://example.org/override", "code": code,
                            "display": f"Reason {code}"}
    if comment:
        reason["userComment"] = comment
    if reason:
        entry["overrideReason"] = reason
    return entry


def _without_other_fold_threads(timeout: float = 20.0) -> None:
    """Wait until the issued-card journal threads that earlier tests' apps left running have
    ended (each ends after `JOURNAL_IDLE_FOLDS` idle rounds).  A process forked while another of
    its threads is inside SQLite inherits SQLite's mutexes locked and hangs on its first call;
    gunicorn forks its workers from a master that runs no such thread, and this test is about
    the forked store, not about the rest of the test session's threads."""
    for thread in threading.enumerate():
        if thread.name == "issued-card-journal" and thread is not threading.current_thread():
            thread.join(timeout)


def _remember_in_child(store: Store, jti: str, results: "multiprocessing.Queue[bool]") -> None:
    results.put(store.remember_jti("https://ehr.example.org", jti, time.time() + 300))


class StoreContract:
    """Behaviour every storage backend must have."""

    @pytest.fixture
    def store(self, open_store: Callable[[], Store]) -> Store:
        store = open_store()
        yield store
        store.close()

    # --- schema ----------------------------------------------------------------------------

    def test_schema_is_created_and_reopening_does_not_migrate_again(self, open_store):
        first = open_store()
        assert first.schema_version() == SCHEMA_VERSION
        second = open_store()  # a second worker starting on the same database
        assert second.schema_version() == SCHEMA_VERSION
        first.close()
        second.close()

    # --- issued cards ----------------------------------------------------------------------

    def test_issued_cards_store_a_keyed_hash_of_the_patient_never_the_id(self, store):
        store.record_issued_cards(SVC, "hook-1", "patient-secret-42",
                                  [IssuedCard("card-1", "consider-b12-test", ("sg-1",))])
        store.fold_journals()
        with store._transaction(write=False) as cur:
            rows = cur.execute("SELECT card_uuid, service_id, kind, hook_instance, patient_hash"
                               " FROM issued_cards").fetchall()
        assert len(rows) == 1
        card_uuid, service_id, kind, hook_instance, patient_hash = rows[0]
        assert (card_uuid, service_id, kind, hook_instance) == ("card-1", SVC, "consider-b12-test",
                                                               "hook-1")
        assert "patient-secret-42" not in patient_hash
        assert patient_hash == store.patient_hash("patient-secret-42")
        assert patient_hash != hashlib.sha256(b"patient-secret-42").hexdigest()  # keyed, not plain
        assert store.patient_hash("patient-secret-43") != patient_hash

    def test_recording_the_same_card_twice_is_a_no_op(self, store):
        card = IssuedCard("card-1", "kind-a", ("sg-1", "sg-1"))
        store.record_issued_cards(SVC, "hook-1", "p", [card])
        store.record_issued_cards(SVC, "hook-1", "p", [card])
        assert store.feedback_report()["totals"]["issued"] == 1

    def test_the_cards_of_one_call_are_recorded_together_with_their_suggestions(self, store):
        store.record_issued_cards(SVC, "h", "p", [
            IssuedCard("c1", "kind-a", ("s1", "s2")), IssuedCard("c2", "kind-b", ("s3",)),
            IssuedCard("c3", "kind-a", delivery="suppressed", withheld_by='{"outcome":"overridden"}')],
            encounter_id="enc-1")
        result = store.save_feedback(SVC, [accepted("c1", "s1", "s2"), accepted("c2", "s3"),
                                           accepted("c2", "s1")])  # s1 is c1's, not c2's
        assert result.unknown_cards == ()
        flags = [(r["card_uuid"], r["unknown_suggestions"]) for r in store.feedback_rows()]
        assert flags == [("c1", False), ("c2", False), ("c2", True)]
        kinds = {k["kind"]: k for k in store.feedback_report()["kinds"]}
        assert (kinds["kind-a"]["issued"], kinds["kind-a"]["suppressed"], kinds["kind-b"]["issued"]) == (1, 1, 1)

    @pytest.mark.parametrize("copies", [1, 6])  # a hook call's few rows; a bulk INSERT's many
    def test_every_column_is_stored_as_given_nulls_included(self, store, copies):
        """A few rows write their None values as NULL literals in the statement, many rows bind
        every value: both store exactly what was given, rows with different NULLs side by side."""
        cards = []
        for n in range(copies):
            cards += [IssuedCard(f"shown-{n}", "kind-a", ("s1", "s2"), situation='{"b12":"x"}'),
                      IssuedCard(f"bare-{n}", "kind-b"),
                      IssuedCard(f"held-{n}", "kind-a", delivery="silent", withheld_by='{"setting":"silent"}')]
        store.record_issued_cards(SVC, "h", "p", cards, encounter_id="enc-1")
        store.record_issued_cards(SVC, "h2", "p", [IssuedCard("no-encounter", "kind-a")])
        store.fold_journals()
        with store._transaction(write=False) as cur:
            rows = {r[0]: r[1:] for r in cur.execute(
                "SELECT card_uuid, kind, delivery, encounter_hash, situation, withheld_by,"
                " suggestion_uuids FROM issued_cards").fetchall()}
        enc = store.encounter_hash("enc-1")
        for n in range(copies):
            assert rows[f"shown-{n}"] == ("kind-a", "shown", enc, '{"b12":"x"}', None, '["s1","s2"]')
            assert rows[f"bare-{n}"] == ("kind-b", "shown", enc, None, None, "[]")
            assert rows[f"held-{n}"] == ("kind-a", "silent", enc, None, '{"setting":"silent"}', "[]")
        assert rows["no-encounter"] == ("kind-a", "shown", None, None, None, "[]")

    def test_the_encounter_hash_is_right_for_every_thread(self, store):
        """Each thread remembers the last encounter it hashed, as for patients."""
        key = store._patient_key
        errors: list[str] = []

        def client(n: int) -> None:
            for i in range(300):
                enc = f"e{(n * 7 + i) % 5}"
                expected = hmac.new(key, b"encounter\x00" + enc.encode(), hashlib.sha256).hexdigest()
                if store.encounter_hash(enc) != expected:
                    errors.append(enc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    def test_concurrent_hook_calls_record_every_card(self, open_store):
        """Threads of several workers' stores recording at once (each a single autocommit
        statement): every card is there, and feedback finds each one's suggestion."""
        stores = [open_store() for _ in range(3)]
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for i in range(40):
                    stores[n % 3].record_issued_cards(SVC, f"h{n}-{i}", f"p{n}", [
                        IssuedCard(f"t{n}-{i}", "kind-a", (f"t{n}-{i}-s",))])
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert stores[1].feedback_report()["totals"]["issued"] == 6 * 40
        result = stores[2].save_feedback(SVC, [accepted(f"t{n}-{i}", f"t{n}-{i}-s")
                                               for n in range(6) for i in (0, 39)])
        assert result.unknown_cards == () and not any(r["unknown_suggestions"] for r in stores[0].feedback_rows())
        for s in stores:
            s.close()

    def test_many_cards_at_once_are_all_recorded(self, store):
        """More cards than one INSERT takes (seeding): recorded in chunks, in one transaction."""
        cards = [IssuedCard(f"bulk-{i}", "kind-a", (f"bulk-{i}-s",)) for i in range(1234)]
        store.record_issued_cards(SVC, "seed", "p", cards)
        assert store.feedback_report()["totals"]["issued"] == 1234
        result = store.save_feedback(SVC, [accepted("bulk-0", "bulk-0-s"), accepted("bulk-1233", "bulk-1233-s")])
        assert result.unknown_cards == ()
        assert not any(r["unknown_suggestions"] for r in store.feedback_rows())

    def test_migration_to_v3_keeps_earlier_cards_suggestions_and_encounters(self, open_store, monkeypatch):
        """A database written by schema v2 (suggestions in `issued_suggestions`, every card in
        the encounter index): after the migration feedback still finds the old cards'
        suggestions and the encounter lockout still sees the old cards."""
        import cds_service.store as store_module

        monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
        old = open_store()
        assert old.schema_version() == 2
        now = datetime.now(timezone.utc)
        at = store_module.timestamp_text(now - timedelta(hours=1))
        with old._transaction() as cur:
            for card, encounter in (("old-1", "enc-1"), ("old-2", None)):
                cur.execute("INSERT INTO issued_cards (card_uuid, service_id, kind, hook_instance,"
                            " patient_hash, issued_at, delivery, encounter_hash, situation, withheld_by)"
                            " VALUES (?, ?, 'kind-a', 'h', ?, ?, 'shown', ?, NULL, NULL)",
                            (card, SVC, old.patient_hash("p1"), at,
                             old.encounter_hash(encounter) if encounter else None))
                cur.execute("INSERT INTO issued_suggestions (card_uuid, suggestion_uuid) VALUES (?, ?)",
                            (card, f"{card}-s"))
        old.close()
        monkeypatch.undo()

        store = open_store()
        assert store.schema_version() == SCHEMA_VERSION
        store.record_issued_cards(SVC, "h2", "p1", [IssuedCard("new-1", "kind-a", ("new-1-s",))])
        result = store.save_feedback(SVC, [accepted("old-1", "old-1-s"), accepted("old-2", "new-1-s"),
                                           accepted("new-1", "new-1-s")])
        assert result.unknown_cards == ()
        flags = [(r["card_uuid"], r["unknown_suggestions"]) for r in store.feedback_rows()]
        assert flags == [("old-1", False), ("old-2", True), ("new-1", False)]
        lock = store.policy_records("p1", "kind-a", now, "enc-1", now - timedelta(hours=2)).lockout
        assert lock is not None and lock.issued_at == at
        assert store.policy_records("p1", "kind-a", now, "enc-2", now - timedelta(hours=2)).lockout is None
        assert store.feedback_report()["totals"]["issued"] == 3
        store.close()

    def test_the_patient_hash_is_right_for_every_thread(self, store):
        """Each thread remembers the last id it hashed: interleaved threads never get another's."""
        key = store._patient_key
        errors: list[str] = []

        def client(n: int) -> None:
            for i in range(300):
                pid = f"p{(n * 7 + i) % 5}"
                if store.patient_hash(pid) != hmac.new(key, pid.encode(), hashlib.sha256).hexdigest():
                    errors.append(pid)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []

    # --- feedback --------------------------------------------------------------------------

    def test_feedback_is_stored_and_duplicates_are_idempotent(self, store):
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a", ("s1", "s2")),
                                                  IssuedCard("c2", "kind-a")])
        entries = [accepted("c1", "s1"), overridden("c2", code="not-relevant", comment="seen")]
        first = store.save_feedback(SVC, entries)
        assert (first.stored, first.duplicates, first.unknown_cards) == (2, 0, ())
        again = store.save_feedback(SVC, entries)
        assert (again.stored, again.duplicates) == (0, 2)
        # the same entry twice in one request is stored once
        twice = store.save_feedback(SVC, [overridden("c2", ts="2024-03-02T00:00:00.000000Z")] * 2)
        assert (twice.stored, twice.duplicates) == (1, 1)
        # suggestion order does not make a different report
        store.save_feedback(SVC, [accepted("c1", "s1", "s2", ts="2024-03-03T00:00:00.000000Z")])
        swapped = store.save_feedback(SVC, [accepted("c1", "s2", "s1", ts="2024-03-03T00:00:00.000000Z")])
        assert swapped.duplicates == 1
        rows = store.feedback_rows()
        assert len(rows) == 4
        assert rows[0]["card_uuid"] == "c1" and rows[0]["accepted_suggestions"] == ["s1"]
        assert rows[1]["reason_code"] == "not-relevant" and rows[1]["user_comment"] == "seen"
        assert not any(r["unknown_card"] or r["unknown_suggestions"] for r in rows)

    def test_a_changed_field_is_a_new_report_of_the_same_card(self, store):
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a", ("s1",))])
        base = overridden("c1", code="a")
        variants = [base, overridden("c1", code="b"), overridden("c1", code="a", comment="x"),
                    overridden("c1", code="a", ts="2024-03-01T10:00:01.000000Z"), accepted("c1", "s1")]
        result = store.save_feedback(SVC, variants)
        assert (result.stored, result.duplicates) == (5, 0)

    def test_unknown_cards_and_suggestions_are_stored_and_flagged(self, store):
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a", ("s1",))])
        store.record_issued_cards(OTHER_SVC, "h2", "p", [IssuedCard("c-other", "kind-a")])
        result = store.save_feedback(SVC, [
            accepted("c1", "s1"), overridden("never-issued"), accepted("c1", "s-bogus"),
            overridden("c-other")])  # issued, but by another service
        assert result.stored == 4
        assert result.unknown_cards == (1, 3)
        flags = {(r["card_uuid"], tuple(r["accepted_suggestions"])): (r["unknown_card"],
                                                                      r["unknown_suggestions"])
                 for r in store.feedback_rows()}
        assert flags == {("c1", ("s1",)): (False, False), ("never-issued", ()): (True, False),
                         ("c1", ("s-bogus",)): (False, True), ("c-other", ()): (True, False)}

    def test_save_feedback_is_all_or_nothing(self, store):
        broken = {"card": "c2", "outcome": "overridden"}  # no outcomeTimestamp: fails mid-request
        with pytest.raises(KeyError):
            store.save_feedback(SVC, [overridden("c1"), broken])
        assert store.feedback_rows() == []
        assert store.save_feedback(SVC, [overridden("c1")]).stored == 1  # connection still usable

    def test_concurrent_writers_lose_nothing(self, open_store):
        stores = [open_store() for _ in range(4)]
        errors: list[BaseException] = []

        def client(n: int) -> None:
            try:
                for i in range(40):
                    stores[n % 4].save_feedback(SVC, [overridden(f"t{n}-{i}")])
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(stores[0].feedback_rows()) == 8 * 40
        for s in stores:
            s.close()

    # --- alert policy records ---------------------------------------------------------------

    def test_policy_records_follow_suppressions_written_and_cleared_by_another_worker(self, open_store):
        """A worker that already looked the patient up sees, on its next read, the suppression
        another worker's feedback wrote, then its removal; the lockout is read every time."""
        reader, writer = open_store(), open_store()
        now = datetime.now(timezone.utc)
        since = now - timedelta(hours=1)
        assert reader.policy_records("p1", "b12-test", now) == PolicyRecords()
        assert reader.policy_records("p1", "b12-test", now, "enc-1", since) == PolicyRecords()
        writer.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))],
                                   encounter_id="enc-1")
        lock = reader.policy_records("p1", "b12-test", now + timedelta(seconds=1), "enc-1", since).lockout
        assert lock is not None and lock.service_id == SVC
        writer.save_feedback(SVC, [overridden("c1", code="done", ts=timestamp_text(now))],
                             suppression_days=lambda *a: 30)
        sup = reader.policy_records("p1", "b12-test", now).suppression
        assert sup is not None and (sup.outcome, sup.reason_code) == ("overridden", "done")
        assert reader.policy_records("p1", "b12-test", now + timedelta(days=31)).suppression is None
        assert reader.policy_records("p2", "b12-test", now).suppression is None
        assert writer.clear_suppressions(["p1"]) == 1
        assert reader.policy_records("p1", "b12-test", now) == PolicyRecords()
        reader.close()
        writer.close()

    # --- report ----------------------------------------------------------------------------

    def test_report_counts_per_kind_with_latest_outcome_and_reasons(self, store):
        store.record_issued_cards(SVC, "h1", "p1", [
            IssuedCard("a1", "consider-b12", ("s",)), IssuedCard("a2", "consider-b12", ("s2",)),
            IssuedCard("a3", "consider-b12"), IssuedCard("a4", "consider-b12"),
            IssuedCard("a5", "consider-b12"), IssuedCard("b1", "mechanical-first"),
            IssuedCard("b2", "mechanical-first")])
        store.save_feedback(SVC, [
            accepted("a1", "s"),
            accepted("a1", "s", ts="2024-03-01T09:00:00.000000Z"),        # older report, same card
            overridden("a2", code="done", ts="2024-03-01T09:00:00.000000Z"),
            accepted("a2", "s2", ts="2024-03-01T11:00:00.000000Z"),       # changed mind: accepted
            overridden("a3", code="done"),
            overridden("a4", code="done"),
            overridden("a5", comment="patient declined"),
            overridden("b1"),
            overridden("ghost", code="done"),                              # never issued
        ])
        report = store.feedback_report()
        kinds = {k["kind"]: k for k in report["kinds"]}
        b12 = kinds["consider-b12"]
        assert (b12["issued"], b12["with_feedback"], b12["accepted"], b12["overridden"]) == (5, 5, 2, 3)
        assert b12["acceptance_rate"] == pytest.approx(0.4)
        assert b12["override_reasons"] == [{"system": "https://example.org/override", "code": "done",
                                            "display": "Reason done", "count": 2}]
        assert b12["overridden_without_coded_reason"] == 1
        assert b12["overridden_with_comment_only"] == 1
        mech = kinds["mechanical-first"]
        assert (mech["issued"], mech["accepted"], mech["overridden"]) == (2, 0, 1)
        assert mech["acceptance_rate"] == 0.0 and mech["overridden_without_coded_reason"] == 1
        assert report["totals"] == {"issued": 7, "with_feedback": 6, "accepted": 2, "overridden": 4,
                                    "acceptance_rate": pytest.approx(2 / 6, abs=1e-4)}
        assert report["unknown_card_feedback"] == {"entries": 1, "cards": 1}

    def test_report_since_filters_on_issue_date(self, store):
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a")])
        store.save_feedback(SVC, [overridden("c1"), overridden("ghost")])
        today = datetime.now(timezone.utc).date()
        assert store.feedback_report(today)["totals"]["issued"] == 1
        later = store.feedback_report(today + timedelta(days=1))
        assert later["kinds"] == [] and later["totals"]["issued"] == 0
        assert later["totals"]["acceptance_rate"] is None
        assert later["unknown_card_feedback"]["entries"] == 0
        assert later["since"] == (today + timedelta(days=1)).isoformat()

    def test_report_of_a_kind_without_feedback_has_no_rate(self, store):
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a")])
        (kind,) = store.feedback_report()["kinds"]
        assert (kind["issued"], kind["with_feedback"], kind["acceptance_rate"]) == (1, 0, None)

    # --- JWT replay cache ------------------------------------------------------------------

    def test_jti_replay_is_detected_per_issuer_and_forgotten_after_expiry(self, store):
        now = time.time()
        assert store.remember_jti("iss-a", "jti-1", now + 300) is True
        assert store.remember_jti("iss-a", "jti-1", now + 300) is False
        assert store.remember_jti("iss-b", "jti-1", now + 300) is True
        assert store.remember_jti("iss-a", "jti-old", now - 1) is True
        assert store.remember_jti("iss-a", "jti-old", now + 300) is True  # earlier record expired
        assert store.remember_jti("iss-a", "jti-old", now + 300) is False

    def test_expired_jti_rows_are_purged(self, store):
        now = time.time()
        store.remember_jti("iss", "kept", now + 300)  # first call of the process also purges
        with store._transaction() as cur:  # rows that expired since, as the verifier leaves them
            cur.execute("INSERT INTO jti_seen (issuer, jti, expires_at) VALUES (?, ?, ?)",
                        ("iss", "gone", now - 10))
        assert store.purge_expired_jti(now) == 1
        assert store.purge_expired_jti(now) == 0
        assert store.remember_jti("iss", "kept", now + 300) is False

    def test_jti_is_accepted_once_across_threads(self, open_store):
        stores = [open_store() for _ in range(3)]
        results: list[bool] = []
        barrier = threading.Barrier(12)

        def attempt(n: int) -> None:
            barrier.wait()
            results.append(stores[n % 3].remember_jti("iss", "race", time.time() + 300))

        threads = [threading.Thread(target=attempt, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 11 + [True]
        for s in stores:
            s.close()

    def test_jti_is_accepted_once_across_forked_processes(self, store):
        # The store was used in this process before forking (as a preloaded gunicorn app would
        # be): children must open their own connections and still agree on a single winner.
        store.remember_jti("https://ehr.example.org", "warm-up", time.time() + 300)
        _without_other_fold_threads()
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        procs = [ctx.Process(target=_remember_in_child, args=(store, "forked", results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        assert sorted(outcomes) == [False] * 5 + [True]
        assert store.remember_jti("https://ehr.example.org", "forked", time.time() + 300) is False


class TestSqliteStore(StoreContract):
    @pytest.fixture
    def open_store(self, tmp_path: Path) -> Callable[[], Store]:
        return lambda: Store.open(Settings(data_dir=str(tmp_path / "data")))

    def test_sqlite_runs_in_wal_mode_with_full_sync(self, store, tmp_path):
        conn = store._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000
        db = tmp_path / "data" / "cds.sqlite3"
        store.save_feedback(SVC, [overridden("c1", comment="free text may name the patient")])
        for path in (db, db.with_name("cds.sqlite3-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    def test_only_feedback_waits_for_the_disk(self, store):
        """Feedback commits with synchronous=FULL; issued cards and the replay cache, written on
        every hook call, commit with NORMAL (WAL: safe if the process dies, not on power loss)."""
        conn = store._connection()

        def level() -> int:
            return conn.execute("PRAGMA synchronous").fetchone()[0]

        assert store.remember_jti("iss", "j1", time.time() + 60) is True
        assert level() == 1  # NORMAL
        store.save_feedback(SVC, [overridden("c0", comment="no")])
        assert level() == 2  # FULL
        store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))])
        store.fold_journals()  # the journal's lines are inserted with NORMAL
        assert level() == 1
        store.save_feedback(SVC, [accepted("c1", "s1")])
        assert level() == 2

    def test_the_issued_card_write_is_one_journal_line_and_no_statement(self, store, tmp_path):
        """The cards of a call are one line appended to this process's journal (no SQL); the
        fold inserts every line since the last fold in one transaction."""
        store.record_issued_cards(SVC, "h0", "p1", [IssuedCard("c0", "b12-test", ("s0",))])
        store.fold_journals()
        journal_dir = tmp_path / "data" / "issued-journal"
        statements: list[str] = []
        store._connection().set_trace_callback(statements.append)
        store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1", "s2")),
                                                    IssuedCard("c2", "b12-test", ("s3",))])
        store.record_issued_cards(SVC, "h2", "p1", [IssuedCard("c3", "b12-test")])
        assert statements == []
        lines = b"".join(p.read_bytes() for p in journal_dir.glob("*.journal")).splitlines()
        assert len(lines) == 2 and b'"c1"' in lines[0] and b'"c2"' in lines[0] and b'"c3"' in lines[1]
        store.fold_journals()
        store._connection().set_trace_callback(None)
        assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
        inserted = statements[1:-1]  # one statement run per row
        assert len(inserted) == 3 and all(s.startswith("INSERT INTO issued_cards") for s in inserted)
        assert store.feedback_report()["totals"]["issued"] == 4

    # --- the policy cache (SQLite) ----------------------------------------------------------

    @staticmethod
    def _statements(store: Store, call: Callable[[], object]) -> list[str]:
        """The SQL statements `call` sends on `store`'s connection."""
        sent: list[str] = []
        conn = store._connection()
        conn.set_trace_callback(sent.append)
        try:
            call()
        finally:
            conn.set_trace_callback(None)
        return sent

    def test_a_suppression_lookup_is_remembered_until_a_suppression_changes(self, open_store):
        reader, writer = open_store(), open_store()
        now = datetime.now(timezone.utc)
        writer.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))])
        read = lambda: reader.policy_records("p1", "b12-test", now)  # noqa: E731
        assert len(self._statements(reader, read)) == 1
        assert self._statements(reader, read) == []
        assert reader.policy_records("p1", "b12-test", now) == PolicyRecords()
        # issued cards (every hook call, every worker) do not move the generation
        writer.record_issued_cards(SVC, "h2", "p1", [IssuedCard("c2", "b12-test")])
        assert self._statements(reader, read) == []
        writer.save_feedback(SVC, [overridden("c1", code="done", ts=timestamp_text(now))],
                             suppression_days=lambda *a: 30)
        assert len(self._statements(reader, read)) == 1
        assert read().suppression is not None
        assert self._statements(reader, read) == []
        # with an encounter only the lockout is read
        lockout = self._statements(reader, lambda: reader.policy_records(
            "p1", "b12-test", now, "enc-1", now - timedelta(hours=1)))
        assert len(lockout) == 1 and "suppressions" not in lockout[0]

    def test_the_policy_cache_sees_feedback_given_in_another_process(self, tmp_path):
        settings = Settings(data_dir=str(tmp_path / "data"))
        store = Store.open(settings)
        now = datetime.now(timezone.utc)
        store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))])
        assert store.policy_records("p1", "b12-test", now).suppression is None  # now cached

        def in_child(work: Callable[[Store], object]) -> None:
            pid = os.fork()
            if pid == 0:
                try:
                    work(Store.open(settings))
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)

        in_child(lambda s: s.save_feedback(SVC, [overridden("c1", ts=timestamp_text(now))],
                                           suppression_days=lambda *a: 30))
        assert store.policy_records("p1", "b12-test", now).suppression is not None
        in_child(lambda s: s.clear_suppressions(["p1"]))
        assert store.policy_records("p1", "b12-test", now).suppression is None

    def test_a_forked_worker_does_not_share_the_parents_generation_lock(self, tmp_path):
        """`flock` belongs to the open file, which fork() shares: a worker opens its own."""
        store = Store.open(Settings(data_dir=str(tmp_path / "data")))
        store.policy_records("p1", "b12-test", datetime.now(timezone.utc))
        parents = store._suppression_generation()
        pid = os.fork()
        if pid == 0:
            try:
                mine = store._suppression_generation()
                os._exit(0 if mine is not parents and mine.pid == os.getpid() else 1)
            finally:
                os._exit(2)
        assert os.waitpid(pid, 0)[1] == 0
        assert store._suppression_generation() is parents

    def test_a_writer_killed_between_commit_and_the_end_of_its_change_turns_caching_off(self, tmp_path):
        """The generation stays odd: every read goes to the database (and sees the committed
        suppression) until another writer ends its change."""
        settings = Settings(data_dir=str(tmp_path / "data"))
        store = Store.open(settings)
        now = datetime.now(timezone.utc)
        store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))])
        store.record_issued_cards(SVC, "h2", "p2", [IssuedCard("c2", "b12-test", ("s2",))])
        assert store.policy_records("p1", "b12-test", now).suppression is None
        pid = os.fork()
        if pid == 0:
            try:
                child = Store.open(settings)
                ended = child._end_suppression_change

                def killed(conn):  # killed right after the COMMIT that changed a suppression
                    if child._local.suppression_change is not None:
                        os._exit(0)
                    ended(conn)

                child._end_suppression_change = killed
                child.save_feedback(SVC, [overridden("c1", ts=timestamp_text(now))],
                                    suppression_days=lambda *a: 30)
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        assert [r["card_uuid"] for r in store.suppression_rows()] == ["c1"]
        read = lambda: store.policy_records("p1", "b12-test", now)  # noqa: E731
        for _ in range(2):
            assert len(self._statements(store, read)) == 1
            assert read().suppression is not None
        store.save_feedback(SVC, [overridden("c2", ts=timestamp_text(now))],
                            suppression_days=lambda *a: 30)
        assert len(self._statements(store, read)) == 1
        assert self._statements(store, read) == []

    def test_a_connection_without_the_change_function_cannot_change_suppressions(self, store, tmp_path):
        """Older code or the sqlite3 shell would change a suppression behind the caches' back:
        the triggers make that fail instead; reading still works."""
        import sqlite3

        store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))])
        store.save_feedback(SVC, [overridden("c1")], suppression_days=lambda *a: 30)
        raw = sqlite3.connect(tmp_path / "data" / "cds.sqlite3")
        try:
            assert raw.execute("SELECT count(*) FROM suppressions").fetchone() == (1,)
            for sql in ("DELETE FROM suppressions", "UPDATE suppressions SET until = ''",
                        "INSERT INTO suppressions SELECT 'x', kind, card_uuid, service_id, outcome,"
                        " reason_system, reason_code, reason_display, feedback_at, until, situation"
                        " FROM suppressions"):
                with pytest.raises(sqlite3.OperationalError, match="no such function"):
                    raw.execute(sql)
        finally:
            raw.close()
        assert len(store.suppression_rows()) == 1

    def test_migration_to_v4_keeps_the_data_and_drops_the_issued_at_index(self, open_store, monkeypatch):
        import cds_service.store as store_module

        monkeypatch.setattr(store_module, "SCHEMA_VERSION", 3)
        old = open_store()
        assert old.schema_version() == 3
        now = datetime.now(timezone.utc)
        old.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1",))],
                                encounter_id="enc-1")
        with old._transaction() as cur:  # v3 has no triggers: written as v3 code did
            cur.execute("INSERT INTO suppressions (patient_hash, kind, card_uuid, service_id, outcome,"
                        " reason_system, reason_code, reason_display, feedback_at, until, situation)"
                        " VALUES (?, 'b12-test', 'c1', ?, 'overridden', NULL, NULL, NULL, ?, ?, NULL)",
                        (old.patient_hash("p1"), SVC, timestamp_text(now),
                         timestamp_text(now + timedelta(days=30))))
        old.close()
        monkeypatch.undo()

        store = open_store()
        assert store.schema_version() == SCHEMA_VERSION == 4
        conn = store._connection()
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "issued_cards_issued_at" not in names
        assert {"suppressions_insert", "suppressions_update", "suppressions_delete"} <= names
        records = store.policy_records("p1", "b12-test", now, "enc-1", now - timedelta(hours=1))
        assert records.suppression is not None and records.lockout is not None
        assert store.feedback_report(since=now.date())["totals"]["issued"] == 1
        assert store.clear_suppressions(["p1"]) == 1
        assert store.policy_records("p1", "b12-test", now).suppression is None
        store.close()

    def test_generated_patient_key_is_private_and_shared_by_every_worker(self, tmp_path):
        settings = Settings(data_dir=str(tmp_path / "data"))
        a, b = Store.open(settings), Store.open(settings)
        key_file = tmp_path / "data" / "patient_hash.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert a.patient_hash("p1") == b.patient_hash("p1")
        expected = hmac.new(key_file.read_bytes().strip(), b"p1", hashlib.sha256).hexdigest()
        assert a.patient_hash("p1") == expected

    def test_configured_patient_key_is_used_and_no_key_file_written(self, tmp_path):
        store = Store.open(Settings(data_dir=str(tmp_path / "data"), patient_hash_key="s3cret" * 6))
        assert store.patient_hash("p1") == hmac.new(b"s3cret" * 6, b"p1", hashlib.sha256).hexdigest()
        assert not (tmp_path / "data" / "patient_hash.key").exists()

    def test_a_database_newer_than_the_code_is_refused(self, tmp_path):
        settings = Settings(data_dir=str(tmp_path / "data"))
        store = Store.open(settings)
        with store._transaction() as cur:
            cur.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
        store.close()
        with pytest.raises(RuntimeError, match="newer than this code"):
            Store.open(settings)

    def test_non_postgres_database_url_is_rejected(self, tmp_path):
        with pytest.raises(ValueError, match="postgresql://"):
            Store.open(Settings(data_dir=str(tmp_path), database_url="mysql://x"))

    def test_acknowledged_writes_survive_a_killed_process(self, tmp_path):
        # A child writes and reports success, then dies without closing anything (os._exit).
        settings = Settings(data_dir=str(tmp_path / "data"))
        Store.open(settings).close()
        pid = os.fork()
        if pid == 0:  # child
            try:
                child = Store.open(settings)
                child.save_feedback(SVC, [overridden(f"k{i}") for i in range(50)])
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert len(Store.open(settings).feedback_rows()) == 50


def test_the_current_time_text_is_datetimes():
    """`utc_now_text` formats the clock itself (once per second): the same text as
    `timestamp_text` of the same moment, on second boundaries too, and between two readings of
    `datetime.now` taken around it."""
    import random

    rng = random.Random(16)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    moments = [rng.randrange(0, 8_000_000_000 * 10**6) for _ in range(3000)]
    moments += [s * 10**6 + d for s in (0, 1_700_000_000, 4_102_444_800, 951_782_400) for d in (-1, 0, 1)]
    for micros in moments:  # 951782400: 2000-02-29
        assert utc_text_of_micros(micros) == timestamp_text(epoch + timedelta(microseconds=micros))
    for _ in range(200):
        before = timestamp_text(datetime.now(timezone.utc))
        text = utc_now_text()
        after = timestamp_text(datetime.now(timezone.utc))
        assert before <= text <= after and len(text) == len(before)
