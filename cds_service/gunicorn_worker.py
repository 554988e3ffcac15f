"""The gunicorn worker `b12-cds serve` runs: gunicorn's asyncio (ASGI) worker, plus

* a **header timeout**: a connection that has not sent complete request headers within
  `CDS_REQUEST_HEADER_TIMEOUT` seconds of opening is answered 408 and closed (between requests
  on a kept-alive connection gunicorn's keep-alive timeout already does this);
* **JSON errors**: what gunicorn itself answers (malformed request, request line or header over
  the server's hard limits, header timeout) is a JSON OperationOutcome with CORS and security
  headers, like every other answer of the service, instead of gunicorn's plain text;
* **exit with the master**: the kernel sends the worker SIGTERM the moment its master dies
  (`prctl(PR_SET_PDEATHSIG)`, Linux), and on SIGTERM the worker closes its listening socket at
  once (requests in flight still finish), so after a crash (kill -9) of the master no orphaned
  worker keeps the port and a restart can bind it straight away.

Slow clients cost memory in the event loop, not threads: gunicorn parses headers there, and
`cds_service.asgi.WholeRequestFront` reads the whole body there before a thread runs the app.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Any

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

from cds_service.asgi import error_answer
from cds_service.config import Settings
from cds_service.cors import OriginPolicy

PR_SET_PDEATHSIG = 1

SERVER_ERROR_TEXT = {
    400: "malformed HTTP request",
    408: "request headers not received in time",
    414: "request line too long",
    431: "request header fields too large",
    501: "unsupported transfer coding",
}
"""Fixed diagnostics: gunicorn's own messages can quote the request, which may carry a token."""


class CdsProtocol(ASGIProtocol):
    """gunicorn's HTTP/1.1 protocol with a header timeout and JSON error answers."""

    header_timeout: float = 20.0
    cors: OriginPolicy = OriginPolicy(allow_all=True)
    _header_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.header_timeout > 0 and not self._closed:
            self._header_timer = self.worker.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _on_headers_complete(self) -> Any:
        self._cancel_header_timer()
        return super()._on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._closed or self._current_request is not None:
            return
        self._send_error_response(408, "")
        self._close_transport()
        if self._request_ready is not None:
            self._request_ready.set()  # wake the connection loop so it sees the close

    def _send_error_response(self, status: int, message: str, extra_headers: Any = ()) -> None:
        # The request could not be parsed, so its Origin is unknown: CORS allows every origin
        # only when the service is configured to (CDS_CORS_ORIGINS=*).
        headers, body = error_answer(status, SERVER_ERROR_TEXT.get(status, "bad request"),
                                     self.cors.response_headers(None))
        reason = _reason(status)
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in [*headers, *extra_headers]) + "\r\n"
        self._safe_write(head.encode("latin-1"))
        self._safe_write(body)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def exit_with_parent(expected_parent: int) -> None:
    """Ask the kernel to SIGTERM this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:  # the master died before the request above
        os._exit(0)


class CdsASGIWorker(gasgi.ASGIWorker):
    """gunicorn's ASGI worker serving `CdsProtocol`, exiting with its master."""

    def init_process(self) -> None:
        exit_with_parent(self.ppid)
        settings = Settings.from_env()
        CdsProtocol.header_timeout = settings.request_header_timeout
        CdsProtocol.cors = OriginPolicy.parse(settings.cors_origins)
        # The stock worker builds `gasgi.ASGIProtocol(worker)` for each connection; in this
        # (worker) process that name is our subclass.
        gasgi.ASGIProtocol = CdsProtocol
        super().init_process()

    def handle_exit_signal(self) -> None:
        """SIGTERM (a graceful stop, or the master's death): stop listening now, not at the
        next tick of the worker's one-second heartbeat loop, so that after a crash of the
        master the port is free by the time a restarted master binds it.  Requests in flight
        still finish (graceful timeout)."""
        super().handle_exit_signal()
        for server in self.servers:
            server.close()

