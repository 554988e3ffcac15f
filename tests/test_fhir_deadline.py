"""A FHIR server that drips one byte at a time: the hook answers at the deadline and nothing it
started outlives the call (no fetch thread, no open connection), however many calls are made.

`DripServer` is a raw TCP server on 127.0.0.1: for every connection it reads the request head,
then sends a response one byte every `interval` seconds, for ever (in the status line and headers
or in the body), and counts the connections the client still holds open (a connection counts
until the client closes it).
"""

from __future__ import annotations

import datetime
import ipaddress
import select
import socket
import ssl
import threading
import time
from typing import Any

import psutil
import pytest

from tests.servers import HOST, hook_body

PV = "/cds-services/b12-neck-pain-patient-view"
DEADLINE = 0.5
CALLS = 20


class DripServer:
    def __init__(self, phase: str, interval: float = 0.05, tls: ssl.SSLContext | None = None) -> None:
        self.phase, self.interval, self.tls = phase, interval, tls
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.base = f"{'https' if tls else 'http'}://{HOST}:{self.port}"
        self.accepted = 0
        self._open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def __enter__(self) -> "DripServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.accepted += 1
                self._open += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 100000\r\n\r\n"
        body = b'{"resourceType": "Bundle", "entry": [' + b" " * 99_000
        payload = head + body if self.phase == "headers" else body
        try:
            if self.tls is not None:
                conn.settimeout(5)
                conn = self.tls.wrap_socket(conn, server_side=True)
                conn.settimeout(None)
            conn.recv(65536)  # the request head (small GETs arrive in one segment on loopback)
            if self.phase == "body":
                conn.sendall(head)
            for i in range(len(payload)):
                if self._stop.is_set():
                    return
                readable, _, _ = select.select([conn], [], [], self.interval)
                if readable and conn.recv(1024) == b"":  # the client closed its end
                    return
                conn.send(payload[i:i + 1])
        except OSError:
            return  # reset by the client
        finally:
            conn.close()
            with self._lock:
                self._open -= 1


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fhir-fetch")]


def client_connections(port: int) -> int:
    """Sockets this process holds to the server (any state but closed)."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status != psutil.CONN_CLOSE)


def settle(check, timeout: float = 10.0) -> bool:
    """Poll `check` until it holds (a loaded CI box may take seconds to close and reap); a leak
    does not end by itself (the drip lasts over an hour), so waiting longer cannot hide one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_dripping_server_leaves_no_thread_or_connection_behind(make_app, phase: str) -> None:
    with DripServer(phase) as drip:
        client = make_app(fhir_allowlist=drip.base, fhir_deadline=DEADLINE, fhir_connect_timeout=0.5,
                          fhir_read_timeout=0.5).test_client()
        baseline_threads = {t.ident for t in threading.enumerate()}
        durations = []
        for _ in range(CALLS):
            started = time.monotonic()
            resp = client.post(PV, json=hook_body(fhir_server=drip.base + "/fhir", token="t0k3n"))
            durations.append(time.monotonic() - started)
            assert resp.status_code == 412
            assert fetch_threads() == []  # joined before the answer, not left running
        assert drip.accepted >= CALLS * 9  # every key was tried on every call
        assert DEADLINE * 0.9 <= min(durations) and max(durations) < DEADLINE + 0.7
        assert settle(lambda: client_connections(drip.port) == 0), client_connections(drip.port)
        assert settle(lambda: drip.open_connections == 0), drip.open_connections
    assert {t.ident for t in threading.enumerate()} <= baseline_threads


def test_answers_inside_the_deadline_are_kept_while_the_late_one_is_cut() -> None:
    """Cutting the late request off does not touch the requests that answered in time."""
    from cds_service.config import Settings
    from cds_service.patient_data import PatientDataGatherer
    from tests.servers import Reply, StubServer
    from tests.test_patient_data import TEMPLATES, full_prefetch, render_template, request

    with StubServer() as stub:
        for key, value in full_prefetch().items():
            reply = Reply(body=value)
            if key == "labResults":  # 1 KiB every 0.2 s of a 200 KiB body: never done in time
                reply = Reply(body=b'{"resourceType":"Bundle","entry":[' + b" " * 200_000 + b"]}",
                              chunk_delay=0.2)
            stub.route("/fhir/" + render_template(TEMPLATES[key], {"context.patientId": "p1"}), reply)
        gatherer = PatientDataGatherer(Settings.from_env(
            {"fhir_allowlist": stub.base, "fhir_deadline": DEADLINE}, environ={}))
        for _ in range(3):
            started = time.monotonic()
            result = gatherer.gather(request(fhir_server=stub.base + "/fhir", token="t"), TEMPLATES)
            assert time.monotonic() - started < DEADLINE + 0.7
            assert result.failed_keys == ("labResults",)
            assert set(result.fetched_keys) == set(TEMPLATES) - {"labResults"}
            assert fetch_threads() == []


def self_signed_tls(directory) -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and the cert's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, str(cert_path)


def test_dripping_tls_server_is_cut_off_too(tmp_path) -> None:
    """Over HTTPS the reading thread is inside the TLS layer; shutting the socket down still ends it."""
    from cds_service.config import Settings
    from cds_service.patient_data import PatientDataGatherer
    from tests.test_patient_data import TEMPLATES, request

    context, cert = self_signed_tls(tmp_path)
    with DripServer("body", tls=context) as drip:
        gatherer = PatientDataGatherer(Settings.from_env(
            {"fhir_allowlist": drip.base, "fhir_deadline": DEADLINE, "fhir_read_timeout": 0.5}, environ={}))
        gatherer.session.verify = cert
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(Exception) as err:
                gatherer.gather(request(fhir_server=drip.base + "/fhir", token="t"), TEMPLATES)
            assert getattr(err.value, "status", None) == 412
            # it took the whole deadline: TLS was set up and the body was dripping (not a quick error)
            assert DEADLINE * 0.9 <= time.monotonic() - started < DEADLINE + 0.7
            assert fetch_threads() == []
        assert drip.accepted >= 5 * 9
        assert settle(lambda: client_connections(drip.port) == 0), client_connections(drip.port)
        assert settle(lambda: drip.open_connections == 0), drip.open_connections


def test_concurrent_hook_calls_reusing_pooled_connections_leave_nothing_behind() -> None:
    """Hook calls in several app threads share the connection pool: a connection one call
    gave up on is reconnected by the next.  Each call must cut only the sockets it started
    (before, a later call's socket was missed and its fetch thread read the drip for ever)."""
    from concurrent.futures import ThreadPoolExecutor

    from cds_service.config import Settings
    from cds_service.patient_data import PatientDataGatherer
    from cds_service.protocol import CdsError
    from tests.test_patient_data import TEMPLATES, request

    with DripServer("body") as drip:
        gatherer = PatientDataGatherer(Settings.from_env(
            {"fhir_allowlist": drip.base, "fhir_deadline": DEADLINE, "fhir_read_timeout": DEADLINE}, environ={}))

        def call(_: int) -> int:
            try:
                gatherer.gather(request(fhir_server=drip.base + "/fhir", token="t"), TEMPLATES)
            except CdsError as err:
                return err.status
            return 200

        with ThreadPoolExecutor(4) as pool:  # 12 calls on 4 threads: later calls reuse the pool
            assert set(pool.map(call, range(12))) == {412}
        assert drip.accepted >= 12 * len(TEMPLATES) - 12
        assert settle(lambda: fetch_threads() == []), fetch_threads()
        assert settle(lambda: drip.open_connections == 0), drip.open_connections
