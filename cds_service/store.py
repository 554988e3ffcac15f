"""Storage: issued cards, clinician feedback, suppressions and the JWT replay cache, in one database.

Default: SQLite in WAL mode at `<data_dir>/cds.sqlite3`.  With `CDS_DATABASE_URL=postgresql://...`
the same schema lives in PostgreSQL (psycopg 3), so several replicas share it.

Process and thread safety (gunicorn pre-fork workers, threaded workers):

* connections are opened lazily, one per (process, thread); a connection inherited through
  `fork()` is never used (the owning pid is checked on every use);
* `Store.open()` migrates the schema and closes its connection before returning, so nothing is
  open when gunicorn forks a preloaded app;
* every write is one transaction; SQLite writers take the write lock up front
  (`BEGIN IMMEDIATE`) and wait up to `BUSY_TIMEOUT_MS` for it; `synchronous=FULL` makes an
  acknowledged write survive SIGKILL or power loss;
* the two writes made on every hook call (the issued cards, the JWT replay cache) are each one
  autocommit statement (no BEGIN/COMMIT round trips) that commits without waiting for the disk:
  SQLite WAL with `synchronous=NORMAL` (a committed WAL frame is in the OS page cache, so it
  survives the death of the process, not a power loss), PostgreSQL `synchronous_commit=off`
  (the connection's default; every durable transaction sets it back on for itself).

Patient ids are never stored: issued cards keep an HMAC-SHA256 of the id under a secret key
(`CDS_PATIENT_HASH_KEY`, else a random key created once in `data_dir` with mode 0600).  Encounter
ids and the situation fingerprints of the alert policy (cds_service/policy.py) are keyed hashes too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from cds_service.config import Settings
from cds_service.logs import get_logger
from cds_service.secret_files import read_or_create_secret

log = get_logger("store")

SQLITE_FILENAME = "cds.sqlite3"
PATIENT_KEY_FILENAME = "patient_hash.key"
BUSY_TIMEOUT_MS = 30_000
JTI_PURGE_INTERVAL_SECONDS = 60.0
SCHEMA_VERSION = 3

# Migrations: version -> statements.  `{id}` is the auto-increment primary key column type of the
# dialect.  Never edit a released migration; append a new one.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE issued_cards (
               card_uuid     TEXT PRIMARY KEY,
               service_id    TEXT NOT NULL,
               kind          TEXT NOT NULL,
               hook_instance TEXT NOT NULL,
               patient_hash  TEXT NOT NULL,
               issued_at     TEXT NOT NULL)""",
        "CREATE INDEX issued_cards_issued_at ON issued_cards (issued_at)",
        """CREATE TABLE issued_suggestions (
               card_uuid       TEXT NOT NULL REFERENCES issued_cards (card_uuid),
               suggestion_uuid TEXT NOT NULL,
               PRIMARY KEY (card_uuid, suggestion_uuid))""",
        """CREATE TABLE feedback (
               id                   {id},
               dedup_key            TEXT NOT NULL UNIQUE,
               service_id           TEXT NOT NULL,
               card_uuid            TEXT NOT NULL,
               outcome              TEXT NOT NULL,
               accepted_suggestions TEXT NOT NULL,
               reason_system        TEXT,
               reason_code          TEXT,
               reason_display       TEXT,
               user_comment         TEXT,
               outcome_timestamp    TEXT NOT NULL,
               received_at          TEXT NOT NULL,
               unknown_card         INTEGER NOT NULL,
               unknown_suggestions  INTEGER NOT NULL)""",
        "CREATE INDEX feedback_card ON feedback (card_uuid)",
        "CREATE INDEX feedback_received_at ON feedback (received_at)",
        """CREATE TABLE jti_seen (
               issuer     TEXT NOT NULL,
               jti        TEXT NOT NULL,
               expires_at DOUBLE PRECISION NOT NULL,
               PRIMARY KEY (issuer, jti))""",
        "CREATE INDEX jti_seen_expires_at ON jti_seen (expires_at)",
    ),
    # Alert governance (cds_service/policy.py).  Every card the rules chose is recorded, with how
    # it was delivered: 'shown', or withheld ('silent', 'suppressed', 'locked-out', with the
    # feedback or setting that withheld it in `withheld_by`, JSON without patient data).
    # `situation`: keyed-hash fingerprints of what the card was based on (policy.Situation).
    # `suppressions`: one row per (patient hash, card kind), the latest feedback's, read with
    # one primary-key lookup per hook call that has a card to show.
    2: (
        "ALTER TABLE issued_cards ADD COLUMN delivery TEXT NOT NULL DEFAULT 'shown'",
        "ALTER TABLE issued_cards ADD COLUMN encounter_hash TEXT",
        "ALTER TABLE issued_cards ADD COLUMN situation TEXT",
        "ALTER TABLE issued_cards ADD COLUMN withheld_by TEXT",
        "CREATE INDEX issued_cards_encounter ON issued_cards (encounter_hash, kind)",
        """CREATE TABLE suppressions (
               patient_hash   TEXT NOT NULL,
               kind           TEXT NOT NULL,
               card_uuid      TEXT NOT NULL,
               service_id     TEXT NOT NULL,
               outcome        TEXT NOT NULL,
               reason_system  TEXT,
               reason_code    TEXT,
               reason_display TEXT,
               feedback_at    TEXT NOT NULL,
               until          TEXT NOT NULL,
               situation      TEXT,
               PRIMARY KEY (patient_hash, kind))""",
        "CREATE INDEX suppressions_feedback_at ON suppressions (feedback_at)",
    ),
    # One INSERT per hook call: a card's suggestion uuids go in its own row (JSON array text)
    # instead of one `issued_suggestions` row each.  Cards recorded before (NULL here) keep theirs
    # in `issued_suggestions`, which feedback still reads for them (also for cards written by a
    # replica still running the previous version during a rolling upgrade).
    # The encounter index holds only rows that have an encounter (the lockout looks up nothing
    # else): a call without one writes one index page less.
    3: (
        "ALTER TABLE issued_cards ADD COLUMN suggestion_uuids TEXT",
        "DROP INDEX issued_cards_encounter",
        "CREATE INDEX issued_cards_encounter ON issued_cards (encounter_hash, kind)"
        " WHERE encounter_hash IS NOT NULL",
    ),
}
_ID_COLUMN = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}
_PG_MIGRATION_LOCK = 0x0B12CD5  # pg_advisory_xact_lock key serialising concurrent migrations
# Parameterless, so psycopg sends each as one simple query: one round trip.
_PG_BEGIN_DURABLE = "BEGIN; SET LOCAL synchronous_commit = on"
_PG_BEGIN_NOT_DURABLE = "BEGIN; SET LOCAL synchronous_commit = off"


