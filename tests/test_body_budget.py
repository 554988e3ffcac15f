"""The body budget of the whole-request front (cds_service.asgi): a worker holds at most
`CDS_BODY_BUDGET_BYTES` of request bodies at once; a request past it waits, in arrival order,
and after `CDS_BODY_BUDGET_WAIT` seconds gets a 503 JSON OperationOutcome with Retry-After and
CORS, written by the front itself (the app's threads are what is busy)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
import pytest

from cds_service.asgi import BUSY_RETRY_AFTER_SECONDS, BodyBudget, WholeRequestFront
from cds_service.config import Settings


def run(coro):
    return asyncio.run(coro)


# --- BodyBudget ---------------------------------------------------------------------------

def test_requests_that_fit_are_admitted_at_once():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(60, timeout=0.01)
        assert await budget.reserve(40, timeout=0.01)
        assert budget.in_use == 100
        budget.release(60)
        budget.release(40)
        assert budget.in_use == 0
    run(scenario())


def test_a_request_past_the_budget_waits_for_room_then_is_admitted():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(80, timeout=0.01)
        waiter = asyncio.create_task(budget.reserve(50, timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done() and budget.in_use == 80  # waiting, holding nothing
        budget.release(80)
        assert await waiter is True
        assert budget.in_use == 50
    run(scenario())


def test_no_room_within_the_wait_is_refused_and_holds_nothing():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(80, timeout=0.01)
        assert await budget.reserve(50, timeout=0.05) is False
        assert budget.in_use == 80
        budget.release(80)
        assert budget.in_use == 0
        assert await budget.reserve(100, timeout=0.01)  # nothing left behind in the queue
    run(scenario())


def test_arrival_order_a_large_request_is_not_overtaken_by_small_ones():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(70, timeout=0.01)
        large = asyncio.create_task(budget.reserve(60, timeout=5))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(budget.reserve(10, timeout=5))  # would fit, but comes later
        await asyncio.sleep(0.05)
        assert not large.done() and not small.done()
        budget.release(70)
        assert await large and await small
        assert budget.in_use == 70
    run(scenario())


def test_a_refused_request_at_the_head_lets_the_ones_behind_it_in():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(70, timeout=0.01)
        large = asyncio.create_task(budget.reserve(60, timeout=0.05))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(budget.reserve(20, timeout=5))
        assert await large is False
        assert await small is True  # admitted as soon as the large one gave up
        assert budget.in_use == 90
    run(scenario())


def test_a_body_larger_than_the_budget_is_admitted_alone():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(250, timeout=0.01)  # nothing else in flight
        assert await budget.reserve(1, timeout=0.05) is False
        budget.release(250)
        assert await budget.reserve(250, timeout=0.01)
    run(scenario())


def test_requests_without_a_body_never_wait():
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(100, timeout=0.01)
        blocked = asyncio.create_task(budget.reserve(50, timeout=5))
        await asyncio.sleep(0.01)
        assert await budget.reserve(0, timeout=0.01)  # /healthz, discovery: no body to hold
        assert budget.in_use == 100
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert budget.in_use == 100 and not budget._waiting  # a cancelled waiter leaves nothing
    run(scenario())


def test_a_wait_that_ended_while_room_was_made_is_skipped_not_admitted():
    """wait_for cancels a timed-out wait and yields before the waiter sees it: a release in
    between must pass it by (it must neither fail nor be charged) and admit the next one."""
    async def scenario():
        budget = BodyBudget(100)
        assert await budget.reserve(90, timeout=0.01)
        ended = asyncio.get_running_loop().create_future()
        ended.cancel()
        budget._waiting.append((50, ended))
        nxt = asyncio.create_task(budget.reserve(30, timeout=5))
        await asyncio.sleep(0.01)
        budget.release(90)
        assert await nxt is True
        assert budget.in_use == 30 and not budget._waiting
    run(scenario())


# --- settings -----------------------------------------------------------------------------

def test_default_budget_is_two_bodies_at_the_limit_and_a_setting_overrides_it():
    settings = Settings.from_env(environ={})
    assert settings.body_budget_bytes == 0
    assert settings.body_budget_for(4) == 2 * settings.max_body_bytes
    assert settings.body_budget_for(1) == settings.max_body_bytes
    custom = Settings.from_env(environ={"CDS_BODY_BUDGET_BYTES": "1000000", "CDS_MAX_BODY_BYTES": "2000"})
    assert custom.body_budget_for(4) == 1_000_000


def test_default_body_limit_fits_a_10000_resource_ehr_shaped_prefetch():
    from bench.memory import ehr_shaped_body

    body, _, count = ehr_shaped_body(2000)
    assert count == 2000
    per_resource = len(body) / count
    assert 10_000 * per_resource * 1.5 < Settings.from_env(environ={}).max_body_bytes


# --- the front ------------------------------------------------------------------------------

class GatedApp:
    """A WSGI app that holds every POST until released, so bodies stay in flight."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.bodies: list[int] = []
        self.front_errors: list[str | None] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            body = environ["wsgi.input"].read()
            self.bodies.append(len(body))
            self.front_errors.append(environ.get("HTTP_X_CDS_FRONT_ERROR"))
            self.entered.release()
            self.gate.wait(10)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"cards": []}']


