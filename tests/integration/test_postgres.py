"""The storage contract (tests/test_store.py) against a real PostgreSQL server.

The server is started here, from the Debian `postgresql` package binaries
(/usr/lib/postgresql/<version>/bin), in a temporary directory, on 127.0.0.1 and a free port;
it is stopped at the end of the module.  As root, initdb/postgres run as the `postgres` user.

The tests are skipped ONLY when PostgreSQL cannot be started (binaries missing, no `postgres`
user, initdb or startup failing), with the reason in the skip message and on stderr.  Set
`CDS_REQUIRE_POSTGRES=1` (CI) to turn that skip into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cds_service.config import Settings
from cds_service.store import SCHEMA_VERSION, IssuedCard, Store
from tests.servers import free_port
from tests.test_store import SVC, StoreContract, accepted, overridden

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


class PostgresUnavailable(Exception):
    """PostgreSQL could not be started here (reason in the message)."""


class PostgresServer:
    """A throw-away PostgreSQL cluster: initdb into a temp dir, `postgres` on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.bin_dir = self._find_bin_dir()
        self.port = free_port()
        self.run_as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="cds-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _find_bin_dir() -> Path:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                            key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
        if candidates:
            return Path(candidates[-1]).parent
        on_path = shutil.which("postgres")
        if on_path and shutil.which("initdb"):
            return Path(on_path).parent
        raise PostgresUnavailable("no PostgreSQL server binaries (apt-get install postgresql)")

    def _user_kwargs(self) -> dict:
        if not self.run_as_postgres:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no `postgres` user") from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> None:
        kwargs = self._user_kwargs()
        if kwargs:
            os.chown(self.root, kwargs["user"], kwargs["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": str(self.root)}
        init = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-instructions"],
            capture_output=True, text=True, env=env, timeout=120, **kwargs)
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={self.root}",
             "-c", "max_connections=100", "-c", "fsync=on"],
            stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
        log.close()
        deadline = time.monotonic() + 60
        import psycopg

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log.read_text()[-500:]}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        raise PostgresUnavailable("postgres did not accept connections within 60 s")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown; our clients are closed by then
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except PostgresUnavailable as why:
        _unavailable(str(why))
    try:
        server.start()
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as why:
        server.stop()
        _unavailable(str(why))
    try:
        yield server
    finally:
        server.stop()


