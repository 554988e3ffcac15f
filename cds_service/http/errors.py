"""Every error is JSON: an OperationOutcome body, CORS headers included, never a stack trace.

Also here, because they apply to every answer alike: the request-size checks that must run
before any handler (request line and header fields, `CDS_MAX_HEADER_BYTES`) and the security
headers (`no-store`: hook answers carry patient-derived text; `nosniff`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from cds_service.logs import get_logger
from cds_service.protocol import CdsError, operation_outcome

log = get_logger("http")

HTTP_MESSAGES = {
    404: "no such endpoint or CDS service",
    405: "method not allowed for this endpoint",
    413: "request body too large",
    415: "request body must be application/json",
    431: "request header fields too large",
}


FRONT_ERROR_HEADER = b"x-cds-front-error"
"""Set by the front (any such header from the client is removed) when it refused the body:
`413` (over CDS_MAX_BODY_BYTES) or `408` (not received within CDS_REQUEST_BODY_TIMEOUT)."""
FRONT_ERROR_ENVIRON = "HTTP_X_CDS_FRONT_ERROR"

SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))
"""On every answer: hook answers carry patient-derived text (no cache may keep them) and every
body is JSON that must not be sniffed as something else."""


def front_error(marker: str) -> CdsError:
    """The error for a body the front (cds_service.asgi) refused to read."""
    if marker == "408":
        return CdsError(408, "request body not received in time")
    return CdsError(413, "request body too large")


BODY_READING_ENDPOINTS = frozenset({"hooks.call_service", "feedback.post_feedback"})
"""Views that read the body through `hooks.read_body` and answer a refused body there (after
authentication, and counted in /metrics per service)."""


def oversized_header(environ: dict[str, object], max_bytes: int) -> str | None:
    """The name of the first request header whose `name: value` line is longer than `max_bytes`
    (as werkzeug spells the name), else None.  Reads the WSGI environ directly: iterating
    `request.headers` rebuilds every name and cost more than the rest of the check."""
    limit = max_bytes - 2  # ": " between name and value
    for key, value in environ.items():
        # One cheap test for every entry (an HTTP_ name is 5 longer than the header's); which
        # entries are headers is asked only of the long ones.
        if value.__class__ is str and len(key) + len(value) > limit:  # type: ignore[arg-type]
            if key.startswith("HTTP_"):
                if len(key) - 5 + len(value) > limit and key not in _ENVIRON_BODY_HEADERS:  # type: ignore[arg-type]
                    return key[5:].replace("_", "-").title()
            elif key in _BODY_HEADERS:
                return key.replace("_", "-").title()
    return None


_BODY_HEADERS = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})
_ENVIRON_BODY_HEADERS = frozenset({"HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"})
"""werkzeug's `request.headers` lists the body headers from CONTENT_TYPE / CONTENT_LENGTH and
skips their HTTP_ copies; `oversized_header` looks at the same set."""


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class AnswerHeaders:
    """WSGI middleware around the Flask app: the security headers and the CORS headers on every
    answer (errors and preflight included), added to the header list the app hands to the server.

    Each is added only when the app did not set it (the demo page sets its own `Cache-Control`,
    a view may answer CORS itself).  At this level the headers are a plain list of tuples: the
    same work through werkzeug's `Headers` in an `after_request` hook (a scan for the names
    present, then validated `add`s) was a visible part of a small hook call's fixed cost.
    """

    def __init__(self, app: WsgiApp, cors_headers: Callable[[Mapping[str, str]], list[tuple[str, str]]]) -> None:
        self.app = app
        self.cors_headers = cors_headers

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        cors_headers = self.cors_headers

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            present = {name.lower() for name, _ in headers}
            for lowered, header in _SECURITY_HEADERS_LOWERED:
                if lowered not in present:
                    headers.append(header)
            if "access-control-allow-origin" not in present:
                headers += cors_headers(environ)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


_SECURITY_HEADERS_LOWERED = tuple((name.lower(), (name, value)) for name, value in SECURITY_HEADERS)


def json_response(payload: object, status: int = 200) -> Response:
    """Serialise with orjson (the hook path's JSON is large; orjson is several times faster)."""
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


def outcome_response(status: int, diagnostics: str, **kwargs: object) -> Response:
    return json_response(operation_outcome(status, diagnostics, **kwargs), status)


def request_limit_error(environ: Mapping[str, Any], max_header_bytes: int, *,
                        reads_body: bool) -> CdsError | None:
    """The error for a request refused before any view runs, else None: the body the front
    refused (for views that do not read the body: `reads_body` ones answer it in
    `hooks.read_body`, after authentication), a request line or a header field longer than
    `max_header_bytes` (431)."""
    refused = environ.get(FRONT_ERROR_ENVIRON)
    if refused and not reads_body:
        return front_error(refused)
    line = len(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "") or (
        len(environ.get("PATH_INFO", "")) + len(environ.get("QUERY_STRING", "")) + 1)
    if line > max_header_bytes:
        return CdsError(431, f"request line longer than {max_header_bytes} bytes")
    name = oversized_header(environ, max_header_bytes)  # type: ignore[arg-type]
    if name is not None:
        # The name only: the value may be a token.
        return CdsError(431, f"header {name[:64]!r} longer than {max_header_bytes} bytes")
    return None


def _log_client_error(status: int, reason: str, method: str, path: str, hook_instance: str | None) -> None:
    """Every 4xx leaves a line on the service side, so an integrator whose EHR got one can see
    why.  The reason is our own diagnostics (field names, limits), never request values.

    Written by the error answers below, which answer every 4xx of this app (no view returns one
    itself; tests/test_integrator_logs.py covers each kind): an `after_request` hook asking
    every answer for its status was a visible part of a small hook call's fixed cost."""
    if 400 <= status < 500:
        log.warning("client_error", extra={
            "event": "client_error", "status": status, "method": method,
            "path": path[:200], "hook_instance": hook_instance, "reason": reason})


def cds_error_response(err: CdsError, method: str, path: str, hook_instance: str | None) -> Response:
    """The answer to a `CdsError` (and its 4xx line): its OperationOutcome, `WWW-Authenticate`
    on 401."""
    _log_client_error(err.status, getattr(err, "log_reason", None) or err.diagnostics[:300],
                      method, path, hook_instance)
    response = json_response(err.outcome(), err.status)
    if err.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750; no detail on purpose
    return response


def http_error_response(err: HTTPException, method: str, path: str, hook_instance: str | None) -> Response:
    """The answer to a werkzeug `HTTPException` (routing's 404/405, the 413 past
    `MAX_CONTENT_LENGTH`, a client that disconnected mid-body): an OperationOutcome with our
    wording, and the protocol headers werkzeug computed."""
    status = err.code or 500
    reason = HTTP_MESSAGES.get(status, err.name)
    _log_client_error(status, reason, method, path, hook_instance)
    response = outcome_response(status, reason)
    # Keep protocol headers werkzeug computed (e.g. `Allow` on 405, required by RFC 9110).
    for name, value in err.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def unexpected_error_response(err: BaseException, path: str, hook_instance: str | None) -> Response:
    """The 500 for an exception nothing else answers; logged with its type and the request id
    only: exception text can carry patient data."""
    log.error("unhandled exception", extra={
        "event": "unhandled_exception", "error_type": type(err).__name__,
        "hook_instance": hook_instance, "path": path})
    return outcome_response(500, "internal error; the request id is logged on the server")


def error_response(err: Exception, method: str, path: str, hook_instance: str | None) -> Response:
    """The answer to any exception a request raised, as Flask's error handlers below choose it
    (for the hook route ahead of Flask, `cds_service.http.hook_route`, which has no Flask)."""
    if isinstance(err, CdsError):
        return cds_error_response(err, method, path, hook_instance)
    if isinstance(err, HTTPException):
        return http_error_response(err, method, path, hook_instance)
    return unexpected_error_response(err, path, hook_instance)


def register(app: Flask) -> None:
    """Install the request-size checks and the JSON error handlers (with their 4xx log line):
    thin adapters from Flask's hooks to the plain functions above, which the hook route ahead
    of Flask calls too, so the two cannot answer differently."""
    max_header_bytes = app.extensions["cds"].settings.max_header_bytes

    @app.before_request
    def _check_request_limits() -> None:
        refused = request_limit_error(request.environ, max_header_bytes,
                                      reads_body=request.endpoint in BODY_READING_ENDPOINTS)
        if refused is not None:
            raise refused

    @app.errorhandler(CdsError)
    def _cds_error(err: CdsError) -> Response:
        return cds_error_response(err, request.method, request.path, g.get("hook_instance"))

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        return http_error_response(err, request.method, request.path, g.get("hook_instance"))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        return unexpected_error_response(err, request.path, g.get("hook_instance"))
