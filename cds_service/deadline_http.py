"""Outbound HTTP whose in-flight requests a hook call can cut off at its deadline.

`requests`/urllib3 timeouts bound each socket operation, not a whole request: a server that
sends one byte just before every read timeout keeps a request (and its thread and connection)
alive for ever.  Here every connection a fetch thread uses is registered with that thread's
`CallAbort` (one per hook call) while the request is in flight; at the deadline the hook call
calls `CallAbort.abort()`, which shuts the sockets down.  A thread blocked in `connect`,
`send`, `recv` or a TLS handshake then returns at once with an error, so the hook call can join
its threads and nothing it started outlives it.  A connection whose request completed in time is
unregistered before it goes back to the pool, so an abort never touches a connection that
another hook call is using.

Not interruptible this way: name resolution (`getaddrinfo`) of a host name; the allowlisted FHIR
servers are expected to resolve quickly (the hook call stops waiting for such a thread after
`JOIN_GRACE_SECONDS` and logs it).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

JOIN_GRACE_SECONDS = 1.0
"""How long a hook call waits for its fetch threads after aborting their sockets."""

_current = threading.local()


class CallAbort:
    """The in-flight connections of one hook call's fetch threads, and the switch that cuts them.

    Each registration keeps the *socket* the connection had when this thread used it, not only
    the connection object: urllib3 returns a failed connection to the pool itself, where another
    hook call may reconnect the same object to a new socket.  Acting on `conn.sock` later would
    then cut (or close) the other call's socket and miss ours; acting on the socket we recorded
    touches only what this call started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        self._abort_event = threading.Event()
        self._conns: dict[int, dict[int, tuple[HTTPConnection, socket.socket | None]]] = {}

    @property
    def aborted(self) -> bool:
        return self._aborted

    def attach(self) -> None:
        """Make the calling (fetch) thread's requests abortable by this object."""
        _current.call = self

    def detach(self) -> None:
        """Forget the calling thread (its connections must have been released)."""
        self.release_thread()
        _current.call = None

    def register(self, conn: HTTPConnection) -> None:
        """Called by the connection before it is used; raises once the call was aborted."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("hook call deadline")
            mine = self._conns.setdefault(threading.get_ident(), {})
            known = mine.get(id(conn))
            if known is None or conn.sock is not None:
                mine[id(conn)] = (conn, conn.sock)

    def connected(self, conn: HTTPConnection) -> None:
        """Called after a (TLS) connect: records the new socket; an abort that raced with the
        connect still takes effect."""
        with self._lock:
            self._conns.setdefault(threading.get_ident(), {})[id(conn)] = (conn, conn.sock)
            if self._aborted:
                _shutdown(conn.sock)
                raise ConnectionAbortedError("hook call deadline")

    def release_thread(self) -> None:
        """The calling thread's request is over: its connection may return to the pool (closed
        first when the call was aborted, so a shut-down socket is never reused)."""
        with self._lock:
            entries = self._conns.pop(threading.get_ident(), {})
            aborted = self._aborted
        if aborted:
            for conn, sock in entries.values():
                if sock is not None and conn.sock is sock:  # still ours: not reconnected by another call
                    conn.close()

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` (a retry delay); True when the call was aborted meanwhile."""
        return self._abort_event.wait(seconds)

    def abort(self) -> None:
        """Shut down every registered socket and refuse new requests (idempotent)."""
        with self._lock:
            self._aborted = True
            self._abort_event.set()
            for entries in self._conns.values():
                for _conn, sock in entries.values():
                    _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the TLS object that
        # the reading thread is using; the base method only shuts the file descriptor down.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or not connected yet


def _active_call() -> CallAbort | None:
    return getattr(_current, "call", None)


class _AbortableMixin:
    """Registers the connection with the current thread's `CallAbort` while it is used."""

    def connect(self) -> None:
        call = _active_call()
        if call is not None:
            call.register(self)  # type: ignore[arg-type]  # conn.sock is set during connect
        super().connect()  # type: ignore[misc]
        if call is not None:
            call.connected(self)  # type: ignore[arg-type]

    def request(self, *args: Any, **kwargs: Any) -> None:
        call = _active_call()
        if call is not None:
            call.register(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


class _AbortableHTTPConnection(_AbortableMixin, HTTPConnection):
    pass


class _AbortableHTTPSConnection(_AbortableMixin, HTTPSConnection):
    pass


class _AbortableHTTPPool(HTTPConnectionPool):
    ConnectionCls = _AbortableHTTPConnection


class _AbortableHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _AbortableHTTPSConnection


class AbortableAdapter(HTTPAdapter):
    """An `HTTPAdapter` whose connections honour the fetch thread's `CallAbort`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _AbortableHTTPPool,
                                                   "https": _AbortableHTTPSPool}