def scope(path: str, body_length: int | None, method: str = "POST", origin: str | None = None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if body_length is not None:
        headers.append((b"content-length", str(body_length).encode()))
    if origin:
        headers.append((b"origin", origin.encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8080)}


async def call(front: WholeRequestFront, sc: dict, body: bytes) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []
    chunks = [body]

    async def receive() -> dict:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await asyncio.sleep(3600)  # no disconnect in these tests
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await front(sc, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, payload


def test_front_admits_waits_and_refuses_by_body_bytes():
    app = GatedApp()
    settings = Settings.from_env({"body_budget_bytes": 1000, "body_budget_wait": 0.3,
                                  "cors_origins": "https://ehr.example.org"}, environ={})
    front = WholeRequestFront(app, settings, threads=4)

    async def scenario():
        first = asyncio.create_task(call(front, scope("/cds-services/x", 700), b"a" * 700))
        await asyncio.to_thread(app.entered.acquire, True, 5)
        assert front.budget.in_use == 700
        # 700 + 400 > 1000: waits, then 503 from the front (the app never sees it).
        status, headers, payload = await call(
            front, scope("/cds-services/x", 400, origin="https://ehr.example.org"), b"b" * 400)
        assert status == 503
        assert headers["retry-after"] == str(BUSY_RETRY_AFTER_SECONDS)
        assert headers["access-control-allow-origin"] == "https://ehr.example.org"
        assert headers["content-type"] == "application/json"
        assert headers["cache-control"] == "no-store"
        outcome = orjson.loads(payload)
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "throttled"
        assert app.bodies == [700]
        # A request without a body is not held up by the full budget.
        health = await asyncio.wait_for(call(front, scope("/healthz", None, method="GET"), b""), 5)
        assert health[0] == 200
        # One that waits and gets in once the first is answered.
        waiting = asyncio.create_task(call(front, scope("/cds-services/x", 400), b"c" * 400))
        await asyncio.sleep(0.1)
        assert not waiting.done() and app.bodies == [700]
        app.gate.set()
        assert (await first)[0] == 200
        assert (await asyncio.wait_for(waiting, 5))[0] == 200
        assert app.bodies == [700, 400]
        assert front.budget.in_use == 0  # everything given back

    run(scenario())


def test_a_chunked_body_holds_the_limit_until_read_then_its_size():
    app = GatedApp()
    settings = Settings.from_env({"body_budget_bytes": 10_000, "max_body_bytes": 4000}, environ={})
    front = WholeRequestFront(app, settings, threads=4)

    async def scenario():
        sc = scope("/cds-services/x", None)
        sc["headers"].append((b"transfer-encoding", b"chunked"))
        task = asyncio.create_task(call(front, sc, b"z" * 300))
        await asyncio.to_thread(app.entered.acquire, True, 5)
        assert front.budget.in_use == 300  # the unused part of the reservation was given back
        app.gate.set()
        assert (await task)[0] == 200
        assert front.budget.in_use == 0

    run(scenario())


def test_a_refused_body_gives_its_reservation_back():
    app = GatedApp()
    settings = Settings.from_env({"body_budget_bytes": 10_000, "max_body_bytes": 4000}, environ={})
    front = WholeRequestFront(app, settings, threads=4)

    async def scenario():
        sc = scope("/cds-services/x", None)
        sc["headers"].append((b"transfer-encoding", b"chunked"))
        app.gate.set()
        await call(front, sc, b"z" * 5000)  # over the limit: handed over empty, marked 413
        assert app.bodies == [0] and app.front_errors == ["413"]
        assert front.budget.in_use == 0

    run(scenario())


def test_while_the_app_runs_the_front_holds_no_second_copy_of_the_body():
    import gc
    import tracemalloc

    size = 8 * 1024 * 1024
    held: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raw = environ["wsgi.input"].read()
        assert len(raw) == size
        gc.collect()
        held.append(tracemalloc.get_traced_memory()[0])
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    front = WholeRequestFront(app, Settings.from_env(environ={}), threads=1)

    async def scenario():
        left = [size]

        async def receive() -> dict:
            if left[0] > 0:  # the body arrives in 64 KiB chunks, as gunicorn delivers it
                n = min(65536, left[0])
                left[0] -= n
                return {"type": "http.request", "body": b"x" * n, "more_body": left[0] > 0}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            pass

        await front(scope("/cds-services/x", size), receive, send)

    tracemalloc.start()
    try:
        run(scenario())
    finally:
        tracemalloc.stop()
    assert held and held[0] < 1.5 * size  # the app's copy only (the front's was 2x)
