"""Every error is JSON: an OperationOutcome body, CORS headers included, never a stack trace."""

from __future__ import annotations

import orjson
from flask import Flask, Response, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from cds_service.logs import get_logger
from cds_service.protocol import CdsError, operation_outcome

log = get_logger("http")

HTTP_MESSAGES = {
    404: "no such endpoint or CDS service",
    405: "method not allowed for this endpoint",
    413: "request body too large",
    415: "request body must be application/json",
}


def json_response(payload: object, status: int = 200) -> Response:
    """Serialise with orjson (the hook path's JSON is large; orjson is several times faster)."""
    return Response(orjson.dumps(payload), status=status, mimetype="application/json")


def outcome_response(status: int, diagnostics: str, **kwargs: object) -> Response:
    return json_response(operation_outcome(status, diagnostics, **kwargs), status)


def register(app: Flask) -> None:
    """Install CORS (all routes, errors and preflight included) and the JSON error handlers."""
    origins = app.extensions["cds"].settings.cors_origin_list
    CORS(
        app,
        origins=origins,
        send_wildcard=origins == ["*"],
        allow_headers=["Content-Type", "Authorization"],
        methods=["GET", "POST", "OPTIONS"],
        max_age=600,
    )

    @app.errorhandler(CdsError)
    def _cds_error(err: CdsError) -> Response:
        response = json_response(err.outcome(), err.status)
        if err.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750; no detail on purpose
        return response

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        response = outcome_response(status, HTTP_MESSAGES.get(status, err.name))
        # Keep protocol headers werkzeug computed (e.g. `Allow` on 405, required by RFC 9110).
        for name, value in err.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        # Log the type and the request id only: exception text can carry patient data.
        log.error("unhandled exception", extra={
            "event": "unhandled_exception", "error_type": type(err).__name__,
            "hook_instance": g.get("hook_instance"), "path": request.path})
        return outcome_response(500, "internal error; the request id is logged on the server")
