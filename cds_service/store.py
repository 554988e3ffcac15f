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
* the two writes made on every hook call (the issued cards, the JWT replay cache) do not wait
  for the disk.  The JWT replay cache is one autocommit statement: SQLite WAL with
  `synchronous=NORMAL` (a committed WAL frame is in the OS page cache, so it survives the death
  of the process, not a power loss), PostgreSQL `synchronous_commit=off` (the connection's
  default; every durable transaction sets it back on for itself).  The issued cards: with
  PostgreSQL one INSERT, committed the same way; with SQLite one line appended to the process's
  journal (`_IssuedJournal`: in the OS page cache once `write(2)` returns, so it survives the
  death of the process, not a power loss, as a WAL frame), folded into `issued_cards` in
  batches by a thread; feedback, the reports and the encounter lockout read the journals too,
  so they see every card whose hook call has answered, in any worker, at once.

The alert policy's suppression lookups are remembered per process (SQLite only): a counter shared
by every process of the database (`_SuppressionGeneration`, a memory-mapped file next to it) moves
whenever a suppression changes, before the change commits (triggers on `suppressions`), so a
lookup remembered before a change is never used after it, in any worker.

Patient ids are never stored: issued cards keep an HMAC-SHA256 of the id under a secret key
(`CDS_PATIENT_HASH_KEY`, else a random key created once in `data_dir` with mode 0600).  Encounter
ids and the situation fingerprints of the alert policy (cds_service/policy.py) are keyed hashes too.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import mmap
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
from cds_service.frozen import fast_init
from cds_service.logs import get_logger
from cds_service.secret_files import read_or_create_secret

log = get_logger("store")

SQLITE_FILENAME = "cds.sqlite3"
SUPPRESSION_GENERATION_SUFFIX = "-suppression-generation"
"""Next to the SQLite file: the generation of its `suppressions` (`_SuppressionGeneration`)."""
POLICY_CACHE_SIZE = 16_384
"""Suppression lookups each process remembers (per store) before it starts over."""
PATIENT_KEY_FILENAME = "patient_hash.key"
BUSY_TIMEOUT_MS = 30_000
WAL_AUTOCHECKPOINT_PAGES = 4000
"""SQLite checkpoints (copy the WAL into the database, two fsyncs) once the WAL holds this many
pages (SQLite's default: 1000).  A hook call writes two pages; a checkpoint copies the latest
copy of each page once, so fewer, larger checkpoints copy fewer pages and sync less often per
call (about 6 µs less CPU per issued-card write on average, measured on ext4), for a WAL of
up to 16 MB."""
JTI_PURGE_INTERVAL_SECONDS = 60.0
JOURNAL_DIRNAME = "issued-journal"
"""Next to the SQLite file: the issued-card journals of the processes (`_IssuedJournal`)."""
JOURNAL_SUFFIX = ".journal"
JOURNAL_FOLD_INTERVAL_SECONDS = 0.2
"""How often a process folds what it journaled into SQLite (one transaction for them all)."""
JOURNAL_IDLE_FOLDS = 25
"""Folds with nothing to fold after which a process's fold thread ends (the next record starts
it again): a store nobody writes to keeps no thread."""
JOURNAL_RECOVERY_INTERVAL_SECONDS = 5.0
"""How often a fold thread also folds the journals no process is writing (a killed worker's)."""
_JOURNAL_FORMAT = 1
"""First element of every journal line: the layout of the rows after it (`_ISSUED_COLUMNS`)."""
SCHEMA_VERSION = 4

