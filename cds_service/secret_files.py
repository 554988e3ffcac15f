"""Secrets generated once and shared by every worker through a file in the data directory."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


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
