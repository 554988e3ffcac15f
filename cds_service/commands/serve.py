"""`b12-cds serve`: production (gunicorn, pre-fork workers) or development (Flask's server).

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
                        help="threads per worker; hook calls wait on FHIR servers, threads keep cores busy")
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
    if args.dev:
        from cds_service import create_app

        host, _, port = bind.rpartition(":")
        create_app().run(host=host or "127.0.0.1", port=int(port), debug=False, threaded=True)
        return 0
    if settings.dev_mode:  # the explanation carries patient data: never under the production server
        from cds_service.commands.fhir_client import CliError

        raise CliError("CDS_DEV_MODE=1 is for the development server only (b12-cds serve --dev)")
    _prepare_multiprocess_metrics()
    GunicornServer({
        "bind": bind,
        "workers": args.workers or settings.workers,
        "worker_class": "gthread",
        "threads": args.threads,
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": None,  # the app logs each hook with its request id and timing
        "child_exit": _child_exit,
        "forwarded_allow_ips": os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"),
    }).run()
    return 0


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

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self) -> Any:
        from cds_service import create_app

        return create_app()