# Migrations: version -> statements.  `{id}` is the auto-increment primary key column type of the
# dialect; a migration that differs per dialect maps each dialect to its statements.  Never edit a
# released migration; append a new one.
_MIGRATIONS: dict[int, tuple[str, ...] | dict[str, tuple[str, ...]]] = {
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
    # The issued-at index served only the acceptance report's `since` filter (the report now
    # scans the table) and cost every hook call's INSERT one more B-tree page.
    # SQLite: every row written to or deleted from `suppressions` calls
    # `cds_suppressions_changed()`, which only this code's connections define (`_connect`): it
    # moves the generation that validates every process's policy cache (`_SuppressionGeneration`),
    # and a connection that does not define it (older code, the sqlite3 shell) cannot change a
    # suppression behind the caches' back ("no such function").
    4: {
        "sqlite": (
            "DROP INDEX issued_cards_issued_at",
            *(f"CREATE TRIGGER suppressions_{event.lower()} AFTER {event} ON suppressions"
              " BEGIN SELECT cds_suppressions_changed(); END"
              for event in ("INSERT", "UPDATE", "DELETE")),
        ),
        "postgresql": ("DROP INDEX issued_cards_issued_at",),
    },
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
_ISSUED_COLUMN_COUNT = _ISSUED_COLUMNS.count(",") + 1


_MAX_ROWS_PER_INSERT = 500
"""Rows per multi-row INSERT: 5,500 parameters, within SQLite's and PostgreSQL's limits."""
_MAX_NULL_LITERAL_ROWS = 4
"""Up to this many rows (a hook call's), an INSERT writes its NULLs as literals (`_issued_insert`)."""


@lru_cache(maxsize=64)
def _insert_issued_sql(nulls: tuple[int, ...]) -> str:
    """The multi-row INSERT of `len(nulls)` issued cards; bit i of a row's mask: its column i is
    a literal NULL instead of a parameter.  (The text is cached: SQLite and psycopg then reuse
    their prepared statement.)"""
    values = ", ".join(
        "(" + ", ".join("NULL" if mask >> i & 1 else "?" for i in range(_ISSUED_COLUMN_COUNT)) + ")"
        for mask in nulls)
    return (f"INSERT INTO issued_cards ({_ISSUED_COLUMNS}) VALUES {values}"
            " ON CONFLICT (card_uuid) DO NOTHING")


def _issued_insert(rows: Sequence[tuple[Any, ...]]) -> tuple[str, list[Any]]:
    """The INSERT of `rows` and its parameters.  A few rows (a hook call): each None is a NULL
    literal in the statement, not a parameter; Python's sqlite3 binds None through its adapter
    protocol (a failed attribute lookup, about 1 µs each), and a call has two or three Nones.
    Many rows (bulk): every value a parameter, so one statement text serves every chunk."""
    if len(rows) > _MAX_NULL_LITERAL_ROWS:
        return _insert_issued_sql((0,) * len(rows)), [v for row in rows for v in row]
    masks: list[int] = []
    params: list[Any] = []
    for row in rows:
        mask = 0
        for i, value in enumerate(row):
            if value is None:
                mask |= 1 << i
            else:
                params.append(value)
        masks.append(mask)
    return _insert_issued_sql(tuple(masks)), params


# The alert policy's reads (Store.policy_records): the suppression primary key and, for the
# encounter lockout, the encounter index; both in one statement when neither is cached.  The
# suppression is read whatever its `until` (compared in Python: the row can then be cached).
_SUPPRESSION_COLUMNS = ("outcome, reason_system, reason_code, reason_display, feedback_at, until,"
                        " situation, service_id")
_SUPPRESSION_READ = (f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions"
                     " WHERE patient_hash = ? AND kind = ?")
_LOCKOUT_WHERE = ("FROM issued_cards WHERE encounter_hash = ? AND kind = ? AND delivery = 'shown'"
                  " AND issued_at >= ? AND patient_hash = ?")
_LOCKOUT_READ = "SELECT issued_at, situation, service_id " + _LOCKOUT_WHERE
# Bound as (patient, kind, encounter, kind, since, patient).
_POLICY_READ_WITH_LOCKOUT = (
    f"SELECT 'suppression', {_SUPPRESSION_COLUMNS} FROM suppressions"
    " WHERE patient_hash = ? AND kind = ? UNION ALL SELECT 'lockout', NULL, NULL, NULL, NULL,"
    " issued_at, NULL, situation, service_id " + _LOCKOUT_WHERE)


@fast_init  # one or two per hook call: the generated __init__'s object.__setattr__ per field costs more
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
    """Current UTC time in the storage text format (sortable as text): `timestamp_text` of
    `datetime.now(timezone.utc)`, from the same clock (truncated to the microsecond, as
    `datetime.now`), in a quarter of the time (every hook call stamps its cards)."""
    return utc_text_of_micros(time.time_ns() // 1000)


_second_prefix: tuple[int, str] = (-1, "")
"""(Unix second, its `YYYY-MM-DDTHH:MM:SS.` text): the last second `utc_text_of_micros` saw."""


def utc_text_of_micros(micros: int) -> str:
    """`timestamp_text` of the UTC moment `micros` microseconds after the Unix epoch (at or after
    year 1000), formatted once per second."""
    global _second_prefix
    second, fraction = divmod(micros, 1_000_000)
    cached = _second_prefix
    if cached[0] != second:
        # Another thread may replace it meanwhile: each tuple is whole, so any one is right.
        cached = _second_prefix = (second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second)))
    return f"{cached[1]}{fraction:06d}Z"


