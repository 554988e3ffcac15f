"""Secrets generated once and shared by every worker through a file in the data directory."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("cds_service.data_dir")


def ensure_private_dir(path: Path) -> None:
    """Create `path` owner-only (0700), or tighten an existing one that others can read.

    The data directory holds the SQLite database (clinicians' comments, keyed patient hashes)
    and generated keys.  A directory that group or others can enter is made 0700 with a warning;
    if that is not possible (not its owner), the service warns and carries on (the files in it
    are 0600 either way).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return
    try:
        os.chmod(path, 0o700)
        log.warning("data_dir_permissions", extra={
            "event": "data_dir_permissions",
            "detail": f"data directory {path} was mode {mode:04o}; tightened to 0700"})
    except OSError as err:
        log.warning("data_dir_permissions", extra={
            "event": "data_dir_permissions",
            "detail": f"data directory {path} is mode {mode:04o} (others can read it) and could "
                      f"not be tightened to 0700 ({err.strerror}); fix its permissions"})


def read_or_create_secret(path: Path, generate: Callable[[], bytes]) -> bytes:
    """The bytes in `path`, creating the file (mode 0600) with `generate()` if it is missing.

    Race-free across processes (gunicorn workers starting together): the secret is written to a
    private temporary file and hard-linked into place, so a process that loses the race reads
    the winner's file and every worker ends up with the same secret.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, generate())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path.read_bytes()