DELIVERIES: tuple[str, ...] = ("shown", "silent", "suppressed", "locked-out")

_ISSUED_COLUMNS = ("card_uuid, service_id, kind, hook_instance, patient_hash, issued_at, delivery,"
                   " encounter_hash, situation, withheld_by, suggestion_uuids")
_ISSUED_ROW = "(" + ", ".join("?" * (_ISSUED_COLUMNS.count(",") + 1)) + ")"


_MAX_ROWS_PER_INSERT = 500
"""Rows per multi-row INSERT: 5,500 parameters, within SQLite's and PostgreSQL's limits."""


@lru_cache(maxsize=16)
def _insert_issued_sql(rows: int) -> str:
    """The multi-row INSERT of `rows` issued cards (the text is cached: SQLite and psycopg then
    reuse their prepared statement)."""
    return (f"INSERT INTO issued_cards ({_ISSUED_COLUMNS}) VALUES "
            + ", ".join([_ISSUED_ROW] * rows) + " ON CONFLICT (card_uuid) DO NOTHING")


# The alert policy's read (Store.policy_records): the suppression primary key, plus, for the
# encounter lockout, the encounter index.  Bound as (patient, kind, now[, encounter, kind, since,
# patient]).
_POLICY_READ = ("SELECT 'suppression', outcome, reason_system, reason_code, reason_display,"
                " feedback_at, until, situation, service_id FROM suppressions"
                " WHERE patient_hash = ? AND kind = ? AND until > ?")
_POLICY_READ_WITH_LOCKOUT = _POLICY_READ + (
    " UNION ALL SELECT 'lockout', NULL, NULL, NULL, NULL, issued_at, NULL, situation,"
    " service_id FROM issued_cards WHERE encounter_hash = ? AND kind = ?"
    " AND delivery = 'shown' AND issued_at >= ? AND patient_hash = ?")


@dataclass(frozen=True)
class IssuedCard:
    """A card the rules chose: its uuid, its kind (rule id) and its suggestions' uuids, and how it
    was delivered (`shown`, or withheld: `silent`, `suppressed`, `locked-out`)."""

    card_uuid: str
    kind: str
    suggestion_uuids: tuple[str, ...] = ()
    delivery: str = "shown"
    situation: str | None = None
    """policy.Situation as JSON (keyed hashes only)."""
    withheld_by: str | None = None
    """JSON: what withheld the card (the feedback's outcome and reason, or the setting)."""


@dataclass(frozen=True)
class SuppressionRecord:
    """The stored suppression of a card kind for a patient (the latest feedback's)."""

    outcome: str
    reason_system: str | None
    reason_code: str | None
    reason_display: str | None
    feedback_at: str
    until: str
    situation: str | None
    service_id: str


@dataclass(frozen=True)
class LockoutRecord:
    """The latest card of a kind shown in this encounter."""

    service_id: str
    issued_at: str
    situation: str | None


@dataclass(frozen=True)
class PolicyRecords:
    """What `Store.policy_records` found for one patient, card kind and encounter."""

    suppression: SuppressionRecord | None = None
    lockout: LockoutRecord | None = None


