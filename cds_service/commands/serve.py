"""`b12-cds serve`: production (gunicorn, pre-fork workers) or development (Flask's server).

Production serving model: gunicorn's master forks `--workers` processes, each running an asyncio
event loop (`cds_service.gunicorn_worker.CdsASGIWorker`) that reads whole requests (headers
with a timeout, the body bounded in size and time: `cds_service.asgi`) before one of the
worker's `--threads` threads runs the Flask app.  Slow or idle clients therefore cannot occupy
the threads that answer `/healthz` and the hooks.  Workers exit with their master.

The Dockerfile runs exactly `b12-cds serve`; tests start the same command on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", help="HOST:PORT to listen on (default: CDS_BIND or 127.0.0.1:8080)")
    parser.add_argument("--workers", type=int, help="gunicorn worker processes (default: CDS_WORKERS or 2)")
    parser.add_argument("--threads", type=int, default=4,
                        help="app threads per worker (complete requests only); hook calls wait on FHIR "
                             "servers, threads keep cores busy")
    parser.add_argument("--demo", action="store_true",
                        help="demo mode: serve the demo EHR page at / with the built-in synthetic patients")
    parser.add_argument("--dev", action="store_true",
                        help="Flask development server (single process); hook answers carry the "
                             "explanation of each decision (patient data: never in production)")


def run(args: argparse.Namespace) -> int:
    from cds_service.config import Settings

    if args.demo:
        os.environ["CDS_DEMO_MODE"] = "1"
    if args.dev:
        os.environ["CDS_DEV_MODE"] = "1"
    settings = Settings.from_env()
    bind = args.bind or settings.bind
    check_demo_bind(settings, bind)
    if args.dev:
        from cds_service import create_app

        host, _, port = bind.rpartition(":")
        create_app().run(host=host or "127.0.0.1", port=int(port), debug=False, threaded=True)
        return 0
    if settings.dev_mode:  # the explanation carries patient data: never under the production server
        from cds_service.commands.fhir_client import CliError

        raise CliError("CDS_DEV_MODE=1 is for the development server only (b12-cds serve --dev)")
    _prepare_multiprocess_metrics()
    GunicornServer(gunicorn_options(settings, bind, args.workers or settings.workers), args.threads).run()
    return 0


SERVER_LIMIT_REQUEST_LINE = 8190
"""gunicorn's hard limits, above the app's `CDS_MAX_HEADER_BYTES` so that ordinary oversized
requests reach the app (431 with the exact CORS headers); past these gunicorn answers itself
(also JSON, see cds_service.gunicorn_worker).  8190 is the largest request line gunicorn allows."""
SERVER_LIMIT_FIELD_SIZE = 65536
SERVER_LIMIT_FIELDS = 100


def gunicorn_options(settings: Any, bind: str, workers: int) -> dict[str, Any]:
    """The gunicorn settings of the production server (also used by bench/ for the baseline)."""
    return {
        "bind": bind,
        "workers": workers,
        "worker_class": "cds_service.gunicorn_worker.CdsASGIWorker",
        "worker_connections": 1000,
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "limit_request_line": SERVER_LIMIT_REQUEST_LINE,
        "limit_request_field_size": SERVER_LIMIT_FIELD_SIZE,
        "limit_request_fields": SERVER_LIMIT_FIELDS,
        "asgi_loop": "auto",  # uvloop (a dependency), else asyncio
        "asgi_lifespan": "off",
        "control_socket_disable": True,  # one fixed path per user: servers side by side would clash  # the app is built before the worker serves; nothing to run
        "accesslog": None,  # the app logs each hook with its request id and timing
        "child_exit": _child_exit,
        "forwarded_allow_ips": os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
    }


LOOPBACK_HOSTS = {"127.0.0.1", "::1", "[::1]", "localhost"}


def check_demo_bind(settings: Any, bind: str) -> None:
    """Demo mode mints signed tokens for anyone who can reach `/demo/api/token`: refuse a
    non-loopback address unless CDS_DEMO_ALLOW_REMOTE=1, and say at start what is exposed."""
    if not settings.demo_mode:
        return
    from cds_service.logs import configure, get_logger

    host = bind.rpartition(":")[0] or bind
    loopback = host in LOOPBACK_HOSTS or host.startswith("127.") or bind.startswith("unix:")
    if not loopback and not settings.demo_allow_remote:
        raise SystemExit(
            f"demo mode refuses to listen on {bind}: it hands out tokens the service trusts "
            "(hooks, feedback, report) to anyone who can reach it. Bind to 127.0.0.1, or set "
            "CDS_DEMO_ALLOW_REMOTE=1 for a test deployment with synthetic data only.")
    configure(settings.log_level)
    get_logger("serve").warning("demo_mode", extra={"event": "demo_mode", "detail": (
        f"DEMO MODE on {bind}: the demo page and /demo/api/token give anyone who can reach this "
        "address signed tokens for the hooks, feedback and the feedback report; synthetic "
        "patients only, never real data" + ("" if loopback else " (CDS_DEMO_ALLOW_REMOTE=1: reachable beyond this machine)"))})


def _prepare_multiprocess_metrics() -> None:
    """prometheus-client multi-process mode: a fresh, private directory per server start."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="b12-cds-metrics-")


def _child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _gunicorn_base() -> type:
    from gunicorn.app.base import BaseApplication

    return BaseApplication


class GunicornServer(_gunicorn_base()):  # type: ignore[misc]
    """gunicorn with the app built in each worker after fork (no shared DB connections)."""

    def __init__(self, options: dict[str, Any], threads: int = 4) -> None:
        self.options = options
        self.threads = threads
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from cds_service.asgi import create_asgi_app

        return create_asgi_app(threads=self.threads)
