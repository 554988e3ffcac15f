"""Slow and idle clients against a running server: does it keep answering everyone else?

`SlowHeaderClients` opens N connections that send a request's headers one byte every
`interval` seconds (a "slowloris": the request never completes), `IdleKeepAliveClients` opens N
connections that complete one request and then sit idle on the kept-alive connection.  While
they are held, `probe()` times `/healthz` and a hook call on fresh connections.

    .venv/bin/python -m bench.slow_clients --url http://127.0.0.1:8080 --slow 64 --seconds 30

The integration test `tests/integration/test_slow_clients.py` uses the same classes against
`b12-cds serve`.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

HOOK_PATH = "/cds-services/b12-neck-pain-patient-view"


class SlowHeaderClients:
    """N connections dripping request headers, one byte per `interval` seconds, never finishing.

    A connection the server closes is reopened (an attacker would), so the pressure stays at N
    for as long as the context is held; `reopened` counts how often that happened.
    """

    HEAD = b"POST " + HOOK_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    def __init__(self, host: str, port: int, count: int, interval: float = 1.0) -> None:
        self.host, self.port, self.count, self.interval = host, port, count, interval
        self.sockets: list[tuple[socket.socket, int]] = []
        self.reopened = 0
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def __enter__(self) -> "SlowHeaderClients":
        for _ in range(self.count):
            self.sockets.append((self._open(), 0))
        self._thread.start()
        return self

    def _drip(self) -> None:
        # The request line and first headers, then an endless header value, a byte at a time.
        payload = self.HEAD + b"X-Slow: " + b"a" * 1_000_000
        while not self._stop.wait(self.interval):
            for i, (sock, sent) in enumerate(self.sockets):
                try:
                    sock.sendall(payload[sent:sent + 1])
                    self.sockets[i] = (sock, sent + 1)
                    self.bytes_sent += 1
                except OSError:
                    sock.close()
                    self.reopened += 1
                    try:
                        self.sockets[i] = (self._open(), 0)
                    except OSError:
                        pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock, _ in self.sockets:
            sock.close()


class IdleKeepAliveClients:
    """N connections that each complete one `GET /healthz` and then stay open, idle."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.host, self.port, self.count = host, port, count
        self.sockets: list[socket.socket] = []
        self.answered = 0

    def __enter__(self) -> "IdleKeepAliveClients":
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(self.count):
            sock = socket.create_connection((self.host, self.port), timeout=10)
            sock.sendall(request)
            self.sockets.append(sock)
        for sock in self.sockets:
            try:
                if sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    self.answered += 1
            except OSError:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.sockets:
            sock.close()


@dataclass
class ProbeResult:
    health_ms: list[float] = field(default_factory=list)
    hook_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def worst_ms(self) -> float:
        return max(self.health_ms + self.hook_ms, default=float("inf"))


def probe(base: str, seconds: float, *, hook_body: bytes, headers: dict[str, str] | None = None,
          every: float = 0.5, timeout: float = 5.0) -> ProbeResult:
    """Every `every` s for `seconds`: GET /healthz and POST a hook call, each on a new connection.

    A probe counts as failed if it errors, times out after `timeout` s or does not answer 200.
    """
    result = ProbeResult()
    end = time.monotonic() + seconds
    hook_headers = {"Content-Type": "application/json", **(headers or {})}
    while time.monotonic() < end:
        started = time.monotonic()
        for kind, call in (("healthz", lambda: requests.get(base + "/healthz", timeout=timeout)),
                           ("hook", lambda: requests.post(base + HOOK_PATH, data=hook_body,
                                                          headers=hook_headers, timeout=timeout))):
            t0 = time.perf_counter()
            try:
                status = call().status_code
            except requests.RequestException as err:
                result.failures.append(f"{kind}: {type(err).__name__}")
                continue
            ms = (time.perf_counter() - t0) * 1000
            (result.health_ms if kind == "healthz" else result.hook_ms).append(ms)
            if status != 200:
                result.failures.append(f"{kind}: HTTP {status}")
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of a running server (auth disabled)")
    parser.add_argument("--slow", type=int, default=64, help="slow-header connections (default 64)")
    parser.add_argument("--idle", type=int, default=0, help="idle keep-alive connections (default 0)")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    from bench.patients import all_patients, hook_body

    body = hook_body(next(p for p in all_patients() if p.size == "small"))
    with SlowHeaderClients(parts.hostname, parts.port, args.slow) as slow, \
            IdleKeepAliveClients(parts.hostname, parts.port, args.idle):
        result = probe(args.url, args.seconds, hook_body=body)
    print(f"slow={args.slow} idle={args.idle} seconds={args.seconds}: probes={len(result.health_ms)}+"
          f"{len(result.hook_ms)} worst={result.worst_ms:.0f} ms failures={len(result.failures)} "
          f"reopened={slow.reopened} {sorted(set(result.failures))[:5]}")
    return 0 if not result.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
