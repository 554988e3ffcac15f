"""Arbitrary FHIR-shaped junk in prefetch and draftOrders never makes the hook answer 5xx."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cds_service import create_app
from cds_service.record import PREFETCH_KEYS

_DATA = tempfile.TemporaryDirectory(prefix="cds-hookfuzz-")
APP = create_app({"auth_disabled": True, "data_dir": _DATA.name})

TYPES = st.sampled_from(["Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement",
                         "Procedure", "ServiceRequest", "Bundle", "OperationOutcome", "Medication", "Junk"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["p1", "Patient/p1", "2024-01-01", "final",
                                                           "active", "http://loinc.org", "2132-9",
                                                           "http://snomed.info/sct", "81680005", "M54.2"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["code", "coding", "system", "value", "valueQuantity", "unit",
                                     "subject", "reference", "status", "clinicalStatus", "onsetDateTime",
                                     "effectiveDateTime", "birthDate", "medicationCodeableConcept",
                                     "valueCodeableConcept", "text", "display", "id", "entry", "resource",
                                     "verificationStatus", "intent"]), inner, max_size=5)), max_leaves=12)
resources = st.builds(lambda t, body: {**body, "resourceType": t}, st.one_of(TYPES, json_values),
                      st.dictionaries(st.text(max_size=8), json_values, max_size=4))
bundles = st.builds(lambda entries: {"resourceType": "Bundle", "type": "searchset",
                                     "entry": [{"resource": r} for r in entries]}, st.lists(resources, max_size=4))
prefetch = st.dictionaries(st.sampled_from(PREFETCH_KEYS), st.one_of(st.none(), resources, bundles))


@given(prefetch=prefetch, draft=st.lists(resources, max_size=3),
       hook=st.sampled_from(["patient-view", "order-sign", "order-select"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_fhir_never_gives_a_server_error(prefetch, draft, hook):
    context = {"userId": "Practitioner/1", "patientId": "p1"}
    if hook != "patient-view":
        context["draftOrders"] = {"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": r} for r in draft]}
    if hook == "order-select":
        context["selections"] = ["ServiceRequest/1"]
    body = {"hook": hook, "hookInstance": "fuzz", "context": context,
            "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}, "conditions": None, **prefetch}}
    resp = APP.test_client().post(f"/cds-services/b12-neck-pain-{hook}", json=body)
    assert resp.status_code in (200, 400, 412), resp.get_data(as_text=True)[:300]
    if resp.status_code == 200:
        assert isinstance(resp.get_json()["cards"], list)
    else:
        assert resp.get_json()["resourceType"] == "OperationOutcome"
