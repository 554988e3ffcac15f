"""Hook calls answered ahead of Flask's dispatch.

`POST /cds-services/<id>` of a known service is the request the service exists for, and most of
a small patient's call is fixed cost.  Flask's own per-request machinery (the request context,
whose URL adapter is built twice, app and request context push/pop, session open, routing,
signals, before/after/teardown hooks, response finalisation) measured ~84 µs of a ~500 µs call
for a 20-resource patient (bench/RESULTS.md), while the hook call needs none of it: no session,
no URL building, no template, nothing in `g` that the call cannot be handed.  So `HookRoute`, a
WSGI middleware between `errors.AnswerHeaders` (the security and CORS headers, unchanged) and
Flask's `wsgi_app`, answers those calls itself with a plain werkzeug `Request`, through the same
functions the Flask view calls: `errors.request_limit_error` (the `before_request` check),
`hooks.answer_hook` (the call, its metrics and `hook` log line) and `errors.error_response` (the
error handlers' answers and `client_error` line).  Everything else goes to Flask unchanged:
discovery, preflight, feedback, ops, demo, unknown service ids (404), other methods (405), and
the rare hook call whose routing Flask could answer differently (below).

tests/test_hook_route.py sends the same table of requests through this route and through Flask's
view (still registered) and requires identical answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from flask import Flask
from werkzeug import Request
from werkzeug._internal import _wsgi_decoding_dance
from werkzeug.datastructures import EnvironHeaders
from werkzeug.wsgi import _get_server, get_host

from cds_service.http.errors import error_response, request_limit_error
from cds_service.http.hooks import ServiceDefinition, answer_hook, load_service_definitions
from cds_service.services import EXTENSION_KEY

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

HOOK_PATH_PREFIX = "/cds-services/"

_ANSWER_STATUS = "200 OK"


class HookRoute:
    """WSGI middleware: `POST /cds-services/<known service id>` answered here, everything else
    by `inner` (Flask's `wsgi_app`)."""

    def __init__(self, app: Flask, inner: WsgiApp) -> None:
        self.app = app
        self.inner = inner
        self.definitions: dict[str, ServiceDefinition] = load_service_definitions(
            app.extensions[EXTENSION_KEY].settings.cards_dir)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        svc = self.service_for(environ)
        if svc is None:
            return self.inner(environ, start_response)
        return self.answer(svc, environ, start_response)

    def service_for(self, environ: dict[str, Any]) -> ServiceDefinition | None:
        """The service a request calls, when Flask's routing would certainly send it to the
        hook view (`hooks.call_service`) of a known service; else None (Flask decides).

        The path must be exactly `/cds-services/<id>` (werkzeug's `Map` would also match, and
        redirect, variants with repeated slashes; those go to Flask).  Flask's URL adapter can
        also refuse a request before any view: a WebSocket upgrade (no rule is a WebSocket
        rule) and a `Host` that is not a valid IDNA name (400), or untrusted when the app sets
        `TRUSTED_HOSTS` (it does not); those go to Flask too."""
        if environ.get("REQUEST_METHOD") != "POST":
            return None
        path: str = environ.get("PATH_INFO") or ""
        if not path.startswith(HOOK_PATH_PREFIX):
            return None
        svc = self.definitions.get(path[len(HOOK_PATH_PREFIX):])
        if svc is None or "HTTP_UPGRADE" in environ or self.app.config["TRUSTED_HOSTS"] is not None:
            return None
        try:
            binds = _host_binds(environ.get("HTTP_HOST"), environ.get("SERVER_NAME"),
                                environ.get("SERVER_PORT"), environ["wsgi.url_scheme"])
        except (KeyError, TypeError):  # no scheme, or values no server sets: Flask decides
            return None
        return svc if binds else None

    def answer(self, svc: ServiceDefinition, environ: dict[str, Any],
               start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The hook call, as Flask's view and error handlers would answer it."""
        s = self.app.extensions[EXTENSION_KEY]
        req = HookRequestObject(environ)
        # What flask.Request.max_content_length reads, per request (the app's config).
        req.max_content_length = self.app.config["MAX_CONTENT_LENGTH"]
        counts: dict[str, object] = {}
        try:
            refused = request_limit_error(environ, s.settings.max_header_bytes, reads_body=True)
            if refused is not None:
                raise refused
            answer = answer_hook(s, svc, req, counts)
        except Exception as err:
            response = error_response(err, req.method, req.path, counts.get("hook_instance"))  # type: ignore[arg-type]
            return response(environ, start_response)
        # The headers flask.Response(answer, mimetype="application/json") sends, in its order.
        start_response(_ANSWER_STATUS, [("Content-Type", "application/json"),
                                        ("Content-Length", str(len(answer)))])
        return [answer]


class _FromEnviron:
    """An attribute of `HookRequestObject` computed from the environ on first use, then kept
    in the instance (a non-data descriptor: the instance's value, once there, is read directly)."""

    def __init__(self, compute: Callable[[dict[str, Any]], Any]) -> None:
        self.compute = compute
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.compute(obj.environ)
        return value


class HookRequestObject(Request):
    """werkzeug's `Request` whose attributes derived from the environ (method, scheme, server,
    root path, path, query string, headers, remote address) are computed when first read, each
    exactly as `Request.__init__` computes it, instead of all of them up front: a hook call
    that is answered reads none of them (`answer_hook` reads the environ and the body limit),
    and making them all was a tenth of the route's own cost.  tests/test_hook_fixed_cost.py compares
    every attribute with `Request`'s."""

    def __init__(self, environ: dict[str, Any]) -> None:  # noqa: D107 - as Request's (populate_request)
        self.environ = environ
        self.shallow = False
        environ["werkzeug.request"] = self

    method = _FromEnviron(lambda e: e.get("REQUEST_METHOD", "GET").upper())
    scheme = _FromEnviron(lambda e: e.get("wsgi.url_scheme", "http"))
    server = _FromEnviron(_get_server)
    root_path = _FromEnviron(lambda e: _wsgi_decoding_dance(e.get("SCRIPT_NAME") or "").rstrip("/"))
    path = _FromEnviron(lambda e: "/" + _wsgi_decoding_dance(e.get("PATH_INFO") or "").lstrip("/"))
    query_string = _FromEnviron(lambda e: e.get("QUERY_STRING", "").encode("latin1"))
    headers = _FromEnviron(EnvironHeaders)
    remote_addr = _FromEnviron(lambda e: e.get("REMOTE_ADDR"))


@lru_cache(maxsize=64)
def _host_binds(host_header: str | None, server_name: str | None, server_port: str | None,
                scheme: str) -> bool:
    """Whether werkzeug's `Map.bind_to_environ` accepts a request with these host values: it
    raises `BadHost` (answered 400 by Flask) when the host name (werkzeug's `get_host`,
    lowercased, without the port) is not valid IDNA.  The same calls on the same values;
    memoised, as a deployment sees a few host names."""
    environ = {"wsgi.url_scheme": scheme}
    for key, value in (("HTTP_HOST", host_header), ("SERVER_NAME", server_name), ("SERVER_PORT", server_port)):
        if value is not None:
            environ[key] = value
    try:
        get_host(environ).lower().partition(":")[0].encode("idna")
    except UnicodeError:
        return False
    return True