def timestamp_text(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC: fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    utc = moment.astimezone(timezone.utc)
    if utc.year < 1000:  # keep strftime's unpadded year for these (stored dedup keys use it)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # isoformat ends "+00:00" for UTC; same text as the strftime above, in a third of the time
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


class _ThreadState(threading.local):
    """What each thread keeps per store.  Class-level defaults: reading an attribute a thread
    has not set yet finds the default instead of raising (and formatting) an AttributeError,
    which `getattr(local, name, None)` on a plain `threading.local` does on every miss."""

    conn: Any = None
    pid: int = -1
    cursor: Any = None
    """SQLite: the hook path's statements reuse one cursor (`conn.execute` makes one each time)."""
    sync: tuple[Any, str] | None = None
    """(connection, level) of the last `PRAGMA synchronous` sent on it."""
    suppression_change: int | None = None
    last_patient: tuple[str, str] | None = None
    last_encounter: tuple[str, str] | None = None


class Store:
    """Database access for issued cards, feedback and the JWT replay cache."""

    def __init__(self, dialect: str, *, sqlite_path: Path | None = None, database_url: str = "",
                 patient_hash_key: bytes) -> None:
        """Use `Store.open(settings)`; this constructor does not touch the database."""
        self.dialect = dialect
        self._sqlite_path = sqlite_path
        self._database_url = database_url
        self._patient_key = patient_hash_key
        self._local = _ThreadState()
        self._all_conns: list[tuple[int, Any]] = []
        self._inherited: list[Any] = []
        self._conns_lock = threading.Lock()
        self._sqlite_write_lock = threading.Lock()
        self._next_purge = 0.0
        self._generation: _SuppressionGeneration | None = None  # SQLite: opened on first use
        self._generation_lock = threading.Lock()
        self._journal: _IssuedJournal | None = None  # SQLite: this process's, opened on first use
        self._journal_reader: _JournalReader | None = None  # SQLite: the lockout's, on first use
        self._policy_cache: dict[tuple[str, str], tuple[int, SuppressionRecord | None]] = {}
        """(patient hash, kind) -> (generation, its suppression whatever its `until`)."""

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
        if store.dialect == "sqlite":  # what a process that is gone had journaled
            fold_journal_files(store._journal_dir(), journal_files(store._journal_dir()),
                               store._insert_rows, finished_only=True)
        store.close()  # nothing stays open across a fork; workers reconnect lazily
        return store

    def close(self) -> None:
        """Close the connections this process opened (every thread's), after folding what it
        journaled (a later use opens everything again)."""
        pid = _process.pid
        journal, self._journal = self._journal, None
        if journal is not None and journal.pid == pid:
            journal.close()
        reader, self._journal_reader = self._journal_reader, None
        if reader is not None and reader.pid == pid:
            reader.close()
        with self._conns_lock:
            conns, self._all_conns = self._all_conns, []
        for owner, conn in conns:
            if owner == pid:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
        self._local = _ThreadState()

    def _connection(self) -> Any:
        """This thread's connection in this process, opened on first use."""
        pid = _process.pid
        local = self._local
        conn = local.conn
        if conn is not None and local.pid == pid and (
                self.dialect == "sqlite" or not _is_broken(conn)):  # SQLite's never break
            return conn
        if conn is not None and local.pid == pid:  # broken: replace it
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            with self._conns_lock:
                self._all_conns = [(o, c) for o, c in self._all_conns if c is not conn]
        conn = self._connect()
        local.conn, local.pid = conn, pid
        local.cursor = conn.cursor() if self.dialect == "sqlite" else None
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
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            # Called by the triggers on `suppressions` (schema v4), in the writing thread.
            conn.create_function("cds_suppressions_changed", 0, self._suppressions_changed)
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
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    self._end_suppression_change(conn)
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
        if self._local.sync != (conn, level):
            conn.execute(f"PRAGMA synchronous = {level}")
            self._local.sync = (conn, level)

    def _suppression_generation(self) -> _SuppressionGeneration:
        """The SQLite database's suppression generation, opened once per store and process (an
        object inherited through fork() would share its `flock` with the parent's)."""
        generation = self._generation
        if generation is None or generation.pid != _process.pid:
            with self._generation_lock:
                if self._generation is None or self._generation.pid != _process.pid:
                    assert self._sqlite_path is not None
                    self._generation = _SuppressionGeneration(self._sqlite_path)
                generation = self._generation
        return generation

    def _suppressions_changed(self) -> None:
        """SQL function `cds_suppressions_changed()`: a suppression is being changed in this
        thread's transaction (see `_SuppressionGeneration`); ended by `_end_suppression_change`."""
        self._local.suppression_change = self._suppression_generation().begin_change()

    def _end_suppression_change(self, conn: Any) -> None:
        """After a transaction or autocommit statement: end the suppression change it made, once
        nothing of it is still open (a transaction still open keeps the generation odd)."""
        local = self._local
        marker = local.suppression_change
        if marker is not None and not conn.in_transaction:
            local.suppression_change = None
            self._suppression_generation().end_change(marker)

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
                steps = _MIGRATIONS[version]
                for statement in steps[self.dialect] if isinstance(steps, dict) else steps:
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
        last = local.last_patient
        if last is not None and last[0] == patient_id:
            return last[1]
        digest = hmac.digest(self._patient_key, patient_id.encode("utf-8"), "sha256").hex()
        local.last_patient = (patient_id, digest)
        return digest

    def keyed_digest(self, text: str, length: int = 16) -> str:
        """A short keyed hash (hex) of `text`, for fingerprints that must not carry record data."""
        return hmac.new(self._patient_key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:length]

    def encounter_hash(self, encounter_id: str) -> str:
        """Keyed hash of an encounter id (stored with issued cards for the encounter lockout).

        An order hook hashes its encounter twice (the lockout read, then the issued-card write):
        each thread remembers the last one, as `patient_hash` does."""
        local = self._local
        last = local.last_encounter
        if last is not None and last[0] == encounter_id:
            return last[1]
        digest = hmac.digest(self._patient_key, b"encounter\x00" + encounter_id.encode("utf-8"),
                             "sha256").hex()
        local.last_encounter = (encounter_id, digest)
        return digest

    def record_issued_cards(self, service_id: str, hook_instance: str, patient_id: str,
                            cards: Sequence[IssuedCard], encounter_id: str | None = None) -> None:
        """Remember the cards the rules chose in one hook call, shown or withheld (one
        statement, so one atomic commit; re-recording is a no-op).

        Durable against the death of this process before returning, without waiting for the
        disk (see the module docstring): once this returns, feedback sent to any worker finds the
        cards, even if this process is killed the next instant.  SQLite: a hook call's cards
        are one line appended to this process's journal (`_IssuedJournal`), folded into the
        database in batches; PostgreSQL (replicas on several hosts): one INSERT."""
        if not cards:
            return
        patient = self.patient_hash(patient_id)
        encounter = self.encounter_hash(encounter_id) if encounter_id else None
        now = utc_now_text()
        rows = [(card.card_uuid, service_id, card.kind, hook_instance, patient, now, card.delivery,
                 encounter, card.situation, card.withheld_by,
                 orjson.dumps(list(dict.fromkeys(card.suggestion_uuids))).decode())
                for card in cards]
        if self.dialect == "sqlite" and len(rows) <= _MAX_NULL_LITERAL_ROWS:  # a hook call
            try:
                self._issued_journal().append(rows)
                return
            except OSError as err:  # (disk full) the INSERT says whether the database can do it
                log.warning("issued-card journal not writable; writing to the database",
                            extra={"event": "journal_write_failed", "error_type": type(err).__name__})
        if len(rows) <= _MAX_ROWS_PER_INSERT:  # a hook call: a few cards
            self._write(*_issued_insert(rows), retry=True)
            return
        with self._transaction(durable=False) as cur:  # bulk (seeding, tests): still atomic
            for start in range(0, len(rows), _MAX_ROWS_PER_INSERT):
                cur.execute(*_issued_insert(rows[start:start + _MAX_ROWS_PER_INSERT]))

    def _journal_dir(self) -> Path:
        assert self._sqlite_path is not None
        return self._sqlite_path.with_name(JOURNAL_DIRNAME)

    def _issued_journal(self) -> _IssuedJournal:
        """This process's issued-card journal (SQLite), opened on first use."""
        journal = self._journal
        if journal is None or journal.pid != _process.pid:
            with self._generation_lock:
                if self._journal is None or self._journal.pid != _process.pid:
                    self._journal = _IssuedJournal(self._journal_dir(),
                                                   lambda rows: self._insert_rows(rows),
                                                   self._close_thread_connection)
                journal = self._journal
        return journal

    def _close_thread_connection(self) -> None:
        """Close this thread's connection (a thread that ends: the journal's fold thread)."""
        local = self._local
        conn = local.conn
        if conn is None or local.pid != _process.pid:
            return
        local.conn = local.cursor = local.sync = None
        with self._conns_lock:
            self._all_conns = [(o, c) for o, c in self._all_conns if c is not conn]
        conn.close()

    def _insert_rows(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert issued-card rows (journal lines being folded) in one transaction: one
        single-row statement run for each row (prepared once, whatever the batch's size)."""
        with self._transaction(durable=False) as cur:
            cur.executemany(_insert_issued_sql((0,)), rows)

    def fold_journals(self) -> None:
        """Fold every process's issued-card journal into the database (SQLite; PostgreSQL has
        none): afterwards `issued_cards` holds every card recorded before this call began.
        Feedback and the reports call it before they read; so may tools and tests."""
        if self.dialect == "sqlite":
            journal = self._journal
            if journal is not None and journal.pid == _process.pid:
                journal.rotate_and_fold()  # this process's lines: folded and their file removed
            directory = self._journal_dir()
            fold_journal_files(directory, journal_files(directory), self._insert_rows)

    def _journal_lockout_rows(self, encounter: str, kind: str, since: str,
                              patient: str) -> list[tuple[Any, ...]]:
        """(issued_at, situation, service_id) of the journaled cards of `kind` shown in this
        encounter since `since` (folded or not): what the lockout read adds to the database's,
        read before it (see `_IssuedJournal`)."""
        reader = self._journal_reader
        if reader is None or reader.pid != _process.pid:
            with self._generation_lock:
                if self._journal_reader is None or self._journal_reader.pid != _process.pid:
                    self._journal_reader = _JournalReader(self._journal_dir())
                reader = self._journal_reader
        return [(r[5], r[8], r[1]) for r in reader.rows_of_encounter(encounter)
                if r[2] == kind and r[6] == "shown" and r[5] >= since and r[4] == patient]

    # ---------------------------------------------------------------------------------------
    # Alert policy: suppressions and the encounter lockout
    # ---------------------------------------------------------------------------------------

    def policy_records(self, patient_id: str, kind: str, now: datetime,
                       encounter_id: str | None = None,
                       lockout_since: datetime | None = None) -> PolicyRecords:
        """The live suppression of `kind` for this patient and, when `encounter_id` and
        `lockout_since` are given, the latest card of `kind` shown in that encounter since then.

        SQLite: each process remembers the suppression lookups it made (or their absence) while
        the database's suppression generation does not move (`_SuppressionGeneration`: any
        change to `suppressions` by any process moves it before it commits), so a call for a
        patient and kind already looked up sends no statement for the suppression.  Otherwise
        one statement (a primary-key lookup, plus an index lookup for the encounter), sent
        without an explicit transaction: one round trip to the database."""
        patient = self.patient_hash(patient_id)
        lockout_args = None
        if encounter_id and lockout_since is not None:
            lockout_args = (self.encounter_hash(encounter_id), kind, timestamp_text(lockout_since),
                            patient)
        key = (patient, kind)
        generation = -1  # PostgreSQL (replicas on other hosts): nothing is cached
        journaled: list[tuple[Any, ...]] = []
        if self.dialect == "sqlite":
            if lockout_args:  # the journals first, then the database (see `_IssuedJournal`)
                journaled = self._journal_lockout_rows(*lockout_args)
            generation = self._suppression_generation().read()
            cached = self._policy_cache.get(key)
            if cached is not None and cached[0] == generation:
                suppression = cached[1]
                lockout = (_latest_lockout(self._query(_LOCKOUT_READ, lockout_args) + journaled)
                           if lockout_args else None)
                return _live(suppression, lockout, now)
        suppression = lockout = None
        if lockout_args:
            rows = self._query(_POLICY_READ_WITH_LOCKOUT, (patient, kind, *lockout_args))
            suppression = next((SuppressionRecord(*r[1:]) for r in rows if r[0] == "suppression"),
                               None)
            lockout = _latest_lockout([(r[5], r[7], r[8]) for r in rows if r[0] == "lockout"]
                                      + journaled)
        else:
            rows = self._query(_SUPPRESSION_READ, key)
            suppression = SuppressionRecord(*rows[0]) if rows else None
        if generation >= 0 and generation % 2 == 0:  # no change was being committed
            if len(self._policy_cache) >= POLICY_CACHE_SIZE:
                self._policy_cache.clear()
            self._policy_cache[key] = (generation, suppression)
        return _live(suppression, lockout, now)

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
                try:
                    return self._local.cursor.execute(sql, params).rowcount
                finally:
                    self._end_suppression_change(conn)
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
            self._connection()
            return self._local.cursor.execute(sql, params).fetchall()
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
        self.fold_journals()  # every card issued before this call is then in `issued_cards`
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
        self.fold_journals()  # count every card issued before this call
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
            "issued_per_day": self._issued_per_day(since),
            "withheld": {name: sum(k[name] for k in kinds.values())
                         for name in WITHHELD_FIELDS.values()},
            "suppressions": {"created": sum(r["created"] for r in by_reason),
                             "active": sum(r["active"] for r in by_reason),
                             "by_reason": by_reason},
        }

    def issued_per_day(self, since: date | None = None) -> list[dict[str, Any]]:
        """Cards issued (shown) per UTC day and kind (`[{"day": "2026-01-01", "kind": ...,
        "issued": n}]`, by day then kind), for the report's "cards per kind over time" chart."""
        self.fold_journals()
        return self._issued_per_day(since)

    def _issued_per_day(self, since: date | None) -> list[dict[str, Any]]:
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


class _SuppressionGeneration:
    """A counter shared by every process of one SQLite database, moved by every change to its
    `suppressions`: a file next to the database, mapped in memory (MAP_SHARED), so reading it
    costs no system call and no SQLite statement.

    Protocol (what makes a process's policy cache safe, `Store.policy_records`):

    * a writer moves the counter to a new odd value inside its transaction, before it commits
      (`begin_change`, called by the SQLite triggers of schema v4), and to the next even value
      after the transaction ended (`end_change`), unless another writer moved it meanwhile;
    * a reader reads the counter before its query and caches the answer only under an even value;
      a cached answer is used only while the counter still holds that value.

    So an answer cached before a commit is dropped by the odd move that precedes the commit, and
    an even value is only ever set after every change that preceded it was committed (or rolled
    back).  A writer that dies between its commit and `end_change` leaves the value odd: nothing
    is cached until the next writer ends its change.  The read-modify-writes are serialised by a
    `flock` on the file (per open file description: it also excludes another object on the same
    file in this process, and closing some other descriptor of the file does not release it) and
    a thread lock (threads share this object's description); aligned 8-byte loads and stores are
    single-copy atomic on the platforms this runs on (x86-64, AArch64).
    """

    def __init__(self, sqlite_path: Path) -> None:
        path = sqlite_path.with_name(sqlite_path.name + SUPPRESSION_GENERATION_SUFFIX)
        # A file object: its descriptor (the `flock`s) is closed with it when the store goes.
        self._file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b", buffering=0)
        try:
            if os.fstat(self._file.fileno()).st_size < 8:  # growing keeps another process's bytes
                os.ftruncate(self._file.fileno(), 8)
            self._map = mmap.mmap(self._file.fileno(), 8)  # shared, read-write
        except BaseException:
            self._file.close()
            raise
        self._value = memoryview(self._map).cast("Q")  # native uint64: one aligned load/store
        self._thread_lock = threading.Lock()
        self.pid = _process.pid

    def read(self) -> int:
        return int(self._value[0])

    def begin_change(self) -> int:
        """Move to a new odd value (a change is being committed) and return it."""
        with self._locked():
            value = self._value[0]
            value += 1 if value % 2 == 0 else 2
            self._value[0] = value
            return value

    def end_change(self, marker: int) -> None:
        """The change that moved the counter to `marker` has ended: move to the next even value,
        unless a later change moved it (that one ends it)."""
        with self._locked():
            if self._value[0] == marker:
                self._value[0] = marker + 1

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._file.fileno()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


class _IssuedJournal:
    """This process's append-only record of the cards it issued, for one SQLite store: what a
    hook call writes instead of an INSERT (one `write(2)`, a few microseconds), folded into
    `issued_cards` in batches by a background thread.

    Why it is as safe as the INSERT it replaces (WAL, `synchronous=NORMAL`): a `write(2)` that
    returned is in the kernel's page cache, so it survives the death of the process (not a power
    loss, as before), and every reader that must see every issued card reads the journals too:

    * feedback and the reports fold every journal into SQLite before they read
      (`Store.fold_journals`), the encounter lockout reads the journals' lines
      (`_JournalReader`), each *before* its database read;
    * a line leaves a journal only after the transaction that inserted it committed (the file is
      removed after the commit), so a reader that read the journals first and the database next
      sees every line that was in a journal when it started (inserts are idempotent: `ON
      CONFLICT (card_uuid) DO NOTHING`, so a line folded twice is counted once).

    Files: `<dir>/<pid>-<random>.journal`, written by one process, which holds an exclusive
    `flock` on the one it is appending to (created under a hidden name, locked, then renamed, so
    no file is ever visible unlocked before its owner is done with it).  A file whose lock can be
    taken is finished (rotated out, or its writer died): whoever takes the lock may fold it and
    remove it.  A line is `[format, row, ...]` (JSON) and a newline; bytes after the last newline
    are a write that never completed (its call never answered) and are ignored.  A finished file
    with a line that cannot be read is kept, renamed `.unreadable`, never removed.
    """

    def __init__(self, directory: Path, insert: Callable[[list[tuple[Any, ...]]], None],
                 thread_done: Callable[[], None]) -> None:
        """`insert`: the rows of journal lines, in one transaction; `thread_done`: called by the
        fold thread as it ends (it closes the thread's database connection)."""
        self.dir = directory
        self._insert = insert
        self._thread_done = thread_done
        self._lock = threading.Lock()
        """Serialises appends, rotation and the fold thread's start and end."""
        self._fd: int | None = None
        self._path: Path | None = None
        self._pending = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake = threading.Event()
        self.pid = _process.pid
        _JOURNALS.add(self)

    # --- the writing process -------------------------------------------------------------

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Journal `rows` (one line): durable against the death of this process on return.

        Raises OSError when the line could not be written whole; the file is then finished at
        once, so nothing is ever appended after a partial line."""
        line = orjson.dumps([_JOURNAL_FORMAT, *rows]) + b"\n"
        with self._lock:
            if self._fd is None:
                self._open_new()
            assert self._fd is not None
            try:
                written = os.write(self._fd, line)
            except OSError:
                self._finish_current()
                raise
            if written != len(line):
                self._finish_current()
                raise OSError(f"short write to the issued-card journal ({written} of {len(line)})")
            self._pending = True
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="issued-card-journal",
                                                daemon=True)
                self._thread.start()

    def _open_new(self) -> None:
        """Start a new file, locked before it gets its journal name (lock held)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        name = f"{self.pid}-{secrets.token_hex(8)}"
        hidden = self.dir / f".{name}.new"
        fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = self.dir / (name + JOURNAL_SUFFIX)
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._path = fd, path

    def _finish_current(self) -> Path | None:
        """Stop appending to the current file and release its lock (lock held); its path."""
        fd, path = self._fd, self._path
        self._fd = self._path = None
        self._pending = False
        if fd is not None:
            os.close(fd)
        return path

    def rotate_and_fold(self) -> bool:
        """Finish the current file if it holds anything, then fold it; False if nothing was
        pending."""
        with self._lock:
            if not self._pending:
                return False
            path = self._finish_current()
        if path is not None:
            fold_journal_files(self.dir, [path], self._insert)
        return True

    def _run(self) -> None:
        try:
            self._fold_until_idle()
        finally:
            self._thread_done()

    def _fold_until_idle(self) -> None:
        idle = 0
        next_recovery = time.monotonic() + JOURNAL_RECOVERY_INTERVAL_SECONDS
        while True:
            self._wake.wait(JOURNAL_FOLD_INTERVAL_SECONDS)
            try:
                idle = 0 if self.rotate_and_fold() else idle + 1
                if time.monotonic() >= next_recovery:
                    next_recovery = time.monotonic() + JOURNAL_RECOVERY_INTERVAL_SECONDS
                    fold_journal_files(self.dir, journal_files(self.dir), self._insert,
                                       finished_only=True)
            except Exception:  # noqa: BLE001 - the lines stay in their file; retried next time
                log.exception("folding the issued-card journal failed; retrying",
                              extra={"event": "journal_fold_failed"})
            with self._lock:
                if self._stopping or (idle >= JOURNAL_IDLE_FOLDS and not self._pending):
                    self._thread = None
                    return

    def close(self) -> None:
        """Stop the fold thread and fold what is pending (the process is done with the store)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self.rotate_and_fold()

    def forked(self) -> None:
        """In a child: this object is the parent's; close the child's copy of the parent's
        descriptor (sharing its lock), never writing through it."""
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class _JournalReader:
    """What the encounter lockout has read of every journal, per store and process: each file
    stays open and is read on from where the last lockout read stopped, its rows indexed by
    encounter hash, until the file leaves the directory (folded: its rows are then in the
    database).  A lockout read costs a directory listing and one `pread` per journal, not a
    read and parse of every pending line."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pid = _process.pid
        self._lock = threading.Lock()
        self._files: dict[str, _ReadJournal] = {}
        _JOURNALS.add(self)

    def rows_of_encounter(self, encounter: str) -> list[tuple[Any, ...]]:
        """The journaled rows of this encounter, from every journal in the directory now."""
        try:
            names = {n for n in os.listdir(self.dir) if n.endswith(JOURNAL_SUFFIX)}
        except FileNotFoundError:
            names = set()
        found: list[tuple[Any, ...]] = []
        with self._lock:
            for name in [n for n in self._files if n not in names]:  # folded and removed
                self._files.pop(name).close()
            for name in names:
                journal = self._files.get(name)
                if journal is None:
                    try:
                        journal = self._files[name] = _ReadJournal(self.dir / name)
                    except FileNotFoundError:  # folded (committed) and removed meanwhile
                        continue
                journal.read_on()
                found.extend(journal.by_encounter.get(encounter, ()))
        return found

    def close(self) -> None:
        with self._lock:
            files, self._files = self._files, {}
        for journal in files.values():
            journal.close()

    def forked(self) -> None:
        """In a child: the descriptors are the parent's copies; drop them (no lock involved)."""
        files, self._files = self._files, {}
        for journal in files.values():
            journal.close()


class _ReadJournal:
    """One journal as read so far by a `_JournalReader`."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._offset = 0
        self.by_encounter: dict[str, list[tuple[Any, ...]]] = {}

    def read_on(self) -> None:
        """Index the complete lines written since the last read (a partial last line is read
        again next time, whole)."""
        data = b""
        while True:
            chunk = os.pread(self._fd, 1 << 20, self._offset + len(data))
            if not chunk:
                break
            data += chunk
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        rows, _ = read_journal(data[:end + 1])
        for row in rows:
            if row[7] is not None:
                self.by_encounter.setdefault(row[7], []).append(row)

    def close(self) -> None:
        os.close(self._fd)


class _JournalSet:
    """Every live `_IssuedJournal` of this process (weakly), for the fork hook."""

    def __init__(self) -> None:
        import weakref

        self._items: "weakref.WeakSet[_IssuedJournal | _JournalReader]" = weakref.WeakSet()

    def add(self, journal: "_IssuedJournal | _JournalReader") -> None:
        self._items.add(journal)

    def forked(self) -> None:
        for journal in list(self._items):
            if journal.pid != _process.pid:
                journal.forked()


_JOURNALS = _JournalSet()


def journal_files(directory: Path) -> list[Path]:
    """The journals in `directory` (finished or not), oldest name first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names) if n.endswith(JOURNAL_SUFFIX)]