SuppressionDays = Callable[[str, str, "str | None", "str | None"], int]
"""(card kind, outcome, reason system, reason code) -> days the kind stays suppressed (0: none)."""


@dataclass(frozen=True)
class SaveResult:
    """Outcome of `Store.save_feedback`."""

    stored: int
    """Entries newly written."""
    duplicates: int
    """Entries identical to one already stored (idempotent re-sends); nothing written."""
    unknown_cards: tuple[int, ...] = ()
    """Indexes (in the request) of entries whose card this service never issued (stored, flagged)."""


def utc_now_text() -> str:
    """Current UTC time in the storage text format (sortable as text)."""
    return timestamp_text(datetime.now(timezone.utc))


def timestamp_text(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC: fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    utc = moment.astimezone(timezone.utc)
    if utc.year < 1000:  # keep strftime's unpadded year for these (stored dedup keys use it)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # isoformat ends "+00:00" for UTC; same text as the strftime above, in a third of the time
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


class Store:
    """Database access for issued cards, feedback and the JWT replay cache."""

    def __init__(self, dialect: str, *, sqlite_path: Path | None = None, database_url: str = "",
                 patient_hash_key: bytes) -> None:
        """Use `Store.open(settings)`; this constructor does not touch the database."""
        self.dialect = dialect
        self._sqlite_path = sqlite_path
        self._database_url = database_url
        self._patient_key = patient_hash_key
        self._local = threading.local()
        self._all_conns: list[tuple[int, Any]] = []
        self._inherited: list[Any] = []
        self._conns_lock = threading.Lock()
        self._sqlite_write_lock = threading.Lock()
        self._next_purge = 0.0

    # ---------------------------------------------------------------------------------------
    # Opening, connections, migrations
    # ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: Settings) -> "Store":
        """Open the configured database and create or migrate its schema."""
        url = settings.database_url.strip()
        key = _patient_hash_key(settings)
        if url:
            if not url.startswith(("postgresql://", "postgres://")):
                raise ValueError("CDS_DATABASE_URL must be a postgresql:// URL (or empty for SQLite)")
            store = cls("postgresql", database_url=url, patient_hash_key=key)
        else:
            data_dir = Path(settings.data_dir)
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = data_dir / SQLITE_FILENAME
            # Free-text comments and patient hashes live here: owner-only. SQLite gives the
            # -wal and -shm files the database file's permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            store = cls("sqlite", sqlite_path=path, patient_hash_key=key)
        store._migrate()
        store.close()  # nothing stays open across a fork; workers reconnect lazily
        return store

    def close(self) -> None:
        """Close the connections this process opened (every thread's)."""
        pid = os.getpid()
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for owner, conn in conns:
            if owner == pid:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
        self._local = threading.local()

    def _connection(self) -> Any:
        """This thread's connection in this process, opened on first use."""
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == pid and not _is_broken(conn):
            return conn
        if conn is not None and self._local.pid == pid:  # broken: replace it
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            with self._conns_lock:
                self._all_conns = [(o, c) for o, c in self._all_conns if c is not conn]
        conn = self._connect()
        self._local.conn, self._local.pid = conn, pid
        with self._conns_lock:
            # Connections inherited through fork() belong to the parent: never use or close them
            # here (closing would disturb the parent's locks or session); keep them referenced
            # so garbage collection does not close them either.
            self._inherited.extend(c for o, c in self._all_conns if o != pid)
            self._all_conns = [(o, c) for o, c in self._all_conns if o == pid]
            self._all_conns.append((pid, conn))
        return conn

    def _connect(self) -> Any:
        if self.dialect == "sqlite":
            assert self._sqlite_path is not None
            conn = sqlite3.connect(self._sqlite_path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            return conn
        import psycopg

        conn = psycopg.connect(self._database_url, autocommit=True, connect_timeout=10,
                               application_name="b12-cds")
        # The default for the single-statement writes of the hook path (`_write`); durable
        # transactions set `synchronous_commit = on` for themselves (`_begin_postgres`), so they
        # never depend on this (nor on what a connection pooler leaves in the session).
        conn.execute("SET synchronous_commit = off")
        return conn

    @contextmanager
    def _transaction(self, write: bool = True, durable: bool = True) -> Iterator["_Cursor"]:
        """One transaction, committed on success and rolled back on error.

        Yields a cursor wrapper taking `?` placeholders.  SQLite write transactions take the
        write lock at BEGIN (`BEGIN IMMEDIATE`), so they never fail half-way on lock upgrade.

        `durable=False` is for records whose last few seconds may be lost in a power failure
        (issued cards, the JWT replay cache), never for feedback: the commit does not wait for
        the disk (SQLite WAL `synchronous=NORMAL`: still safe when the process is killed;
        PostgreSQL `synchronous_commit=off`).  It keeps an fsync off every hook call.
        """
        if self.dialect == "sqlite":
            conn = self._connection()
            self._sqlite_sync(conn, "FULL" if durable else "NORMAL")
            # SQLite has one writer at a time, and a writer that finds the lock taken sleeps at
            # least 1 ms in its busy handler.  Threads of this process queue on a Python lock
            # instead (microseconds); only other processes still meet SQLite's lock.
            with self._sqlite_write_lock if write else nullcontext():
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _Cursor(conn.cursor(), self.dialect)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        else:
            conn = self._begin_postgres(durable)
            try:
                with conn.cursor() as cur:
                    yield _Cursor(cur, self.dialect)
            except BaseException:
                if not _is_broken(conn):
                    try:
                        conn.execute("ROLLBACK")
                    except Exception:  # noqa: BLE001 - keep the original error
                        pass
                raise
            conn.execute("COMMIT")

    def _sqlite_sync(self, conn: Any, level: str) -> None:
        """Set this thread's connection's `synchronous` level (a PRAGMA only when it changes)."""
        if getattr(self._local, "sync", None) != (conn, level):
            conn.execute(f"PRAGMA synchronous = {level}")
            self._local.sync = (conn, level)

    def _begin_postgres(self, durable: bool = True) -> Any:
        """BEGIN on this thread's connection, with the transaction's `synchronous_commit` (in
        the same round trip); a connection found dead (server restart, idle timeout) is replaced
        once: nothing was sent yet, so the retry is safe."""
        import psycopg

        begin = _PG_BEGIN_DURABLE if durable else _PG_BEGIN_NOT_DURABLE
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.execute(begin)
                return conn
            except psycopg.OperationalError:
                if attempt == 2 or not _is_broken(conn):
                    raise
                log.warning("database connection lost; reconnecting",
                            extra={"event": "db_reconnect"})
        raise AssertionError("unreachable")

    def _migrate(self) -> None:
        with self._transaction() as cur:
            if self.dialect == "postgresql":
                cur.execute(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {current} is newer than this code "
                                   f"({SCHEMA_VERSION}); upgrade the service")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    cur.execute(statement.replace("{id}", _ID_COLUMN[self.dialect]))
                cur.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                log.info("schema migrated", extra={"event": "schema_migrated", "count": version})

    def ping(self) -> None:
        """Raise if the database does not answer (readiness check)."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT 1").fetchone()

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._transaction(write=False) as cur:
            return int(cur.execute("SELECT max(version) FROM schema_version").fetchone()[0])

    # ---------------------------------------------------------------------------------------
    # Issued cards
    # ---------------------------------------------------------------------------------------

    def patient_hash(self, patient_id: str) -> str:
        """Keyed HMAC-SHA256 (hex) of a patient id; the id itself is never stored.

        A hook call hashes its patient twice (the policy read, then the issued-card write), so
        each thread remembers the last id it hashed (in memory only, replaced by the next)."""
        local = self._local
        last = getattr(local, "last_patient", None)
        if last is not None and last[0] == patient_id:
            return last[1]
        digest = hmac.digest(self._patient_key, patient_id.encode("utf-8"), "sha256").hex()
        local.last_patient = (patient_id, digest)
        return digest

    def keyed_digest(self, text: str, length: int = 16) -> str:
        """A short keyed hash (hex) of `text`, for fingerprints that must not carry record data."""
        return hmac.new(self._patient_key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:length]

    def encounter_hash(self, encounter_id: str) -> str:
        """Keyed hash of an encounter id (stored with issued cards for the encounter lockout)."""
        return hmac.new(self._patient_key, b"encounter\x00" + encounter_id.encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def record_issued_cards(self, service_id: str, hook_instance: str, patient_id: str,
                            cards: Sequence[IssuedCard], encounter_id: str | None = None) -> None:
        """Remember the cards the rules chose in one hook call, shown or withheld (one
        statement, so one atomic commit; re-recording is a no-op).

        Committed before returning, without waiting for the disk (see the module docstring):
        once this returns, feedback sent to any worker finds the cards, even if this process is
        killed the next instant."""
        if not cards:
            return
        patient = self.patient_hash(patient_id)
        encounter = self.encounter_hash(encounter_id) if encounter_id else None
        now = utc_now_text()
        rows = [(card.card_uuid, service_id, card.kind, hook_instance, patient, now, card.delivery,
                 encounter, card.situation, card.withheld_by,
                 orjson.dumps(list(dict.fromkeys(card.suggestion_uuids))).decode())
                for card in cards]
        if len(rows) <= _MAX_ROWS_PER_INSERT:  # a hook call: a few cards
            self._write(_insert_issued_sql(len(rows)), [v for row in rows for v in row], retry=True)
            return
        with self._transaction(durable=False) as cur:  # bulk (seeding, tests): still atomic
            for start in range(0, len(rows), _MAX_ROWS_PER_INSERT):
                chunk = rows[start:start + _MAX_ROWS_PER_INSERT]
                cur.execute(_insert_issued_sql(len(chunk)), [v for row in chunk for v in row])

    # ---------------------------------------------------------------------------------------
    # Alert policy: suppressions and the encounter lockout
    # ---------------------------------------------------------------------------------------

    def policy_records(self, patient_id: str, kind: str, now: datetime,
                       encounter_id: str | None = None,
                       lockout_since: datetime | None = None) -> PolicyRecords:
        """The live suppression of `kind` for this patient and, when `encounter_id` and
        `lockout_since` are given, the latest card of `kind` shown in that encounter since then.

        One statement (a primary-key lookup, plus an index lookup for the encounter), sent
        without an explicit transaction: one round trip to the database."""
        patient = self.patient_hash(patient_id)
        if encounter_id and lockout_since is not None:
            rows = self._query(_POLICY_READ_WITH_LOCKOUT, (
                patient, kind, timestamp_text(now), self.encounter_hash(encounter_id), kind,
                timestamp_text(lockout_since), patient))
        else:
            rows = self._query(_POLICY_READ, (patient, kind, timestamp_text(now)))
        suppression = lockout = None
        for source, outcome, system, code, display, at, until, situation, service in rows:
            if source == "suppression":
                suppression = SuppressionRecord(outcome, system, code, display, at, until,
                                                situation, service)
            elif lockout is None or at > lockout.issued_at:
                lockout = LockoutRecord(service, at, situation)
        return PolicyRecords(suppression, lockout)

    def suppression_rows(self) -> list[dict[str, Any]]:
        """Every stored suppression (for tests and exports; patient hashes only)."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT patient_hash, kind, card_uuid, service_id, outcome, reason_system,"
                        " reason_code, reason_display, feedback_at, until, situation"
                        " FROM suppressions ORDER BY feedback_at")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def clear_suppressions(self, patient_ids: Sequence[str]) -> int:
        """Delete the suppressions of these patients (the demo's reset); returns how many."""
        hashes = [self.patient_hash(p) for p in patient_ids]
        if not hashes:
            return 0
        with self._transaction() as cur:
            cur.execute("DELETE FROM suppressions WHERE patient_hash IN ("
                        + ", ".join("?" * len(hashes)) + ")", hashes)
            return cur.rowcount

    def _write(self, sql: str, params: Sequence[Any], *, retry: bool = False) -> int:
        """Run one writing statement as its own transaction, committed without waiting for the
        disk (module docstring), and return its row count.

        SQLite: an autocommit write takes the write lock when it starts (as `BEGIN IMMEDIATE`
        does) and waits for it up to `BUSY_TIMEOUT_MS`; threads of this process queue on the
        Python lock first.  PostgreSQL: one round trip.  `retry`: the statement is idempotent,
        so a dead connection is replaced and the statement sent again (it may have committed
        before the connection died)."""
        if self.dialect == "sqlite":
            conn = self._connection()
            self._sqlite_sync(conn, "NORMAL")
            with self._sqlite_write_lock:
                return conn.execute(sql, params).rowcount
        import psycopg

        sql = sql.replace("?", "%s")
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return conn.execute(sql, params).rowcount
            except psycopg.OperationalError:
                if attempt == 2 or not retry or not _is_broken(conn):
                    raise
                log.warning("database connection lost; reconnecting",
                            extra={"event": "db_reconnect"})
        raise AssertionError("unreachable")

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run one read-only statement outside an explicit transaction (SQLite and psycopg
        autocommit: the statement is its own transaction) and return its rows."""
        if self.dialect == "sqlite":
            conn = self._connection()
            return conn.execute(sql, params).fetchall()
        import psycopg

        for attempt in (1, 2):
            conn = self._connection()
            try:
                return conn.execute(sql.replace("?", "%s"), params).fetchall()
            except psycopg.OperationalError:
                if attempt == 2 or not _is_broken(conn):
                    raise
                log.warning("database connection lost; reconnecting",
                            extra={"event": "db_reconnect"})
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------------------------------
    # Feedback
    # ---------------------------------------------------------------------------------------

    def save_feedback(self, service_id: str, entries: Sequence[dict[str, Any]],
                      suppression_days: SuppressionDays | None = None) -> SaveResult:
        """Store validated feedback entries in one transaction.

        Entries have the CDS Hooks wire shape (`card`, `outcome`, `acceptedSuggestions`,
        `overrideReason`, `outcomeTimestamp`) and were validated by the HTTP layer.  An entry
        equal to one already stored (same service, card, outcome, accepted suggestion ids,
        reason system/code, comment and timestamp) is not stored again.  Entries for a card this
        service never issued, or naming suggestions the card did not have, are stored and flagged.

        With `suppression_days`, a new entry on a card that was shown also suppresses that card
        kind for the card's patient for the days it returns (counted from the outcome timestamp,
        or from arrival if that is earlier), in the same transaction; a later feedback replaces
        an earlier one's suppression.
        """
        received = utc_now_text()
        stored = duplicates = 0
        unknown: list[int] = []
        with self._transaction() as cur:
            for index, entry in enumerate(entries):
                row = _feedback_row(service_id, entry)
                card = cur.execute(
                    "SELECT patient_hash, kind, delivery, situation, suggestion_uuids"
                    " FROM issued_cards WHERE card_uuid = ? AND service_id = ?",
                    (row["card_uuid"], service_id)).fetchone()
                known = card is not None
                unknown_suggestions = False
                if known:
                    accepted = json.loads(row["accepted_suggestions"])
                    if accepted:
                        if card[4] is not None:
                            issued = set(json.loads(card[4]))
                        else:  # recorded before schema v3 (see the migration)
                            issued = {r[0] for r in cur.execute(
                                "SELECT suggestion_uuid FROM issued_suggestions"
                                " WHERE card_uuid = ?", (row["card_uuid"],)).fetchall()}
                        unknown_suggestions = not set(accepted) <= issued
                else:
                    unknown.append(index)
                cur.execute(
                    "INSERT INTO feedback (dedup_key, service_id, card_uuid, outcome,"
                    " accepted_suggestions, reason_system, reason_code, reason_display,"
                    " user_comment, outcome_timestamp, received_at, unknown_card,"
                    " unknown_suggestions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (dedup_key) DO NOTHING",
                    (row["dedup_key"], service_id, row["card_uuid"], row["outcome"],
                     row["accepted_suggestions"], row["reason_system"], row["reason_code"],
                     row["reason_display"], row["user_comment"], row["outcome_timestamp"],
                     received, int(not known), int(unknown_suggestions)))
                if cur.rowcount == 1:
                    stored += 1
                    if known and suppression_days is not None and card[2] == "shown":
                        self._suppress(cur, service_id, row, card, received, suppression_days)
                else:
                    duplicates += 1
        return SaveResult(stored=stored, duplicates=duplicates, unknown_cards=tuple(unknown))

    @staticmethod
    def _suppress(cur: "_Cursor", service_id: str, row: dict[str, Any], issued: Sequence[Any],
                  received: str, suppression_days: SuppressionDays) -> None:
        patient, kind, _, situation, _ = issued
        days = suppression_days(kind, row["outcome"], row["reason_system"], row["reason_code"])
        if days <= 0:
            return
        start = min(row["outcome_timestamp"], received)
        until = timestamp_text(_parse_timestamp(start) + timedelta(days=days))
        cur.execute(
            "INSERT INTO suppressions (patient_hash, kind, card_uuid, service_id, outcome,"
            " reason_system, reason_code, reason_display, feedback_at, until, situation)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (patient_hash, kind) DO UPDATE SET card_uuid = excluded.card_uuid,"
            " service_id = excluded.service_id, outcome = excluded.outcome,"
            " reason_system = excluded.reason_system, reason_code = excluded.reason_code,"
            " reason_display = excluded.reason_display, feedback_at = excluded.feedback_at,"
            " until = excluded.until, situation = excluded.situation"
            " WHERE excluded.feedback_at >= suppressions.feedback_at",
            (patient, kind, row["card_uuid"], service_id, row["outcome"], row["reason_system"],
             row["reason_code"], row["reason_display"], start, until, situation))

    def feedback_rows(self) -> list[dict[str, Any]]:
        """Every stored feedback entry, oldest first (for tests and exports)."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT id, service_id, card_uuid, outcome, accepted_suggestions,"
                        " reason_system, reason_code, reason_display, user_comment,"
                        " outcome_timestamp, received_at, unknown_card, unknown_suggestions"
                        " FROM feedback ORDER BY id")
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for row in rows:
            row["accepted_suggestions"] = json.loads(row["accepted_suggestions"])
            row["unknown_card"] = bool(row["unknown_card"])
            row["unknown_suggestions"] = bool(row["unknown_suggestions"])
        return rows

    def feedback_report(self, since: date | None = None) -> dict[str, Any]:
        """Acceptance per card kind.

        Counts cards issued on or after `since` (UTC date; all when None).  A card's outcome is
        its latest reported one (by `outcomeTimestamp`, then arrival), so a card reported twice
        counts once.  `acceptance_rate` = accepted / (accepted + overridden), None when no card
        of the kind got feedback.  Override reasons are counted from the cards' final
        overridden reports.  Feedback for cards the service never issued is counted apart
        (by arrival date for `since`).

        Alert governance (additive members; README "Suppression and silent mode"): per kind,
        `issued` counts cards shown; `silent`, `suppressed` and `locked_out` count the cards the
        rules chose but the policy withheld (silent: what a silent-mode pilot would have shown),
        and `suppressed_by_reason` splits `suppressed` by the feedback that caused it; `withheld`
        has their totals.  `suppressions` counts the suppressions created by feedback given since `since` (`created`)
        and those still running now (`active`), per kind, outcome and reason.
        """
        since_text = since.isoformat() if since else ""
        now_text = utc_now_text()
        with self._transaction(write=False) as cur:
            issued = dict(cur.execute(
                "SELECT kind, count(*) FROM issued_cards WHERE issued_at >= ? AND delivery = 'shown'"
                " GROUP BY kind", (since_text,)).fetchall())
            withheld_rows = cur.execute(
                "SELECT kind, delivery, withheld_by, count(*) FROM issued_cards"
                " WHERE issued_at >= ? AND delivery <> 'shown' GROUP BY kind, delivery, withheld_by",
                (since_text,)).fetchall()
            suppression_rows = cur.execute(
                "SELECT kind, outcome, reason_system, reason_code, reason_display, count(*),"
                " sum(CASE WHEN until > ? THEN 1 ELSE 0 END) FROM suppressions"
                " WHERE feedback_at >= ?"
                " GROUP BY kind, outcome, reason_system, reason_code, reason_display",
                (now_text, since_text)).fetchall()
            final_rows = cur.execute(
                "SELECT c.kind, f.outcome, f.reason_system, f.reason_code, f.reason_display,"
                " f.user_comment FROM ("
                "   SELECT card_uuid, outcome, reason_system, reason_code, reason_display,"
                "          user_comment, ROW_NUMBER() OVER (PARTITION BY card_uuid"
                "          ORDER BY outcome_timestamp DESC, id DESC) AS rn"
                "   FROM feedback WHERE unknown_card = 0) f"
                " JOIN issued_cards c ON c.card_uuid = f.card_uuid"
                " WHERE f.rn = 1 AND c.issued_at >= ?", (since_text,)).fetchall()
            unknown_entries, unknown_cards = cur.execute(
                "SELECT count(*), count(DISTINCT card_uuid) FROM feedback"
                " WHERE unknown_card = 1 AND received_at >= ?", (since_text,)).fetchone()

        kinds: dict[str, dict[str, Any]] = {
            kind: _empty_kind(kind, count) for kind, count in issued.items()}
        reasons: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        for kind, outcome, system, code, display, comment in final_rows:
            item = kinds.setdefault(kind, _empty_kind(kind, 0))
            if outcome == "accepted":
                item["accepted"] += 1
                continue
            item["overridden"] += 1
            if code is None:
                item["overridden_without_coded_reason"] += 1
                if comment:
                    item["overridden_with_comment_only"] += 1
                continue
            slot = reasons.setdefault(kind, {}).setdefault(
                (system, code), {"system": system, "code": code, "display": display, "count": 0})
            slot["count"] += 1
        withheld_reasons: dict[str, dict[str, dict[str, Any]]] = {}
        for kind, delivery, withheld_by, count in withheld_rows:
            item = kinds.setdefault(kind, _empty_kind(kind, 0))
            field = WITHHELD_FIELDS.get(delivery)
            if field is None:
                continue
            item[field] += int(count)
            if delivery == "suppressed":
                cause = json.loads(withheld_by) if withheld_by else {}
                key = json.dumps([cause.get("outcome"), cause.get("system"), cause.get("code")])
                slot = withheld_reasons.setdefault(kind, {}).setdefault(key, {
                    "outcome": cause.get("outcome"), "system": cause.get("system"),
                    "code": cause.get("code"), "display": cause.get("display"), "count": 0})
                slot["count"] += int(count)
        for kind, item in kinds.items():
            item["suppressed_by_reason"] = sorted(
                withheld_reasons.get(kind, {}).values(),
                key=lambda r: (-r["count"], r["outcome"] or "", r["system"] or "", r["code"] or ""))
        by_reason = sorted(
            ({"kind": kind, "outcome": outcome, "system": system, "code": code, "display": display,
              "created": int(created), "active": int(active or 0)}
             for kind, outcome, system, code, display, created, active in suppression_rows),
            key=lambda r: (r["kind"], -r["created"], r["outcome"], r["system"] or "", r["code"] or ""))
        for kind, item in kinds.items():
            decided = item["accepted"] + item["overridden"]
            item["with_feedback"] = decided
            item["acceptance_rate"] = round(item["accepted"] / decided, 4) if decided else None
            item["override_reasons"] = sorted(reasons.get(kind, {}).values(),
                                              key=lambda r: (-r["count"], r["system"], r["code"]))
        totals = {name: sum(k[name] for k in kinds.values())
                  for name in ("issued", "with_feedback", "accepted", "overridden")}
        decided = totals["accepted"] + totals["overridden"]
        totals["acceptance_rate"] = round(totals["accepted"] / decided, 4) if decided else None
        return {
            "since": since.isoformat() if since else None,
            "generated_at": utc_now_text(),
            "kinds": [kinds[k] for k in sorted(kinds)],
            "totals": totals,
            "unknown_card_feedback": {"entries": int(unknown_entries), "cards": int(unknown_cards)},
            "issued_per_day": self.issued_per_day(since),
            "withheld": {name: sum(k[name] for k in kinds.values())
                         for name in WITHHELD_FIELDS.values()},
            "suppressions": {"created": sum(r["created"] for r in by_reason),
                             "active": sum(r["active"] for r in by_reason),
                             "by_reason": by_reason},
        }

    def issued_per_day(self, since: date | None = None) -> list[dict[str, Any]]:
        """Cards issued (shown) per UTC day and kind (`[{"day": "2026-01-01", "kind": ...,
        "issued": n}]`, by day then kind), for the report's "cards per kind over time" chart."""
        with self._transaction(write=False) as cur:
            rows = cur.execute(
                "SELECT substr(issued_at, 1, 10) AS day, kind, count(*) FROM issued_cards"
                " WHERE issued_at >= ? AND delivery = 'shown'"
                " GROUP BY substr(issued_at, 1, 10), kind ORDER BY 1, 2",
                (since.isoformat() if since else "",)).fetchall()
        return [{"day": day, "kind": kind, "issued": int(n)} for day, kind, n in rows]

    # ---------------------------------------------------------------------------------------
    # JWT replay cache
    # ---------------------------------------------------------------------------------------

    def remember_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        """Record a JWT id; True when new (or its earlier record has expired), False on replay.

        Atomic across threads, processes and replicas: the decision is the row count of a single
        `INSERT ... ON CONFLICT DO UPDATE ... WHERE <expired>` (1: inserted or refreshed an
        expired row; 0: a live row exists, a replay).
        """
        now = time.time()
        # One statement, its own transaction (committed without waiting for the disk, as the
        # issued cards): it inserts, or refreshes an expired row, or (a replay) changes nothing.
        fresh = self._write(
            "INSERT INTO jti_seen (issuer, jti, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at"
            " WHERE jti_seen.expires_at < ?", (issuer, jti, expires_at, now)) == 1
        if now >= self._next_purge:
            self._next_purge = now + JTI_PURGE_INTERVAL_SECONDS
            self.purge_expired_jti(now)
        return fresh

    def purge_expired_jti(self, now: float | None = None) -> int:
        """Delete replay-cache rows that expired before `now`; returns how many."""
        with self._transaction(durable=False) as cur:
            cur.execute("DELETE FROM jti_seen WHERE expires_at < ?",
                        (time.time() if now is None else now,))
            return cur.rowcount


