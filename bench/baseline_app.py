"""The baseline: a Flask app that only receives a hook call and answers `{"cards": []}`.

It does what every CDS Hooks endpoint must do at the least (read the body, parse the JSON
exactly as the service does, with orjson, under the same garbage-collector settings
(`cds_service.app.tune_garbage_collector`); serialise an answer) and nothing else, so the ratio
service / baseline is the cost of our own work, not of a slower parse in the baseline.  Served by gunicorn with the service's settings:

    gunicorn --worker-class gthread --workers 2 --threads 4 'bench.baseline_app:create_baseline_app()'
"""

from __future__ import annotations

import orjson
from flask import Flask, Response, request

from cds_service.app import tune_garbage_collector


def create_baseline_app() -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024 * 1024
    tune_garbage_collector()

    @app.post("/cds-services/<service_id>")
    def hook(service_id: str) -> Response:
        raw = request.get_data(cache=False)
        body = orjson.loads(raw)
        if not isinstance(body, dict):
            return Response(b'{"error": "not an object"}', status=400, mimetype="application/json")
        return Response(orjson.dumps({"cards": []}), mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status": "ok"}', mimetype="application/json")

    return app