def read_journal(data: bytes) -> tuple[list[tuple[Any, ...]], int]:
    """The rows of the complete lines of a journal's bytes, and how many lines were unreadable.
    Bytes after the last newline are a write still in progress (or one that never completed)."""
    end = data.rfind(b"\n")
    rows: list[tuple[Any, ...]] = []
    bad = 0
    for line in data[:end].split(b"\n") if end >= 0 else ():
        try:
            item = orjson.loads(line)
            if not (isinstance(item, list) and item and item[0] == _JOURNAL_FORMAT):
                raise ValueError("unknown journal format")
            for row in item[1:]:
                if not (isinstance(row, list) and len(row) == _ISSUED_COLUMN_COUNT):
                    raise ValueError("not an issued-card row")
            rows.extend(tuple(row) for row in item[1:])
        except (ValueError, TypeError):
            bad += 1
    return rows, bad


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def fold_journal_files(directory: Path, paths: Sequence[Path],
                       insert: Callable[[list[tuple[Any, ...]]], None], *,
                       finished_only: bool = False) -> None:
    """Insert the rows of the journals `paths` (one transaction), then remove the finished ones
    (a file whose lock this takes): a line leaves its file only once it is committed.
    `finished_only`: skip the files a process is still appending to."""
    opened: list[tuple[int, Path, bool, int]] = []  # fd, path, finished, unreadable lines
    rows: list[tuple[Any, ...]] = []
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # folded and removed by another process meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                finished = True
            except BlockingIOError:
                finished = False
            if finished_only and not finished:
                os.close(fd)
                continue
            file_rows, bad = read_journal(_read_all(fd))
            rows.extend(file_rows)
            opened.append((fd, path, finished, bad))
        if rows:
            insert(rows)
        for fd, path, finished, bad in opened:
            if not finished:
                continue
            if bad:
                log.error("an issued-card journal has unreadable lines; kept",
                          extra={"event": "journal_unreadable", "count": bad, "detail": path.name})
                _rename_quietly(path, path.with_suffix(".unreadable"))
            else:
                _unlink_quietly(path)
    finally:
        for fd, *_ in opened:
            os.close(fd)
    _remove_stale_new_files(directory)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rename_quietly(path: Path, target: Path) -> None:
    try:
        os.rename(path, target)
    except FileNotFoundError:
        pass


