"""`b12-cds serve` start-up checks that need no server: demo mode stays on loopback unless
explicitly allowed, and says what it exposes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cds_service.commands.serve import check_demo_bind, gunicorn_options
from cds_service.config import Settings

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))


@pytest.mark.parametrize("bind", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.2:9000"])
def test_demo_mode_on_loopback_starts_and_warns_what_it_exposes(bind):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("cds_service").addHandler(handler)
    try:
        check_demo_bind(Settings(demo_mode=True), bind)
    finally:
        logging.getLogger("cds_service").removeHandler(handler)
    detail = next(r.detail for r in records if getattr(r, "event", None) == "demo_mode")
    assert "DEMO MODE" in detail and "tokens" in detail and "report" in detail


@pytest.mark.parametrize("bind", ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080", "cds.example.org:80"])
def test_demo_mode_refuses_a_non_loopback_bind(bind):
    with pytest.raises(SystemExit, match="CDS_DEMO_ALLOW_REMOTE"):
        check_demo_bind(Settings(demo_mode=True), bind)
    check_demo_bind(Settings(demo_mode=True, demo_allow_remote=True), bind)  # explicitly allowed
    check_demo_bind(Settings(demo_mode=False), bind)  # not demo: nothing to refuse


def test_serve_command_exits_before_listening_in_demo_mode_on_all_interfaces(tmp_path):
    """The real command: refuses at once, before binding anything."""
    env = {"PATH": "/usr/bin:/bin", "CDS_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([B12_CDS, "serve", "--demo", "--bind", "0.0.0.0:1"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "demo mode refuses to listen on 0.0.0.0:1" in result.stderr


def test_production_options_keep_the_slow_client_safe_worker():
    options = gunicorn_options(Settings(), "127.0.0.1:8080", 2)
    assert options["worker_class"] == "cds_service.gunicorn_worker.CdsASGIWorker"
    assert options["workers"] == 2
    # gunicorn's hard limits sit above the app's, so ordinary oversized requests reach the app.
    assert options["limit_request_field_size"] > Settings().max_header_bytes
