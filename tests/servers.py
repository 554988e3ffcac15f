"""Shared test helpers: free ports, a threaded stub HTTP server on 127.0.0.1, readiness waits,
and `ServerProcess` for real servers the tests start (and always stop).

`StubServer` answers from a route table: `server.route("/fhir/Patient/p1", reply)` where `reply`
is a `Reply` (status, JSON/bytes body, headers, delay before answering, delay between chunks) or a
callable `(RecordedRequest) -> Reply`.  Every request is recorded (method, path, query, headers)
so tests can assert what was sent, e.g. that a token never reached a host.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

HOST = "127.0.0.1"


class ServerProcess:
    """A server started in its own process group, so stop()/kill() reach every worker it forks.

    `ready()` is polled until it returns True (e.g. an HTTP health check); if the process exits
    first, or `timeout` passes, the test fails with the tail of the server's log.
    """

    def __init__(self, command: list[str], *, log_path: Any, env: dict[str, str] | None = None,
                 cwd: Any = None, user: int | None = None) -> None:
        self.command, self.log_path, self.env, self.cwd = command, log_path, env, cwd
        self.user = user
        """Run as this uid (and the same gid); needs root."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool], timeout: float = 60.0) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            as_user = {"user": self.user, "group": self.user, "extra_groups": []} if self.user is not None else {}
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, **as_user)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return self
            except OSError:  # includes requests' connection errors
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.command[0]} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group; SIGKILL it if it has not exited after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def sekmet_server(work: Any) -> tuple[ServerProcess, str]:
    """A sekmet-fhir FHIR R4 server (not started) on 127.0.0.1:<free port> with its database in
    `work`, and its base URL (`.../fhir`).  Simulated labs off, strict validation of what is
    written.  Use: `with server.start(http_ok(f"{base}/metadata"), timeout=60): ...`."""
    import sys
    from pathlib import Path

    work = Path(work)
    port = free_port()
    base = f"http://{HOST}:{port}/fhir"
    config = work / "settings.yaml"
    config.write_text("\n".join([
        f"base_url: {base}",
        f"host: {HOST}",
        f"port: {port}",
        f"data_dir: {work / 'data'}",
        f"own_private_key_path: {work / 'keys' / 'sekmet_private.pem'}",
        "log_inbound: false",
        "simulator:",
        "  enabled: false",  # no simulated lab filling our ServiceRequests
        "validation:",
        "  inbound: strict",  # the demo data must be valid R4
        "",
    ]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    sekmet = str(Path(sys.executable).with_name("sekmet"))
    server = ServerProcess([sekmet, "serve", "--config", str(config), "--host", HOST, "--port", str(port)],
                           cwd=work, env=env, log_path=work / "sekmet.log")
    return server, base


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET `url` answers 200."""
    import requests

    return lambda: requests.get(url, timeout=1).status_code == 200


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0, host: str = HOST) -> None:
    """Block until something accepts TCP connections on `host:port` (or raise TimeoutError)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    """A dict/list (sent as JSON), bytes or str (sent as is)."""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before sending anything."""
    chunk_delay: float = 0.0
    """Seconds to wait between 1 KiB chunks of the body (a slow drip)."""
    content_type: str = "application/fhir+json"
    send_length: bool = True
    """False: no Content-Length; the body ends when the connection closes."""

    def payload(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return orjson.dumps(self.body)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    at: float


class StubServer:
    """A threaded HTTP server on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Reply | Callable[[RecordedRequest], Reply]] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                stub._handle(self)

            def do_POST(self) -> None:
                stub._handle(self)

            def do_PUT(self) -> None:
                stub._handle(self)

        class QuietServer(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops concurrent SYNs (1 s retransmit)

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up early is what fault tests provoke

        self.httpd = QuietServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.base = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def route(self, path: str, reply: Reply | Callable[[RecordedRequest], Reply]) -> None:
        """Answer requests whose path (optionally `path?query`) equals `path`."""
        self.routes[path] = reply

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            h.rfile.read(length)
        rec = RecordedRequest(h.command, parts.path, parts.query, dict(h.headers.items()), time.monotonic())
        with self._lock:
            self.requests.append(rec)
        reply = (self.routes.get(f"{parts.path}?{parts.query}")
                 or self.routes.get(f"{parts.path}?{unquote(parts.query)}") or self.routes.get(parts.path))
        if callable(reply):
            reply = reply(rec)
        if reply is None:
            reply = Reply(404, {"resourceType": "OperationOutcome",
                                "issue": [{"severity": "error", "code": "not-found"}]})
        try:
            if reply.delay:
                time.sleep(reply.delay)
            payload = reply.payload()
            h.send_response(reply.status)
            h.send_header("Content-Type", reply.content_type)
            if not reply.send_length:
                h.send_header("Connection", "close")
                h.close_connection = True
            elif "Content-Length" not in reply.headers:
                h.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                h.send_header(name, value)
            h.end_headers()
            if reply.chunk_delay:
                for i in range(0, len(payload), 1024):
                    h.wfile.write(payload[i:i + 1024])
                    h.wfile.flush()
                    time.sleep(reply.chunk_delay)
            else:
                h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (deadline, size cap): expected in fault tests


# ---------------------------------------------------------------------------------------------
# Small FHIR builders for patient-data tests
# ---------------------------------------------------------------------------------------------


def searchset(*resources: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    """A searchset Bundle of `resources`, optionally with a `next` link."""
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                              "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def resource(rtype: str, rid: str, patient_id: str = "p1", **fields: Any) -> dict[str, Any]:
    """A minimal resource of `rtype` about `patient_id` (Patient: the patient itself)."""
    res: dict[str, Any] = {"resourceType": rtype, "id": rid}
    if rtype != "Patient":
        res["subject"] = {"reference": f"Patient/{patient_id}"}
    res.update(fields)
    return res


def hook_body(*, hook: str = "patient-view", patient_id: str = "p1", fhir_server: str | None = None,
              token: str | None = None, prefetch: dict[str, Any] | None = None,
              draft_orders: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A CDS Hooks request body as an EHR would send it."""
    body: dict[str, Any] = {
        "hook": hook, "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/u1", "patientId": patient_id},
    }
    if hook != "patient-view":
        drafts = draft_orders or []
        body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                          "entry": [{"resource": d} for d in drafts]}
        if hook == "order-select":
            body["context"]["selections"] = [f"{d['resourceType']}/{d['id']}" for d in drafts]
    if fhir_server:
        body["fhirServer"] = fhir_server
    if token:
        body["fhirAuthorization"] = {"access_token": token, "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "b12-cds"}
    if prefetch is not None:
        body["prefetch"] = prefetch
    return body