# -------------------------------------------------------------------------------------------
# Helpers
# -------------------------------------------------------------------------------------------


class _Cursor:
    """Thin cursor wrapper: `?` placeholders on both dialects; `execute` returns itself."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._pg = dialect == "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_Cursor":
        self._cursor.execute(sql.replace("?", "%s") if self._pg else sql, params)
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description


def _is_broken(conn: Any) -> bool:
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False) is True)


WITHHELD_FIELDS = {"silent": "silent", "suppressed": "suppressed", "locked-out": "locked_out"}
"""Delivery of a withheld card -> its count's name in the report."""


def _empty_kind(kind: str, issued: int) -> dict[str, Any]:
    return {"kind": kind, "issued": issued, "with_feedback": 0, "accepted": 0, "overridden": 0,
            "acceptance_rate": None, "override_reasons": [],
            "overridden_without_coded_reason": 0, "overridden_with_comment_only": 0,
            "silent": 0, "suppressed": 0, "locked_out": 0, "suppressed_by_reason": []}


def _feedback_row(service_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Columns for one validated feedback entry, with its idempotency key."""
    accepted = sorted({s["id"] for s in entry.get("acceptedSuggestions") or ()})
    override = entry.get("overrideReason") or {}
    reason = override.get("reason") or {}
    timestamp = normalise_timestamp(entry["outcomeTimestamp"])
    identity = [service_id, entry["card"], entry["outcome"], accepted, reason.get("system"),
                reason.get("code"), override.get("userComment"), timestamp]
    dedup = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
    return {
        "dedup_key": dedup, "card_uuid": entry["card"], "outcome": entry["outcome"],
        "accepted_suggestions": json.dumps(accepted), "reason_system": reason.get("system"),
        "reason_code": reason.get("code"), "reason_display": reason.get("display"),
        "user_comment": override.get("userComment"), "outcome_timestamp": timestamp,
    }


def _parse_timestamp(text: str) -> datetime:
    """The inverse of `timestamp_text`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def normalise_timestamp(value: str) -> str:
    """An RFC 3339 timestamp in the fixed-width UTC storage format."""
    moment = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    return timestamp_text(moment)


def _patient_hash_key(settings: Settings) -> bytes:
    """The configured key, else the key file in `data_dir` (created once, shared by workers)."""
    if settings.patient_hash_key:
        return settings.patient_hash_key.encode("utf-8")
    path = Path(settings.data_dir) / PATIENT_KEY_FILENAME
    key = read_or_create_secret(path, lambda: secrets.token_hex(32).encode("ascii")).strip()
    if len(key) < 32:
        raise RuntimeError(f"{path} does not hold a usable key; delete it or set CDS_PATIENT_HASH_KEY")
    return key
