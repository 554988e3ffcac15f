"""`b12-cds healthcheck`: exit 0 when `/healthz` of the local service answers 200, else 1.

The Docker image's HEALTHCHECK runs it, so the check follows `CDS_BIND` (or `--bind`): a
wildcard address (`0.0.0.0`, `::`, empty) is checked on loopback.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", help="HOST:PORT the service listens on (default: CDS_BIND or 127.0.0.1:8080)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default: %(default)s)")


def health_url(bind: str) -> str:
    """The `/healthz` URL of a service listening on `bind` (HOST:PORT)."""
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"bind address {bind!r} is not HOST:PORT")
    host = WILDCARD_HOSTS.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def run(args: argparse.Namespace) -> int:
    from cds_service.commands.fhir_client import CliError
    from cds_service.config import Settings

    try:
        url = health_url(args.bind or Settings.from_env().bind)
    except ValueError as err:
        raise CliError(str(err)) from None
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 - our own loopback URL
            ok = resp.status == 200
    except (urllib.error.URLError, OSError) as err:
        print(f"b12-cds healthcheck: {url}: {getattr(err, 'reason', err)}", file=sys.stderr)
        return 1
    return 0 if ok else 1
