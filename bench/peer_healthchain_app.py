"""The peer: a HealthChain CDS Hooks service, declared the way HealthChain documents it.

Runs inside its own virtual environment (HealthChain pins fhir.resources < 8.2, this project
needs >= 8.3), created by `bench/peer.py`.  It reads request bodies written by the benchmark,
times them in process with Starlette's TestClient (FastAPI's documented test client; no server,
so uvicorn's keep-alive latency bug, uvicorn issue 3149, cannot skew the comparison), and prints
one JSON object with the timings on stdout.

The handler does what a HealthChain CDS service does with prefetch: `CdsFhirAdapter().parse()`
turns every prefetched resource into a fhir.resources model (HealthChain's documented way to read
prefetch), then answers `{"cards": []}`.  It applies no clinical logic, so the peer's time is a
lower bound for a HealthChain service that did this project's work.

    <peer-venv>/bin/python bench/peer_healthchain_app.py BODY_FILE:ITERATIONS ...
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

warnings.simplefilter("ignore")  # deprecation notices of the peer's own dependencies

from fastapi.testclient import TestClient
from healthchain.gateway import CDSHooksService, HealthChainAPI
from healthchain.io import CdsFhirAdapter
from healthchain.models import CDSRequest, CDSResponse

SERVICE_ID = "b12-neck-pain-patient-view"
HOOK_PATH = f"/cds/cds-services/{SERVICE_ID}"
"""CDSHooksConfig defaults: base_path "/cds", service_path "/cds-services"."""


def build_app() -> HealthChainAPI:
    app = HealthChainAPI(title="peer")
    cds = CDSHooksService()
    adapter = CdsFhirAdapter()

    @cds.hook("patient-view", id=SERVICE_ID)
    def patient_view(request: CDSRequest) -> CDSResponse:
        document = adapter.parse(request)
        # Touch the parsed resources so the parse cannot be optimised away by laziness.
        _ = len(document.fhir.prefetch_resources)
        return CDSResponse(cards=[])

    app.register_service(cds)
    return app


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main(argv: list[str]) -> int:
    logging.disable(logging.WARNING)  # HealthChain logs per request; the service's logs go to /dev/null too
    client = TestClient(build_app())
    path = HOOK_PATH
    results = []
    for arg in argv:
        body_file, _, n = arg.rpartition(":")
        with open(body_file, "rb") as fh:
            raw = fh.read()
        headers = {"content-type": "application/json"}
        first = client.post(path, content=raw, headers=headers)
        if first.status_code != 200:
            print(json.dumps({"error": f"peer answered {first.status_code}: {first.text[:300]}"}))
            return 1
        for _ in range(5):  # warm-up
            client.post(path, content=raw, headers=headers)
        samples = []
        for _ in range(int(n)):
            t0 = time.perf_counter()
            resp = client.post(path, content=raw, headers=headers)
            samples.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200:
                print(json.dumps({"error": f"peer answered {resp.status_code}"}))
                return 1
        results.append({"body": body_file, "calls": len(samples), "p50_ms": _percentile(samples, 0.5),
                        "p99_ms": _percentile(samples, 0.99)})
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
