"""The production front: whole requests are read in the event loop, then run in a thread.

`b12-cds serve` runs gunicorn's asyncio worker (`cds_service.gunicorn_worker`) with this ASGI
app.  The Flask app stays a plain WSGI app; the front in between

1. waits for the complete request in the event loop: headers (parsed by gunicorn, bounded by
   the worker's header timeout) and the whole body, bounded by `CDS_MAX_BODY_BYTES` whatever the
   framing (`Content-Length` or chunked; 413 as soon as the limit is passed) and by
   `CDS_REQUEST_BODY_TIMEOUT` (408).  A slow or idle client costs a few kilobytes of memory in
   the event loop, never a thread;
2. hands the complete request, with an exact `Content-Length`, to the Flask app running in the
   thread pool of `a2wsgi.WSGIMiddleware` (a maintained WSGI-to-ASGI adapter).  A refused body
   is handed over empty, marked, and the app answers the 413/408 (logged, counted, with CORS).

So a worker thread only ever runs requests that are ready to be answered.

Memory: a request's body, and what the app builds from it, is the largest thing a worker
holds, and without a bound a worker would hold as many bodies as clients send at once (up to
1000 connections each at `CDS_MAX_BODY_BYTES`).  `BodyBudget` caps the bytes of the bodies a
worker has admitted (being read, waiting for a thread, or in the app) at `CDS_BODY_BUDGET_BYTES`:
a request's declared length (a chunked one: the body limit, until it is read) is reserved
before its body is read; past the budget it waits, unread (gunicorn stops reading the socket
after 256 KiB), up to `CDS_BODY_BUDGET_WAIT` seconds, then gets a 503 with `Retry-After`,
written here in the event loop (all app threads may be busy: that is why there is no room).
One worker runs Python on one core at a time (the GIL), so admitting fewer large bodies at
once costs no throughput; small bodies still run `--threads` at a time.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable, Callable

import orjson

from cds_service.config import Settings
from cds_service.http.errors import FRONT_ERROR_HEADER, SECURITY_HEADERS
from cds_service.logs import get_logger
from cds_service.metrics import BUSY_REFUSALS
from cds_service.protocol import operation_outcome

log = get_logger("front")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BUSY_RETRY_AFTER_SECONDS = 2
"""`Retry-After` of the 503 when the body budget stayed full: about the time the service takes
for one very large request (bench/RESULTS.md, memory part)."""


def error_answer(status: int, diagnostics: str, cors: list[tuple[str, str]],
                 issue_code: str | None = None) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a JSON OperationOutcome answer written outside Flask
    (`issue_code`: the FHIR issue type, when the status's default does not say it)."""
    outcome = operation_outcome(status, diagnostics)
    if issue_code:
        outcome["issue"][0]["code"] = issue_code
    body = orjson.dumps(outcome)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               *SECURITY_HEADERS, *cors, ("Connection", "close")]
    return headers, body


