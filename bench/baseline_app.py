"""The baseline: a Flask app that only receives a hook call and answers `{"cards": []}`.

It does what every CDS Hooks endpoint must do at the least (read the body, parse the JSON
exactly as the service does, with orjson, under the same garbage-collector settings
(`cds_service.app.tune_garbage_collector`); serialise an answer) and nothing else, so the ratio
service / baseline is the cost of our own work, not of a slower parse in the baseline.

Served by the same server as the service, with the same settings (`b12-cds serve`'s gunicorn
options, asyncio workers, the whole-request front):

    python -m bench.baseline_app --bind 127.0.0.1:8081 --workers 2

(the former model, for the before/after rows: `gunicorn --worker-class gthread --workers 2
--threads 4 'bench.baseline_app:create_baseline_app()'`).
"""

from __future__ import annotations

import argparse
from typing import Any

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


def reading_floor_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The floor under both apps, for reference only: a bare WSGI callable (no Flask) that reads
    the declared body, parses it with orjson and answers `{"cards": []}`.  The issue's targets are
    ratios to the Flask baseline above; the service's ratio to this floor shows how far it is
    from "the cost of reading the request"."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = orjson.loads(environ["wsgi.input"].read(length))
    if not isinstance(body, dict):
        start_response("400 BAD REQUEST", [("Content-Type", "application/json")])
        return [b'{"error": "not an object"}']
    answer = orjson.dumps({"cards": []})
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))])
    return [answer]


def main(argv: list[str] | None = None) -> int:
    """Serve the baseline exactly as `b12-cds serve` serves the service."""
    from cds_service.asgi import WholeRequestFront
    from cds_service.commands.serve import GunicornServer, gunicorn_options
    from cds_service.config import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    threads = args.threads

    class BaselineServer(GunicornServer):
        def load(self) -> Any:
            return WholeRequestFront(create_baseline_app(), settings, threads)

    BaselineServer(gunicorn_options(settings, args.bind, args.workers), threads).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
