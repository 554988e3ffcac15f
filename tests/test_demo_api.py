"""The demo page's JSON helpers (Flask test client): catalog, charts, prefetch, demo tokens.

The browser tests (tests/browser/test_demo_page.py) drive the same endpoints through the page;
these check their contracts directly and fast.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timezone
from typing import Any

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.services import services
from cds_service.demo_data import demo_resources, load_catalog
from cds_service.http.demo import answer_query
from cds_service.record import PREFETCH_KEYS

PATIENT_VIEW = "/cds-services/b12-neck-pain-patient-view"
ORDER_SELECT = "/cds-services/b12-neck-pain-order-select"
CARD_KINDS = {"low-b12", "mma-test", "b12-test"}
CATALOG = load_catalog()


@pytest.fixture
def demo_app(make_app: Callable[..., Flask]) -> Flask:
    """Demo mode with JWT verification ON (the page authenticates like an EHR)."""
    return make_app(demo_mode=True, auth_disabled=False, log_level="WARNING")


@pytest.fixture
def demo(demo_app: Flask) -> FlaskClient:
    return demo_app.test_client()


def mint(client: FlaskClient, path: str) -> str:
    response = client.post("/demo/api/token", json={"path": path})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["token"]


def hook_call(client: FlaskClient, patient_id: str, hook: str = "patient-view", path: str = PATIENT_VIEW,
              **context: Any) -> Any:
    prefetch = client.get(f"/demo/api/patients/{patient_id}/prefetch?hook={hook}").get_json()["prefetch"]
    body = {"hook": hook, "hookInstance": f"test-{patient_id}-{hook}",
            "context": {"userId": "Practitioner/demo-clinician", "patientId": patient_id, **context},
            "prefetch": prefetch}
    return client.post(path, json=body, headers={"Authorization": f"Bearer {mint(client, path)}"})


def issued_by_kind(app: Flask) -> dict[str, int]:
    return {k["kind"]: k["issued"] for k in services(app).store.feedback_report()["kinds"]}


# ---------------------------------------------------------------------------------------------
# Demo mode off / on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", [
    ("GET", "/"),
    ("GET", "/demo/static/demo.js"),
    ("GET", "/demo/api/patients"),
    ("GET", "/demo/api/patients/demo-low-b12/prefetch"),
    ("POST", "/demo/api/token"),
    ("POST", "/demo/api/reset"),
])
def test_demo_routes_do_not_exist_outside_demo_mode(make_app: Callable[..., Flask], method: str,
                                                     path: str) -> None:
    app = make_app(demo_mode=False)
    assert "demo" not in app.blueprints
    response = app.test_client().open(path, method=method, json={"path": PATIENT_VIEW})
    assert response.status_code == 404


def test_page_and_assets_are_served_with_a_self_only_policy(demo: FlaskClient) -> None:
    page = demo.get("/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '<script src="/demo/static/demo.js"' in html
    assert "http://" not in html.replace("http://127.0.0.1", "") and "https://" not in html
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for asset, mimetype in (("demo.js", "text/javascript"), ("demo.css", "text/css"),
                            ("favicon.svg", "image/svg+xml")):
        response = demo.get(f"/demo/static/{asset}")
        assert response.status_code == 200, asset
        assert response.mimetype == mimetype
    # No absolute URL to load from (the JS and SVG name code systems and XML namespaces only;
    # the browser test records every request the page makes).
    assert b"http" not in demo.get("/demo/static/demo.css").data


def test_script_never_assigns_html() -> None:
    from cds_service.http.demo import STATIC_DIR

    script = (STATIC_DIR / "demo.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


# ---------------------------------------------------------------------------------------------
# Patients
# ---------------------------------------------------------------------------------------------


def test_patients_lists_the_catalog_with_charts(demo: FlaskClient) -> None:
    body = demo.get("/demo/api/patients").get_json()
    patients = {p["patientId"]: p for p in body["patients"]}
    assert [p["patientId"] for p in body["patients"]] == [e["patientId"] for e in CATALOG]
    for entry in CATALOG:
        shown = patients[entry["patientId"]]
        assert shown["name"] == entry["name"]
        assert shown["description"] == entry["description"]
        assert shown["expected"] == entry["expected"]
        assert shown["chart"]["patient"]["id"] == entry["patientId"]

    low = patients["demo-low-b12"]["chart"]
    assert [r["value"] for r in low["results"]] == ["150 pg/mL"]
    assert "B12" in low["results"][0]["text"] or "Cobalamin" in low["results"][0]["text"]
    assert any("neck" in p["text"].lower() for p in low["problems"])

    metformin = patients["demo-metformin-chronic"]["chart"]
    assert any("metformin" in m["text"].lower() for m in metformin["medications"])
    assert metformin["results"] == []

    gastrectomy = patients["demo-gastrectomy-procedure"]["chart"]
    assert any("gastrectomy" in p["text"].lower() for p in gastrectomy["procedures"])


def test_unknown_patient_is_404(demo: FlaskClient) -> None:
    response = demo.get("/demo/api/patients/nobody/prefetch?hook=patient-view")
    assert response.status_code == 404
    assert response.get_json()["resourceType"] == "OperationOutcome"


# ---------------------------------------------------------------------------------------------
# Prefetch
# ---------------------------------------------------------------------------------------------


def test_prefetch_answers_every_discovery_key_like_a_fhir_server(demo: FlaskClient) -> None:
    discovery = demo.get("/cds-services").get_json()
    templates = next(s["prefetch"] for s in discovery["services"] if s["hook"] == "patient-view")
    body = demo.get("/demo/api/patients/demo-indeterminate-pmol/prefetch?hook=patient-view").get_json()
    prefetch = body["prefetch"]
    assert set(prefetch) == set(templates) == set(PREFETCH_KEYS)

    assert prefetch["patient"]["resourceType"] == "Patient"
    assert prefetch["patient"]["id"] == "demo-indeterminate-pmol"
    for key in set(PREFETCH_KEYS) - {"patient"}:
        bundle = prefetch[key]
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", key
        assert bundle["total"] == len(bundle.get("entry", [])), key
        for entry in bundle.get("entry", []):
            assert entry["resource"]["subject"]["reference"] == "Patient/demo-indeterminate-pmol"

    everything = demo_resources("demo-indeterminate-pmol", date.today())
    conditions = [r for r in everything if r["resourceType"] == "Condition"]
    assert prefetch["conditions"]["total"] == len(conditions)
    # The B12 result is a lab result; the diet Observation is found by its value (value-concept).
    labs = [e["resource"] for e in prefetch["labResults"]["entry"]]
    assert {c["code"] for r in labs for c in r["code"]["coding"]} & {"2132-9", "14685-2"}
    diet = [e["resource"] for e in prefetch["findingValues"]["entry"]]
    assert len(diet) == 1 and "valueCodeableConcept" in diet[0]
    assert prefetch["findings"]["total"] == 0
    assert body["queries"]["patient"] == "Patient/demo-indeterminate-pmol"


def test_prefetch_service_requests_are_filtered_by_code_and_status(demo: FlaskClient) -> None:
    prefetch = demo.get("/demo/api/patients/demo-pending-order/prefetch").get_json()["prefetch"]
    orders = [e["resource"] for e in prefetch["serviceRequests"]["entry"]]
    assert orders and all(o["status"] in ("active", "on-hold") for o in orders)


def test_prefetch_for_order_hooks_and_bad_hooks(demo: FlaskClient) -> None:
    body = demo.get("/demo/api/patients/demo-low-b12/prefetch?hook=order-select").get_json()
    assert set(body["prefetch"]) == set(PREFETCH_KEYS)
    response = demo.get("/demo/api/patients/demo-low-b12/prefetch?hook=encounter-start")
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["hook"]


OBS = [
    {"resourceType": "Observation", "id": "a", "status": "final", "subject": {"reference": "Patient/p"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}, "effectiveDateTime": "2024-01-01"},
    {"resourceType": "Observation", "id": "b", "status": "final", "subject": {"reference": "Patient/p"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}, "effectiveDateTime": "2024-06-01"},
    {"resourceType": "Observation", "id": "c", "status": "final", "subject": {"reference": "Patient/p"},
     "code": {"coding": [{"system": "http://example.org/a,b|c", "code": "x"}]}},
    {"resourceType": "Observation", "id": "d", "status": "final", "subject": {"reference": "Patient/other"},
     "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}},
    {"resourceType": "Patient", "id": "p"},
]


def ids(answer: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in answer.get("entry", [])]


def test_answer_query_follows_fhir_search_semantics() -> None:
    assert answer_query("Patient/p", OBS, "p") == {"resourceType": "Patient", "id": "p"}
    assert answer_query("Patient/q", OBS, "p") is None
    # patient filter, token with system, newest first
    found = answer_query("Observation?patient=p&code=http://loinc.org|2132-9&_sort=-date&_count=5", OBS, "p")
    assert ids(found) == ["b", "a"] and found["total"] == 2
    # a code without a system matches any system; an escaped system with , and | matches exactly
    assert ids(answer_query("Observation?patient=p&code=x", OBS, "p")) == ["c"]
    assert ids(answer_query(r"Observation?patient=p&code=http://example.org/a\,b\|c|x", OBS, "p")) == ["c"]
    assert ids(answer_query("Observation?patient=p&code=http://other|2132-9,http://loinc.org|nope", OBS, "p")) == []
    empty = answer_query("Condition?patient=p", OBS, "p")
    assert empty == {"resourceType": "Bundle", "type": "searchset", "total": 0}
    assert ids(answer_query("Observation?patient=p&status=amended,final", OBS, "p")) == ["a", "b", "c"]
    assert ids(answer_query("Observation?patient=p&status=preliminary", OBS, "p")) == []


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def test_token_is_a_demo_issuer_jwt_for_the_full_url(demo: FlaskClient) -> None:
    body = demo.post("/demo/api/token", json={"path": PATIENT_VIEW}).get_json()
    assert body["audience"] == "http://localhost" + PATIENT_VIEW
    header = jwt.get_unverified_header(body["token"])
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert header["alg"] == "ES384" and header["typ"] == "JWT" and header["kid"]
    assert claims["aud"] == "http://localhost" + PATIENT_VIEW
    assert claims["iss"] == "urn:b12-neck-cds:demo-ehr"
    assert claims["exp"] - claims["iat"] <= 300 and claims["jti"]


def test_token_uses_the_public_base_url(make_app: Callable[..., Flask]) -> None:
    app = make_app(demo_mode=True, auth_disabled=False, public_base_url="https://cds.example.org/b12")
    body = app.test_client().post("/demo/api/token", json={"path": PATIENT_VIEW}).get_json()
    assert body["audience"] == "https://cds.example.org/b12" + PATIENT_VIEW


@pytest.mark.parametrize("body", [
    {"path": "https://evil.example/cds-services/x"},
    {"path": "/cds-services/../admin"},
    {"path": "/metrics"},
    {"path": "/cds-services/x?y=1"},
    {"path": 5},
    {},
])
def test_token_only_for_service_paths(demo: FlaskClient, body: dict[str, Any]) -> None:
    response = demo.post("/demo/api/token", json=body)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == ["path"]


def test_token_refused_to_other_origins(demo: FlaskClient) -> None:
    response = demo.post("/demo/api/token", json={"path": PATIENT_VIEW},
                         headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    same = demo.post("/demo/api/token", json={"path": PATIENT_VIEW}, headers={"Origin": "http://localhost"})
    assert same.status_code == 200


def test_token_is_accepted_once_and_only_for_its_url(demo: FlaskClient) -> None:
    prefetch = demo.get("/demo/api/patients/demo-low-b12/prefetch").get_json()["prefetch"]
    body = {"hook": "patient-view", "hookInstance": "t1",
            "context": {"userId": "Practitioner/demo-clinician", "patientId": "demo-low-b12"},
            "prefetch": prefetch}
    assert demo.post(PATIENT_VIEW, json=body).status_code == 401  # no token at all
    wrong = mint(demo, ORDER_SELECT)
    assert demo.post(PATIENT_VIEW, json=body, headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    token = mint(demo, PATIENT_VIEW)
    assert demo.post(PATIENT_VIEW, json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert demo.post(PATIENT_VIEW, json=body, headers={"Authorization": f"Bearer {token}"}).status_code == 401


# ---------------------------------------------------------------------------------------------
# The page's whole loop, without a browser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CATALOG, ids=[e["patientId"] for e in CATALOG])
def test_each_demo_patient_gets_its_expected_outcome(demo_app: Flask, demo: FlaskClient,
                                                     entry: dict[str, str]) -> None:
    response = hook_call(demo, entry["patientId"])
    assert response.status_code == 200, response.get_json()
    cards = response.get_json()["cards"]
    if entry["expected"] in CARD_KINDS:
        assert len(cards) == 1
        assert issued_by_kind(demo_app) == {entry["expected"]: 1}
    else:
        assert cards == []
        assert issued_by_kind(demo_app) == {}


def test_order_select_with_draft_orders(demo_app: Flask, demo: FlaskClient) -> None:
    def draft(resource: dict[str, Any]) -> dict[str, Any]:
        return {"selections": [f"{resource['resourceType']}/{resource['id']}"],
                "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": resource}]}}

    subject = {"reference": "Patient/demo-metformin-chronic"}
    naproxen = {"resourceType": "MedicationRequest", "id": "d1", "status": "draft", "intent": "order",
                "subject": subject, "medicationCodeableConcept": {"text": "Naproxen 500 mg tablet"}}
    b12 = {"resourceType": "ServiceRequest", "id": "d2", "status": "draft", "intent": "order", "subject": subject,
           "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}}
    with_med = hook_call(demo, "demo-metformin-chronic", "order-select", ORDER_SELECT, **draft(naproxen))
    assert with_med.status_code == 200 and len(with_med.get_json()["cards"]) == 1
    with_test = hook_call(demo, "demo-metformin-chronic", "order-select", ORDER_SELECT, **draft(b12))
    assert with_test.status_code == 200 and with_test.get_json()["cards"] == []


def test_feedback_and_report_with_demo_tokens(demo_app: Flask, demo: FlaskClient) -> None:
    card = hook_call(demo, "demo-metformin-chronic").get_json()["cards"][0]
    feedback_path = PATIENT_VIEW + "/feedback"
    body = {"feedback": [{"card": card["uuid"], "outcome": "accepted",
                          "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
                          "outcomeTimestamp": "2025-01-01T10:00:00.000Z"}]}
    posted = demo.post(feedback_path, json=body, headers={"Authorization": f"Bearer {mint(demo, feedback_path)}"})
    assert posted.status_code == 200
    report = demo.get("/admin/feedback-report",
                      headers={"Authorization": f"Bearer {mint(demo, '/admin/feedback-report')}"}).get_json()
    assert {k["kind"]: k["accepted"] for k in report["kinds"]} == {"b12-test": 1}


def test_reset_forgets_the_demo_patients_suppressions(demo_app: Flask, demo: FlaskClient) -> None:
    """Feedback suppresses the card kind for the patient; the page's reset (called when it loads)
    makes the demo patient show its catalog card again, and keeps the feedback."""
    card = hook_call(demo, "demo-low-b12").get_json()["cards"][0]
    feedback_path = PATIENT_VIEW + "/feedback"
    entry = {"card": card["uuid"], "outcome": "overridden",
             "outcomeTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "overrideReason": {"reason": card["overrideReasons"][0]}}
    assert demo.post(feedback_path, json={"feedback": [entry]},
                     headers={"Authorization": f"Bearer {mint(demo, feedback_path)}"}).status_code == 200
    assert hook_call(demo, "demo-low-b12").get_json()["cards"] == []
    assert demo.post("/demo/api/reset", headers={"Origin": "https://elsewhere.example"}).status_code == 403
    reset = demo.post("/demo/api/reset", json={})
    assert reset.status_code == 200 and reset.get_json() == {"cleared": 1}
    assert len(hook_call(demo, "demo-low-b12").get_json()["cards"]) == 1
    assert len(services(demo_app).store.feedback_rows()) == 1
