"""Part 3: fallback mode: no prefetch; every key is fetched from a local FHIR stub server (its
own process, on 127.0.0.1) that answers each query after `delay` seconds.  Total hook time vs.
one query's time.

The stub answers each search in ONE page (it ignores `_count`): paging is serial by nature and
would measure the page count, not the parallelism of the fetches.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import requests

from bench.common import HOOK_PATH, card_problems, normalise_cards, percentile
from bench.inproc import BenchError, make_service_app
from bench.patients import Patient, hook_body

EMPTY_BUNDLE = {"resourceType": "Bundle", "type": "searchset", "total": 0}


def _route(patient_id: str, path: str, query: dict[str, list[str]]) -> str | None:
    """The prefetch key a FHIR query answers (None: not found)."""
    parts = [p for p in path.split("/") if p]
    rtype = parts[1] if len(parts) > 1 else ""
    if rtype == "Patient" and len(parts) == 3:
        return "patient" if parts[2] == patient_id else None
    if rtype == "Observation":
        return "findingValues" if "value-concept" in query else "labResults" if "_sort" in query else "findings"
    return {"Condition": "conditions", "MedicationRequest": "medicationRequests",
            "MedicationStatement": "medicationStatements", "Procedure": "procedures",
            "ServiceRequest": "serviceRequests"}.get(rtype)


class _StubServer:
    """The stub's HTTP server (run in its own process by `FhirStub`): one patient's prefetch
    answered per FHIR query after `delay` seconds; `GET /__requests` answers the count so far."""

    def __init__(self, patient: Patient, delay: float) -> None:
        answers = {key: orjson.dumps(value or EMPTY_BUNDLE) for key, value in patient.prefetch.items()}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/__requests":
                    with stub.lock:
                        payload = str(stub.requests).encode()
                    self.send_response(200)
                else:
                    time.sleep(delay)
                    parts = urlsplit(self.path)
                    with stub.lock:
                        stub.requests += 1
                    key = _route(patient.patient_id, parts.path, parse_qs(parts.query))
                    if key is None:
                        self.send_response(404)
                        payload = b'{"resourceType": "OperationOutcome", "issue": []}'
                    else:
                        self.send_response(200)
                        payload = answers[key]
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True


def _serve_stub(size: str, delay: float) -> None:
    """Child process: serve the stub for benchmark patient `size`; print the port, then serve
    until stdin closes (the parent ended)."""
    from bench.patients import SIZES, make_patient

    patient = make_patient(*next(spec for spec in SIZES if spec[0] == size))
    stub = _StubServer(patient, delay)
    threading.Thread(target=stub.server.serve_forever, daemon=True).start()
    print(stub.server.server_address[1], flush=True)
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    stub.server.shutdown()


class FhirStub:
    """A FHIR server on 127.0.0.1 serving one benchmark patient, each answer after `delay`
    seconds, in its own process: a FHIR server never shares the service's interpreter (in the
    same process its request parsing competed with the fetch threads for the GIL, and that
    was measured as the service's fetch stagger)."""

    def __init__(self, patient: Patient, delay: float) -> None:
        self.patient = patient
        self.delay = delay
        self._proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> "FhirStub":
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fallback", "--serve", self.patient.size, str(self.delay)],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        port = self._proc.stdout.readline().strip()
        if not port.isdigit():
            self.__exit__()
            raise BenchError("fallback: the FHIR stub process did not start")
        self.url = f"http://127.0.0.1:{port}/fhir"
        return self

    @property
    def requests(self) -> int:
        """FHIR queries the stub has answered so far."""
        return int(requests.get(self.url.rsplit("/fhir", 1)[0] + "/__requests", timeout=10).text)

    def __exit__(self, *exc: Any) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()


@dataclass
class FallbackRow:
    delay_ms: float
    calls: int
    queries_per_hook: float
    hook_p50_ms: float
    hook_p99_ms: float
    single_p50_ms: float
    same_cards_as_prefetch: bool

    @property
    def ratio(self) -> float:
        return self.hook_p50_ms / self.single_p50_ms


def run_fallback(patient: Patient, expected_cards: bytes | None, *, delay: float = 0.05,
                 calls: int = 20) -> FallbackRow:
    with FhirStub(patient, delay) as stub, tempfile.TemporaryDirectory(prefix="b12-bench-fb-") as tmp:
        app = make_service_app(tmp, fhir_allowlist=stub.url)
        client = app.test_client()
        raw = (hook_body(patient, hook_instance="bench-fallback", with_prefetch=False,
                                     fhir_server=stub.url))
        resp = client.post(HOOK_PATH, data=raw, content_type="application/json", buffered=True)
        if resp.status_code != 200 or card_problems(resp.get_data()):
            raise BenchError(f"fallback: status {resp.status_code}, {card_problems(resp.get_data())}")
        same = expected_cards is None or normalise_cards(resp.get_data()) == expected_cards
        before = stub.requests
        hook_ms = []
        for _ in range(calls):
            t0 = time.perf_counter()
            resp = client.post(HOOK_PATH, data=raw, content_type="application/json", buffered=True)
            hook_ms.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                raise BenchError(f"fallback: status {resp.status_code} during timing")
        per_hook = (stub.requests - before) / calls
        single_ms = []
        with requests.Session() as session:
            url = f"{stub.url}/Condition?patient={patient.patient_id}&_count=100"
            session.get(url, timeout=10).content  # noqa: B018 - connect once (the service pools too)
            for _ in range(calls):
                t0 = time.perf_counter()
                session.get(url, headers={"Accept": "application/fhir+json"}, timeout=10).content  # noqa: B018
                single_ms.append((time.perf_counter() - t0) * 1000)
    return FallbackRow(delay_ms=delay * 1000, calls=calls, queries_per_hook=per_hook,
                       hook_p50_ms=percentile(hook_ms, 0.5), hook_p99_ms=percentile(hook_ms, 0.99),
                       single_p50_ms=percentile(single_ms, 0.5), same_cards_as_prefetch=same)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        _serve_stub(sys.argv[2], float(sys.argv[3]))
