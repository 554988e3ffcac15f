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
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import orjson

from cds_service.config import Settings
from cds_service.http.errors import FRONT_ERROR_HEADER, SECURITY_HEADERS
from cds_service.protocol import operation_outcome

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

def error_answer(status: int, diagnostics: str, cors: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a JSON OperationOutcome answer written outside Flask."""
    body = orjson.dumps(operation_outcome(status, diagnostics))
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               *SECURITY_HEADERS, *cors, ("Connection", "close")]
    return headers, body


class WholeRequestFront:
    """ASGI app: read the whole request (bounded in size and time), then run the WSGI app."""

    def __init__(self, wsgi_app: Any, settings: Settings, threads: int) -> None:
        from a2wsgi import WSGIMiddleware

        self.inner = WSGIMiddleware(wsgi_app, workers=threads)
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.request_body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: a2wsgi answers it
            await self.inner(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None  # gunicorn rejects a malformed Content-Length before us
        if declared is not None and declared > self.max_body:
            await self._hand_over(scope, b"", receive, send, error=413)
            return
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > self.max_body:
                        await self._hand_over(scope, b"", receive, send, error=413)
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._hand_over(scope, b"", receive, send, error=408)
            return
        await self._hand_over(scope, bytes(body), receive, send)

    async def _hand_over(self, scope: Scope, body: bytes, receive: Receive, send: Send,
                         error: int | None = None) -> None:
        """Run the app on the complete request.  When the front refused the body (`error`),
        the app gets an empty body and the `FRONT_ERROR_HEADER` and answers that status itself,
        so it is logged, counted in /metrics and carries CORS like any other error."""
        headers = [(n, v) for n, v in scope["headers"]
                   if n not in (b"content-length", b"transfer-encoding", FRONT_ERROR_HEADER)]
        headers.append((b"content-length", str(len(body)).encode()))
        if error is not None:
            headers.append((FRONT_ERROR_HEADER, str(error).encode()))
        scope = {**scope, "headers": headers}
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.inner(scope, replay, send)


def create_asgi_app(config: dict[str, Any] | None = None, *, threads: int = 4) -> WholeRequestFront:
    """The Flask app (`create_app`) behind the whole-request front."""
    from cds_service import create_app

    app = create_app(config)
    return WholeRequestFront(app, app.extensions["cds"].settings, threads)
