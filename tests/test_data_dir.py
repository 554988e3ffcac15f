"""The data directory (SQLite database with clinicians' comments, keyed patient hashes,
generated keys) is owner-only: created 0700, and an existing looser one is tightened."""

from __future__ import annotations

import logging
import os
import stat

from cds_service import create_app
from cds_service.secret_files import ensure_private_dir


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_data_dir_is_created_owner_only(tmp_path):
    create_app({"data_dir": str(tmp_path / "new"), "auth_disabled": True})
    assert mode(tmp_path / "new") == 0o700
    assert mode(tmp_path / "new" / "cds.sqlite3") == 0o600


def test_an_existing_world_readable_data_dir_is_tightened_with_a_warning(tmp_path):
    data = tmp_path / "loose"
    data.mkdir()
    os.chmod(data, 0o755)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("cds_service")
    logger.addHandler(handler)
    try:
        create_app({"data_dir": str(data), "auth_disabled": True})
    finally:
        logger.removeHandler(handler)
    assert mode(data) == 0o700
    warning = next(r for r in records if getattr(r, "event", None) == "data_dir_permissions")
    assert warning.levelno == logging.WARNING and "0755" in warning.detail and "0700" in warning.detail


def test_an_owner_only_data_dir_is_left_alone_silently(tmp_path, monkeypatch):
    data = tmp_path / "tight"
    data.mkdir(mode=0o700)
    calls = []
    monkeypatch.setattr(os, "chmod", lambda *a, **k: calls.append(a))
    ensure_private_dir(data)
    assert calls == [] and mode(data) == 0o700


def test_a_data_dir_that_cannot_be_tightened_is_reported(tmp_path, monkeypatch):
    data = tmp_path / "foreign"
    data.mkdir()
    os.chmod(data, 0o777)

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("cds_service.data_dir")
    logger.addHandler(handler)
    monkeypatch.setattr(os, "chmod", refuse)
    try:
        ensure_private_dir(data)
    finally:
        logger.removeHandler(handler)
    assert "could not be tightened" in records[0].detail and "0777" in records[0].detail