def _unavailable(reason: str) -> None:
    message = f"PostgreSQL COULD NOT BE STARTED, PostgreSQL storage tests NOT RUN: {reason}"
    print(f"\n*** {message} ***", file=sys.stderr)
    if os.environ.get("CDS_REQUIRE_POSTGRES") == "1":
        pytest.fail(message)
    pytest.skip(message)


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def open_store(self, postgres: PostgresServer, tmp_path: Path) -> Callable[[], Store]:
        url = postgres.create_database()
        settings = Settings(data_dir=str(tmp_path / "data"), database_url=url,
                            patient_hash_key="k" * 40)
        return lambda: Store.open(settings)

    def test_postgres_is_really_used(self, open_store, tmp_path):
        store = open_store()
        assert store.dialect == "postgresql"
        store.save_feedback(SVC, [overridden("c1")])
        assert not (tmp_path / "data" / "cds.sqlite3").exists()
        conn = store._connection()
        assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1
        store.close()

    def test_only_feedback_waits_for_the_disk(self, open_store):
        """The hook path's writes (issued cards, replay cache) are one statement each, run with
        the connection's `synchronous_commit = off`; every durable transaction (feedback,
        migrations) sets it on for itself, whatever the session has."""
        store = open_store()
        conn = store._connection()

        def level(cur=None) -> str:
            return (cur or conn).execute("SHOW synchronous_commit").fetchone()[0]

        assert level() == "off"
        with store._transaction() as cur:
            assert level(cur) == "on"
        with store._transaction(durable=False) as cur:
            assert level(cur) == "off"
        store._next_purge = time.time() + 3600  # no replay-cache purge in the middle
        sent: list[str] = []
        real_execute = conn.execute
        conn.execute = lambda sql, *a, **k: (sent.append(str(sql)), real_execute(sql, *a, **k))[1]
        try:
            store.record_issued_cards(SVC, "h1", "p1", [IssuedCard("c1", "b12-test", ("s1", "s2")),
                                                        IssuedCard("c2", "b12-test")])
            assert store.remember_jti("iss", "j1", time.time() + 60) is True
            assert store.remember_jti("iss", "j1", time.time() + 60) is False
            assert [q.split()[0] for q in sent] == ["INSERT"] * 3
            sent.clear()
            real_execute("SET synchronous_commit = on")  # as a pooler might leave the session
            store.save_feedback(SVC, [accepted("c1", "s1")])
            assert sent == ["BEGIN; SET LOCAL synchronous_commit = on", "COMMIT"]
            sent.clear()
            real_execute("SET synchronous_commit = off")
            store.save_feedback(SVC, [accepted("c1", "s2")])
            assert sent == ["BEGIN; SET LOCAL synchronous_commit = on", "COMMIT"]
            assert level() == "off"  # SET LOCAL: the session keeps its own
            assert [r["unknown_suggestions"] for r in store.feedback_rows()] == [False, False]
        finally:
            del conn.execute
            store.close()

    def test_concurrent_first_start_migrates_once(self, postgres, tmp_path):
        # Several workers starting together on an empty database: the advisory lock serialises
        # the migration, so none fails and the version is recorded once.
        import threading

        settings = Settings(data_dir=str(tmp_path), database_url=postgres.create_database(),
                            patient_hash_key="k" * 40)
        errors: list[BaseException] = []

        def start() -> None:
            try:
                Store.open(settings).close()
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=start) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        store = Store.open(settings)
        with store._transaction(write=False) as cur:
            assert cur.execute("SELECT count(*), max(version) FROM schema_version").fetchone() == (
                SCHEMA_VERSION, SCHEMA_VERSION)
        store.close()

    def test_store_reconnects_after_the_server_drops_an_idle_connection(self, open_store, postgres):
        import psycopg

        store = open_store()
        store.record_issued_cards(SVC, "h", "p", [IssuedCard("c1", "kind-a")])
        pid = store._connection().info.backend_pid
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # the dead connection is noticed at BEGIN and replaced; the call succeeds
        assert store.save_feedback(SVC, [overridden("c1")]).stored == 1
        assert store._connection().info.backend_pid != pid
        assert len(store.feedback_rows()) == 1
        store.close()


def test_suppression_and_lockout_are_shared_by_two_apps_on_one_postgres_database(postgres, tmp_path):
    """Two replicas (separate data directories, one database): feedback given through one
    suppresses the card on the other; a card shown by one locks out the other's order hooks."""
    from cds_service import create_app
    from cds_service.app import services
    from tests.test_policy import OS, PV, chart, hook, override

    url = postgres.create_database()
    apps = [create_app({"data_dir": str(tmp_path / f"replica-{i}"), "database_url": url,
                        "patient_hash_key": "k" * 40, "auth_disabled": True}) for i in (1, 2)]
    first, second = (a.test_client() for a in apps)
    try:
        (card,) = hook(first, "p1", chart("p1"))
        override(first, card, "tested-elsewhere")
        assert hook(second, "p1", chart("p1")) == []
        assert len(hook(second, "p2", chart("p2"), PV, encounter="enc-9")) == 1
        assert hook(first, "p2", chart("p2"), OS, encounter="enc-9") == []
        kinds = {k["kind"]: k for k in services(apps[0]).store.feedback_report()["kinds"]}
        assert (kinds["b12-test"]["suppressed"], kinds["b12-test"]["locked_out"]) == (1, 1)
    finally:
        for a in apps:
            services(a).store.close()
