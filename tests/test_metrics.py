"""/metrics counts what operators watch: cards per kind, FHIR fallback calls and failures."""

from __future__ import annotations

import re
from datetime import date

from cds_service.demo_data import demo_resources
from tests.servers import Reply, StubServer, hook_body

PV = "/cds-services/b12-neck-pain-patient-view"


def metric(client, name: str, labels: str = "") -> float:
    text = client.get("/metrics").get_data(as_text=True)
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def searchset(resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def test_cards_issued_are_counted_per_kind(client):
    pid = "demo-metformin-chronic"
    res = demo_resources(pid, date.today())
    prefetch = {"patient": next(r for r in res if r["resourceType"] == "Patient"),
                "conditions": searchset([r for r in res if r["resourceType"] == "Condition"]),
                "medicationRequests": searchset([r for r in res if r["resourceType"] == "MedicationRequest"]),
                **{k: None for k in ("labResults", "findings", "findingValues", "medicationStatements",
                                     "procedures", "serviceRequests")}}
    before = metric(client, "cds_cards_issued_total", '{kind="b12-test"}')
    for _ in range(3):
        assert len(client.post(PV, json=hook_body(patient_id=pid, prefetch=prefetch)).get_json()["cards"]) == 1
    assert metric(client, "cds_cards_issued_total", '{kind="b12-test"}') == before + 3


def test_fhir_fallback_calls_and_failures_are_counted(make_app):
    with StubServer() as stub:
        stub.route("/fhir/Patient/p1", Reply(body={"resourceType": "Patient", "id": "p1"}))
        stub.route("/fhir/Condition", Reply(body=searchset([])))
        # every other search answers 500: a failed key each
        client = make_app(fhir_allowlist=stub.base).test_client()
        calls0 = metric(client, "cds_fhir_fallback_calls_total")
        fails0 = metric(client, "cds_fhir_fallback_failures_total")
        resp = client.post(PV, json=hook_body(fhir_server=stub.base + "/fhir", token="t"))
        assert resp.status_code == 200
    assert metric(client, "cds_fhir_fallback_calls_total") >= calls0 + 9
    assert metric(client, "cds_fhir_fallback_failures_total") == fails0 + 7


def test_hook_requests_and_latency_are_counted_per_service_and_status(client):
    """Each call lands in its own (service, status) series, however calls of different services
    and outcomes interleave."""
    pv, os_ = "b12-neck-pain-patient-view", "b12-neck-pain-order-sign"
    series = [(pv, "412"), (pv, "400"), (os_, "400")]

    def counts() -> list[tuple[float, float]]:
        return [(metric(client, "cds_requests_total", f'{{service="{s}",status="{st}"}}'),
                 metric(client, "cds_request_duration_seconds_count", f'{{service="{s}",status="{st}"}}'))
                for s, st in series]

    before = counts()
    for _ in range(3):
        assert client.post(PV, json=hook_body(prefetch={"patient": None})).status_code == 412
        assert client.post(PV, data=b"{", content_type="application/json").status_code == 400
    assert client.post(f"/cds-services/{os_}", data=b"[", content_type="application/json").status_code == 400
    after = counts()
    assert [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before)] == [(3, 3), (3, 3), (1, 1)]