def _remove_stale_new_files(directory: Path, age_seconds: float = 60.0) -> None:
    """Remove hidden files a process died creating (before it named them; they hold nothing)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".new")]
    except FileNotFoundError:
        return
    cutoff = time.time() - age_seconds
    for name in names:
        path = directory / name
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:
            pass


class _Cursor:
    """Thin cursor wrapper: `?` placeholders on both dialects; `execute` returns itself."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._pg = dialect == "postgresql"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_Cursor":
        self._cursor.execute(sql.replace("?", "%s") if self._pg else sql, params)
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> "_Cursor":
        self._cursor.executemany(sql.replace("?", "%s") if self._pg else sql, rows)
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


def _latest_lockout(rows: Sequence[Any]) -> LockoutRecord | None:
    """The latest of the (issued_at, situation, service_id) rows of the lockout read."""
    latest = max(rows, key=lambda r: r[0], default=None)
    return None if latest is None else LockoutRecord(latest[2], latest[0], latest[1])


def _live(suppression: SuppressionRecord | None, lockout: LockoutRecord | None,
          now: datetime) -> PolicyRecords:
    """The policy records, without a suppression that ended by `now`."""
    if suppression is not None and not suppression.until > timestamp_text(now):
        suppression = None
    return PolicyRecords(suppression, lockout)


class _Process:
    """This process's id, kept current across `fork()` (no system call per connection use)."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def forked(self) -> None:
        self.pid = os.getpid()


_process = _Process()
os.register_at_fork(after_in_child=_process.forked)
os.register_at_fork(after_in_child=lambda: _JOURNALS.forked())


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
