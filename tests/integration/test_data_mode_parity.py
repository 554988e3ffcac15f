"""Prefetch and FHIR-server fallback give the same decision, for generated EHR-shaped patients.

Hypothesis (derandomized, a bounded number of examples) draws patients the way EHR feeds send
them (tests/ehr_shapes.py), stores each in a real FHIR server (sekmet-fhir, strict R4
validation), and compares the decision (card kind, reason, indicator) of the same engine for:

(a) a prefetch built from the discovery templates, run against the server as an EHR would;
(b) a prefetch holding *all* of the patient's resources: every key's Bundle carries every resource
    of its type, Medications included (an EHR that sends more than it was asked for);
(c) no prefetch: the service fetches everything from `fhirServer`.

(a) and (c) must also gather the very same record: the two modes ask for the same data.  (b) may
legitimately hold more resources than were asked for; the decision must still be the same,
because the searches ask for everything the matcher reads (docs/rules.md, "Patient data").
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service.commands.seed import post_transaction
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.patient_data import SEARCHES, PatientDataGatherer, render_template
from cds_service.protocol import parse_hook_request
from cds_service.rules import Decision
from tests import ehr_shapes
from tests.servers import hook_body, http_ok, sekmet_server

pytestmark = pytest.mark.integration

NOW = datetime.combine(ehr_shapes.TODAY, datetime.min.time(), timezone.utc).replace(hour=10)
EXAMPLES = 60
HOOK = "patient-view"
_ids = itertools.count(1)


class Modes:
    """The engine and gatherer of one deployment allowed to call the test FHIR server."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.settings = Settings.from_env({"fhir_allowlist": base, "fhir_deadline": 10.0}, environ={})
        self.engine = ClinicalEngine.load(self.settings)
        self.gatherer = PatientDataGatherer(self.settings)
        self.templates = self.gatherer.prefetch_templates(HOOK, self.engine)

    def body(self, pid: str, prefetch: dict[str, Any] | None) -> dict[str, Any]:
        return hook_body(hook=HOOK, patient_id=pid, fhir_server=self.base, token="parity-token", prefetch=prefetch)

    def run(self, pid: str, prefetch: dict[str, Any] | None) -> tuple[Decision, Any]:
        request = parse_hook_request(self.body(pid, prefetch), HOOK)
        gathered = self.gatherer.gather(request, self.templates)
        assert gathered.failed_keys == (), gathered.failed_keys
        return self.engine.evaluate(gathered.record, request, now=NOW).decision, gathered

    def template_prefetch(self, pid: str) -> dict[str, Any]:
        """(a): every template run against the server, as an EHR satisfying them would."""
        out: dict[str, Any] = {}
        for key, template in self.templates.items():
            resp = requests.get(f"{self.base}/{render_template(template, {'context.patientId': pid})}",
                                headers={"Accept": "application/fhir+json"}, timeout=10)
            assert resp.status_code == 200, (key, resp.status_code)
            out[key] = resp.json()
        return out

    @staticmethod
    def everything_prefetch(resources: list[dict[str, Any]]) -> dict[str, Any]:
        """(b): per key, every resource of its type; Medications next to the requests."""
        def bundle(*types: str) -> dict[str, Any]:
            return {"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": r} for r in resources if r["resourceType"] in types]}
        out: dict[str, Any] = {"patient": resources[0]}
        for key, spec in SEARCHES.items():
            extra = ("Medication",) if spec.resource_type.startswith("Medication") else ()
            out[key] = bundle(spec.resource_type, *extra)
        return out


@pytest.fixture(scope="module")
def modes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modes]:
    """A sekmet FHIR server (strict R4 validation) and the service's engine and gatherer."""
    server, base = sekmet_server(tmp_path_factory.mktemp("sekmet-parity"))
    with server.start(http_ok(f"{base}/metadata"), timeout=60):
        m = Modes(base)
        yield m
        m.gatherer.close()


def summary(decision: Decision) -> tuple[str | None, str, str | None]:
    return decision.kind, decision.reason, decision.indicator


def test_prefetch_and_fallback_decide_alike_for_generated_patients(modes: Modes) -> None:
    seen: Counter[tuple[str | None, str, str | None]] = Counter()
    by_reference = 0

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        nonlocal by_reference
        pid = f"parity-{next(_ids)}"
        resources = data.draw(ehr_shapes.patients(pid), label="patient")
        post_transaction(modes.base, ehr_shapes.transaction(resources))

        fallback, fetched = modes.run(pid, None)                           # (c)
        templated, given_ = modes.run(pid, modes.template_prefetch(pid))   # (a)
        everything, _ = modes.run(pid, modes.everything_prefetch(resources))  # (b)

        assert given_.record == fetched.record, "the two modes gathered different data"
        assert summary(templated) == summary(fallback)
        assert summary(everything) == summary(fallback), (
            "a prefetch holding all resources decides otherwise than the fallback: "
            "a search misses something the matcher reads")
        seen[summary(fallback)] += 1
        if fetched.record.medications:
            by_reference += 1

    check()
    # Not vacuous: the generated patients reach many different decisions, and referenced
    # Medications were really fetched.
    assert len({reason for _, reason, _ in seen}) >= 4, seen
    assert any(kind for kind, _, _ in seen), seen
    assert by_reference > 0
    print(f"\n{sum(seen.values())} generated patients: {dict(seen)}; with Medication by reference: {by_reference}")
