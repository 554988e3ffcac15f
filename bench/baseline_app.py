"""The baseline: a Flask app that only receives a hook call and answers `{"cards": []}`.

It does what every CDS Hooks endpoint must do at the least (read the body, parse the JSON
exactly as the service does: orjson with the cyclic garbage collector paused, see
`cds_service.http.hooks.gc_paused`; serialise an answer) and nothing else, so the ratio
service / baseline is the cost of our own work, not of a slower parse in the baseline.  Served by gunicorn with the service's settings:

    gunicorn --worker-class gthread --workers 2 --threads 4 'bench.baseline_app:create_baseline_app()'
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
from flask import Flask, Response, request

_lock = threading.Lock()
_depth = 0


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A copy of the service's parse-time GC pause (kept here so the baseline imports nothing
    from the service)."""
    global _depth
    with _lock:
        if _depth == 0:
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.enable()


def create_baseline_app() -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024

    @app.post("/cds-services/<service_id>")
    def hook(service_id: str) -> Response:
        raw = request.get_data(cache=False)
        with _gc_paused():
            body = orjson.loads(raw)
        if not isinstance(body, dict):
            return Response(b'{"error": "not an object"}', status=400, mimetype="application/json")
        return Response(orjson.dumps({"cards": []}), mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status": "ok"}', mimetype="application/json")

    return app