class BodyBudget:
    """The bytes of request bodies one worker holds at once, read or being read, until answered.

    `reserve(n)` admits a request when its `n` bytes fit beside those already admitted, in
    arrival order (a large request is not overtaken for ever by small ones), or when nothing else
    is admitted (so a body at `CDS_MAX_BODY_BYTES` always gets its turn even with a budget below
    it); otherwise it waits, up to `timeout` seconds.  A request without a body (`n == 0`:
    /healthz, discovery, metrics) never waits.  One instance per worker, used from its event loop
    only, so plain attributes need no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.in_use == 0 or self.in_use + n <= self.limit

    async def reserve(self, n: int, timeout: float) -> bool:
        """Hold `n` bytes of the budget; False if no room was made within `timeout` seconds."""
        if n == 0:
            return True
        if not self._waiting and self._fits(n):
            self.in_use += n
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            if future.done() and not future.cancelled():
                return True  # admitted just as the wait ran out
            self._withdraw(entry)
            return False
        except asyncio.CancelledError:  # the connection's task was cancelled (worker stopping)
            if future.done() and not future.cancelled():
                self.release(n)
            else:
                self._withdraw(entry)
            raise

    def _withdraw(self, entry: tuple[int, "asyncio.Future[None]"]) -> None:
        if entry in self._waiting:
            self._waiting.remove(entry)
        self._admit_waiting()  # this request may have been holding up smaller ones behind it

    def release(self, n: int) -> None:
        """Give back `n` bytes (all of a reservation after the answer, or the unused part)."""
        if n == 0:
            return
        self.in_use -= n
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting:
            n, future = self._waiting[0]
            if future.done():  # its wait has just ended (timed out, cancelled): it holds nothing
                self._waiting.popleft()
                continue
            if not self._fits(n):
                break
            self._waiting.popleft()
            self.in_use += n
            future.set_result(None)


class WholeRequestFront:
    """ASGI app: read the whole request (bounded in size and time), then run the WSGI app;
    the bodies held at once are bounded by a `BodyBudget`."""

    def __init__(self, wsgi_app: Any, settings: Settings, threads: int) -> None:
        from a2wsgi import WSGIMiddleware

        self.inner = WSGIMiddleware(wsgi_app, workers=threads)
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.request_body_timeout
        self.budget = BodyBudget(settings.body_budget_for(threads))
        self.budget_wait = settings.body_budget_wait
        self.cors = settings.cors_policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: a2wsgi answers it
            await self.inner(scope, receive, send)
            return
        declared: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None  # gunicorn rejects a malformed Content-Length before us
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared > self.max_body:
            await self._hand_over(scope, b"", receive, send, error=413)
            return
        # A chunked body's size is known only once read: it holds the whole limit until then.
        reserved = declared if declared is not None else self.max_body if chunked else 0
        waited = time.monotonic()
        if not await self.budget.reserve(reserved, self.budget_wait):
            await self._busy(scope, send, time.monotonic() - waited)
            return
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            if len(body) < reserved:
                self.budget.release(reserved - len(body))
                reserved = len(body)
            # Handed over in a box that the front empties once the app has its copy: a local
            # variable here would keep a second copy of the body alive for the whole request.
            box, body = [body], None
            await self._hand_over(scope, box, receive, send)
        finally:
            self.budget.release(reserved)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body; None when the request was answered (413, 408) or the client left."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    if chunk:
                        chunks.append(chunk)
                        size += len(chunk)
                    if size > self.max_body:
                        chunks.clear()
                        await self._hand_over(scope, b"", receive, send, error=413)
                        return None
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            chunks.clear()
            await self._hand_over(scope, b"", receive, send, error=408)
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _busy(self, scope: Scope, send: Send, waited: float) -> None:
        """503 + Retry-After, written here: the app's threads are what there is no room for."""
        origin = next((v.decode("latin-1") for n, v in scope["headers"] if n == b"origin"), None)
        headers, body = error_answer(
            503, "the service is busy with other large requests; retry shortly",
            self.cors.response_headers(origin), issue_code="throttled")
        headers.append(("Retry-After", str(BUSY_RETRY_AFTER_SECONDS)))
        log.warning("busy", extra={
            "event": "busy", "status": 503, "method": scope.get("method"),
            "path": scope.get("path", "")[:200], "duration_ms": round(waited * 1000, 1),
            "detail": f"body budget {self.budget.limit} bytes, {self.budget.in_use} in use"})
        BUSY_REFUSALS.inc()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _hand_over(self, scope: Scope, box: bytes | list[bytes], receive: Receive, send: Send,
                         error: int | None = None) -> None:
        """Run the app on the complete request (`box`: the body, or a one-element list holding
        it, emptied here so that only the app's copy stays alive).  When the front refused the
        body (`error`), the app gets an empty body and the `FRONT_ERROR_HEADER` and answers that
        status itself, so it is logged, counted in /metrics and carries CORS like any other error."""
        body = box.pop() if isinstance(box, list) else box
        headers = [(n, v) for n, v in scope["headers"]
                   if n not in (b"content-length", b"transfer-encoding", FRONT_ERROR_HEADER)]
        headers.append((b"content-length", str(len(body)).encode()))
        if error is not None:
            headers.append((FRONT_ERROR_HEADER, str(error).encode()))
        scope = {**scope, "headers": headers}
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered, body
            if not delivered:
                delivered = True
                message = {"type": "http.request", "body": body, "more_body": False}
                body = b""  # a2wsgi copies it into its buffer: hold no second copy meanwhile
                return message
            return await receive()  # after the body: only a disconnect can come

        await self.inner(scope, replay, send)


def create_asgi_app(config: dict[str, Any] | None = None, *, threads: int = 4) -> WholeRequestFront:
    """The Flask app (`create_app`) behind the whole-request front."""
    from cds_service import create_app

    app = create_app(config)
    return WholeRequestFront(app, app.extensions["cds"].settings, threads)
