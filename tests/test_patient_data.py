"""Prefetch templates, token rendering, prefetch semantics and outbound safety of patient_data."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest

from cds_service import wire
from cds_service.config import Settings
from cds_service.patient_data import (
    KNOWN_RESOURCE_TYPES,
    PatientDataGatherer,
    TemplateError,
    build_prefetch_templates,
    render_template,
    url_allowed,
)
from cds_service.protocol import CdsError, parse_hook_request
from cds_service.record import PREFETCH_KEYS
from tests.servers import Reply, StubServer, hook_body, resource, searchset

LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"
VALUESETS = {
    "b12-lab": [(LOINC, "2132-9"), (LOINC, "14685-2")],
    "mma-lab": [(LOINC, "13964-8")],
    "neuropathic-features": [(SCT, "44077006"), (SCT, "91019004")],
    "vegan-vegetarian-diet": [(SCT, "160670007"), (SCT, "224488000")],
    "active-b12-lab": [(LOINC, "72160-5")],
    "pregnancy": [(SCT, "77386006"), (LOINC, "LA15173-0")],
    "pregnancy-ended": [(SCT, "60001007")],
}
TOKEN = "s3cr3t-access-token"


def valueset_codes(name: str) -> list[tuple[str, str]]:
    return VALUESETS.get(name, [])  # the other value sets the matcher reads: empty here


TEMPLATES = build_prefetch_templates(valueset_codes)


class FakeEngine:
    calls = 0

    def valueset_codes(self, name: str) -> list[tuple[str, str]]:
        FakeEngine.calls += 1
        return valueset_codes(name)


def settings(**overrides: Any) -> Settings:
    return Settings.from_env(overrides, environ={})


def request(*, raw: bool = False, **kwargs: Any):
    """The parsed hook request; with `raw`, its body read as the hook path reads it (prefetch
    values raw, `cds_service.wire`)."""
    body = hook_body(**kwargs)
    if raw:
        body = wire.decode_hook_body(orjson.dumps(body))
    return parse_hook_request(body, body["hook"])


def full_prefetch(patient_id: str = "p1") -> dict[str, Any]:
    """A prefetch for every key: one resource per search key."""
    return {
        "patient": resource("Patient", patient_id),
        "conditions": searchset(resource("Condition", "c1", patient_id)),
        "labResults": searchset(resource("Observation", "lab1", patient_id)),
        "findings": searchset(resource("Observation", "f1", patient_id)),
        "findingValues": searchset(resource("Observation", "fv1", patient_id)),
        "medicationRequests": searchset(resource("MedicationRequest", "mr1", patient_id)),
        "medicationStatements": searchset(resource("MedicationStatement", "ms1", patient_id)),
        "procedures": searchset(resource("Procedure", "pr1", patient_id)),
        "serviceRequests": searchset(resource("ServiceRequest", "sr1", patient_id)),
    }


def serve_key(stub: StubServer, key: str, reply: Reply, patient_id: str = "p1") -> None:
    """Answer the rendered template of `key` (as the gatherer will request it) with `reply`."""
    rendered = render_template(TEMPLATES[key], {"context.patientId": patient_id})
    stub.route("/fhir/" + rendered, reply)


def serve_all(stub: StubServer, prefetch: dict[str, Any]) -> None:
    for key, value in prefetch.items():
        serve_key(stub, key, Reply(body=value))


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------

ALLOWED_PARAMS = {"patient", "code", "combo-code", "value-concept", "status", "_count", "_sort"}


def test_templates_cover_exactly_the_record_keys() -> None:
    assert tuple(TEMPLATES) == PREFETCH_KEYS


@pytest.mark.parametrize("key", [k for k in PREFETCH_KEYS if k != "patient"])
def test_search_templates_use_only_the_valid_subset_and_are_bounded(key: str) -> None:
    path, _, query = TEMPLATES[key].partition("?")
    params = dict(parse_qsl(query))
    assert path in KNOWN_RESOURCE_TYPES
    assert set(params) <= ALLOWED_PARAMS
    assert params["patient"] == "{{context.patientId}}"
    assert 0 < int(params["_count"]) <= 100
    for value in (params.get("code"), params.get("combo-code"), params.get("value-concept")):
        if value:  # token equality list: system|code,system|code
            assert all("|" in item and not item.startswith("|") for item in value.split(","))


def test_patient_template_is_an_instance_read() -> None:
    assert TEMPLATES["patient"] == "Patient/{{context.patientId}}"


def test_code_filters_come_from_the_value_sets() -> None:
    labs = dict(parse_qsl(TEMPLATES["labResults"].partition("?")[2]))
    # combo-code: the Observation's code or a component's code (panels send B12 as a component)
    assert set(labs["combo-code"].split(",")) == {f"{LOINC}|2132-9", f"{LOINC}|14685-2", f"{LOINC}|13964-8",
                                                  f"{LOINC}|72160-5"}
    assert labs["_sort"] == "-date"
    # Every finding set is asked for both by code and by value, as the matcher reads both: a
    # diet recorded as an Observation coded "vegetarian diet" is found as well as one whose
    # value is.
    finding_codes = {f"{SCT}|44077006", f"{SCT}|91019004", f"{SCT}|160670007", f"{SCT}|224488000",
                     f"{SCT}|77386006", f"{LOINC}|LA15173-0", f"{SCT}|60001007"}
    findings = dict(parse_qsl(TEMPLATES["findings"].partition("?")[2]))
    assert set(findings["code"].split(",")) == finding_codes
    values = dict(parse_qsl(TEMPLATES["findingValues"].partition("?")[2]))
    assert set(values["value-concept"].split(",")) == finding_codes
    # Orders are not code-filtered: one coded only with the EHR's own orderable code is recognised
    # by the test's name; the status filter is the matcher's own.
    orders = dict(parse_qsl(TEMPLATES["serviceRequests"].partition("?")[2]))
    assert "code" not in orders
    assert orders["status"] == "active,on-hold"


def test_conditions_and_medications_are_not_filtered() -> None:
    """Inactive surgical history and text-only medications must reach the rules."""
    for key in ("conditions", "medicationRequests", "medicationStatements", "procedures"):
        params = dict(parse_qsl(TEMPLATES[key].partition("?")[2]))
        assert set(params) == {"patient", "_count"}, key


def test_codes_with_search_special_characters_are_escaped() -> None:
    templates = build_prefetch_templates(lambda name: [("urn:x", "a,b|c&d")])
    query = templates["findings"].partition("?")[2]
    assert "&d" not in query  # the code cannot add a search parameter
    assert dict(parse_qsl(query))["code"] == "urn:x|a\\,b\\|c&d"  # FHIR-escaped once decoded


def test_empty_value_set_leaves_the_search_unfiltered_not_empty() -> None:
    templates = build_prefetch_templates(lambda name: [])
    assert "code=" not in templates["labResults"] and "combo-code" not in templates["labResults"]
    assert templates["labResults"].startswith("Observation?patient={{context.patientId}}")


def test_gatherer_caches_templates_per_hook() -> None:
    gatherer = PatientDataGatherer(settings())
    FakeEngine.calls = 0
    first = gatherer.prefetch_templates("patient-view", FakeEngine())
    calls = FakeEngine.calls
    assert gatherer.prefetch_templates("patient-view", FakeEngine()) == first == TEMPLATES
    assert FakeEngine.calls == calls


# ---------------------------------------------------------------------------------------------
# Token rendering
# ---------------------------------------------------------------------------------------------


def test_tokens_are_url_encoded() -> None:
    assert render_template("Condition?patient={{context.patientId}}", {"context.patientId": "a b&c=d/e"}) \
        == "Condition?patient=a%20b%26c%3Dd%2Fe"
    assert render_template("Patient/{{ context.patientId }}", {"context.patientId": "../x"}) == "Patient/..%2Fx"


def test_user_tokens_from_the_context() -> None:
    req = request()
    assert render_template("Practitioner/{{userPractitionerId}}", req.context.token_values()) == "Practitioner/u1"
    assert render_template("x?u={{context.userId}}", req.context.token_values()) == "x?u=Practitioner%2Fu1"


@pytest.mark.parametrize("values", [{}, {"context.patientId": ""}, {"context.encounterId": "e1"}])
def test_missing_token_is_an_error_not_an_empty_string(values: dict[str, str]) -> None:
    with pytest.raises(TemplateError, match="context.patientId"):
        render_template("Condition?patient={{context.patientId}}", values)


# ---------------------------------------------------------------------------------------------
# Prefetch semantics
# ---------------------------------------------------------------------------------------------


def test_full_prefetch_needs_no_fhir_server() -> None:
    result = PatientDataGatherer(settings()).gather(request(prefetch=full_prefetch()), TEMPLATES)
    rec = result.record
    assert rec.patient["id"] == "p1"
    assert [c["id"] for c in rec.conditions] == ["c1"]
    assert {o["id"] for o in rec.observations} == {"lab1", "f1", "fv1"}
    assert len(rec.medication_requests) == len(rec.medication_statements) == len(rec.procedures) == 1
    assert [s["id"] for s in rec.service_requests] == ["sr1"]
    assert rec.unavailable == frozenset()
    assert result.fhir_calls == 0 and result.fetched_keys == () and result.failed_keys == ()


def test_null_means_no_data_and_is_not_fetched() -> None:
    prefetch = full_prefetch() | {"labResults": None, "medicationRequests": None}
    with StubServer() as stub:
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
            request(prefetch=prefetch, fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert {o["id"] for o in result.record.observations} == {"f1", "fv1"}
    assert result.record.medication_requests == ()
    assert result.record.unavailable == frozenset()


def test_empty_searchset_means_no_data() -> None:
    prefetch = full_prefetch() | {"conditions": searchset()}
    result = PatientDataGatherer(settings()).gather(request(prefetch=prefetch), TEMPLATES)
    assert result.record.conditions == () and result.failed_keys == ()


@pytest.mark.parametrize("raw", [False, True], ids=["decoded", "raw"])
@pytest.mark.parametrize("bad_value", [
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]},
    {"resourceType": "Bundle", "type": "searchset",
     "entry": [{"resource": {"resourceType": "OperationOutcome", "issue": []}}]},
    {"resourceType": "Bundle", "type": "searchset",
     "entry": [{"resource": {"resourceType": "OperationOutcome", "issue": []}},
               {"resource": {"resourceType": "OperationOutcome", "issue": [], "id": 7}}]},
], ids=["outcome", "bundle-of-outcomes", "bundle-of-outcomes-one-with-a-dict-head"])
def test_absent_or_error_values_are_fetched_with_the_token(bad_value: Any, raw: bool) -> None:
    prefetch = full_prefetch()
    del prefetch["procedures"]
    prefetch["conditions"] = bad_value
    fetched = {"procedures": searchset(resource("Procedure", "pr9")),
               "conditions": searchset(resource("Condition", "c9"), resource("Condition", "c10"))}
    with StubServer() as stub:
        serve_all(stub, fetched)
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base + "/fhir")).gather(
            request(prefetch=prefetch, fhir_server=stub.base + "/fhir", token=TOKEN, raw=raw), TEMPLATES)
        assert len(stub.requests) == 2
        assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in stub.requests)
        assert {r.query.split("&")[0] for r in stub.requests} == {"patient=p1"}
    assert sorted(result.fetched_keys) == ["conditions", "procedures"]
    assert [c["id"] for c in result.record.conditions] == ["c9", "c10"]
    assert [p["id"] for p in result.record.procedures] == ["pr9"]
    assert result.fhir_calls == 2 and result.failed_keys == ()


def test_no_token_fetches_without_authorization_header() -> None:
    with StubServer() as stub:
        serve_all(stub, full_prefetch())
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
            request(fhir_server=stub.base + "/fhir"), TEMPLATES)
        assert len(stub.requests) == len(PREFETCH_KEYS)
        assert all("Authorization" not in r.headers for r in stub.requests)
    assert result.record.patient["id"] == "p1"
    assert set(result.fetched_keys) == set(PREFETCH_KEYS)


def test_prefetched_bundle_pages_are_followed_when_the_server_may_be_called() -> None:
    with StubServer() as stub:
        page2 = f"{stub.base}/fhir/Condition?page=2"
        stub.route("/fhir/Condition?page=2", Reply(body=searchset(resource("Condition", "c2"))))
        prefetch = full_prefetch() | {"conditions": searchset(resource("Condition", "c1"), next_url=page2)}
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
            request(prefetch=prefetch, fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert [r.headers["Authorization"] for r in stub.requests] == [f"Bearer {TOKEN}"]
    assert [c["id"] for c in result.record.conditions] == ["c1", "c2"]
    assert result.fetched_keys == () and result.fhir_calls == 1


def test_prefetched_bundle_pages_without_a_server_use_what_is_there() -> None:
    prefetch = full_prefetch() | {
        "conditions": searchset(resource("Condition", "c1"), next_url="https://ehr.example/fhir/Condition?p=2")}
    result = PatientDataGatherer(settings()).gather(request(prefetch=prefetch), TEMPLATES)
    assert [c["id"] for c in result.record.conditions] == ["c1"]
    assert result.fhir_calls == 0 and result.failed_keys == ()


def test_next_link_to_another_host_is_not_followed() -> None:
    with StubServer() as stub, StubServer() as other:
        serve_all(stub, full_prefetch() | {
            "conditions": searchset(resource("Condition", "c1"), next_url=f"{other.base}/fhir/Condition?p=2")})
        result = PatientDataGatherer(settings(fhir_allowlist=f"{stub.base},{other.base}")).gather(
            request(fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert other.requests == []
    assert "conditions" in result.failed_keys  # incomplete: the rules are told
    assert [c["id"] for c in result.record.conditions] == ["c1"]


def test_missing_optional_data_without_server_narrows_the_record() -> None:
    prefetch = full_prefetch()
    del prefetch["medicationStatements"], prefetch["labResults"]
    result = PatientDataGatherer(settings()).gather(request(prefetch=prefetch), TEMPLATES)
    assert result.record.unavailable == {"medicationStatements", "labResults"}
    assert set(result.failed_keys) == {"medicationStatements", "labResults"}
    assert result.fhir_calls == 0


@pytest.mark.parametrize("missing", [("patient",), ("conditions",), ("patient", "conditions")])
def test_missing_required_data_without_server_is_412_naming_the_keys(missing: tuple[str, ...]) -> None:
    prefetch = full_prefetch()
    for key in missing:
        del prefetch[key]
    with pytest.raises(CdsError) as err:
        PatientDataGatherer(settings()).gather(request(prefetch=prefetch), TEMPLATES)
    assert err.value.status == 412
    for key in missing:
        assert key in err.value.diagnostics
    assert err.value.outcome()["issue"][0]["code"] == "incomplete"


def test_null_patient_is_412_not_fetched() -> None:
    with StubServer() as stub:
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
                request(prefetch=full_prefetch() | {"patient": None}, fhir_server=stub.base + "/fhir"), TEMPLATES)
        assert stub.requests == []
    assert err.value.status == 412 and "patient" in err.value.diagnostics


def test_no_prefetch_and_empty_allowlist_is_412_without_any_call() -> None:
    with StubServer() as stub:
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(fhir_allowlist="")).gather(
                request(fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert err.value.status == 412 and "allowlist" in err.value.diagnostics
    assert TOKEN not in err.value.diagnostics


def test_server_off_the_allowlist_gets_412_and_never_the_token() -> None:
    prefetch = full_prefetch()
    del prefetch["findings"]  # even an optional key: the deployment refuses this server
    with StubServer() as stub:
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(fhir_allowlist=f"{stub.base}/other-fhir")).gather(
                request(prefetch=prefetch, fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert err.value.status == 412 and "findings" in err.value.diagnostics


def test_server_off_the_allowlist_is_fine_when_nothing_is_missing() -> None:
    with StubServer() as stub:
        result = PatientDataGatherer(settings(fhir_allowlist="https://ehr.example/fhir")).gather(
            request(prefetch=full_prefetch(), fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert stub.requests == []
    assert result.record.patient is not None


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://ehr.example/fhir", True),
    ("https://ehr.example/fhir/", True),
    ("https://EHR.example:443/fhir/R4", True),
    ("https://ehr.example/fhirevil", False),
    ("https://ehr.example.evil.test/fhir", False),
    ("https://ehr.example@evil.test/fhir", False),
    ("https://ehr.example:8443/fhir", False),
    ("http://ehr.example/fhir", False),
    ("https://ehr.example/other", False),
    ("ftp://ehr.example/fhir", False),
    ("https://ehr.example\\@evil.test/fhir", False),
])
def test_allowlist_matches_scheme_host_port_and_path_segments(url: str, allowed: bool) -> None:
    assert url_allowed(url, ["https://ehr.example/fhir"]) is allowed


def test_whole_host_prefix() -> None:
    assert url_allowed("http://127.0.0.1:8080/anything/fhir", ["http://127.0.0.1:8080"])
    assert not url_allowed("http://127.0.0.1:8081/fhir", ["http://127.0.0.1:8080"])


def test_redirects_are_not_followed() -> None:
    with StubServer() as stub, StubServer() as other:
        serve_all(stub, full_prefetch())
        serve_key(stub, "labResults", Reply(302, b"", headers={"Location": f"{other.base}/steal"}))
        serve_all(other, full_prefetch())
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
            request(fhir_server=stub.base + "/fhir", token=TOKEN), TEMPLATES)
        assert other.requests == []
    assert result.failed_keys == ("labResults",)
    assert result.record.unavailable == {"labResults"}


@pytest.mark.parametrize("send_length", [True, False], ids=["declared", "streamed"])
def test_response_size_is_capped(send_length: bool) -> None:
    big = searchset(*(resource("Observation", f"o{i}", note=[{"text": "x" * 500}]) for i in range(200)))
    with StubServer() as stub:
        serve_all(stub, full_prefetch())
        serve_key(stub, "findings", Reply(body=big, send_length=send_length))
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base, fhir_max_response_bytes=50_000)).gather(
            request(fhir_server=stub.base + "/fhir"), TEMPLATES)
    assert result.failed_keys == ("findings",)
    assert {o["id"] for o in result.record.observations} == {"lab1", "fv1"}


@pytest.mark.parametrize("raw", [False, True], ids=["decoded", "raw"])
def test_a_bundle_with_data_and_outcomes_is_data(raw: bool) -> None:
    """A search answer with a warning (an OperationOutcome entry, `search.mode` outcome) beside
    its matches is used as sent: nothing is fetched."""
    prefetch = full_prefetch() | {"conditions": {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
        {"resource": resource("Condition", "ok")}]}}
    result = PatientDataGatherer(settings()).gather(request(prefetch=prefetch, raw=raw), TEMPLATES)
    assert [c["id"] for c in result.record.conditions] == ["ok"]
    assert result.fhir_calls == 0 and result.failed_keys == () and result.skipped_resources == 0


@pytest.mark.parametrize("raw", [False, True], ids=["decoded", "raw"])
def test_structurally_invalid_entries_are_skipped_and_counted(raw: bool) -> None:
    prefetch = full_prefetch() | {"conditions": {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": resource("Condition", "ok")},
        {"resource": resource("Condition", "other", patient_id="p2")},
        {"resource": {"resourceType": "Condition", "id": "nosubject"}},
        {"resource": {"resourceType": "Frobnicator", "id": "x", "subject": {"reference": "Patient/p1"}}},
        {"resource": ["not", "a", "dict"]},
        "not an entry",
        {"resource": resource("Condition", "abs", subject={"reference": "https://ehr.example/fhir/Patient/p1"})},
        {"resource": resource("Medication", "med")},
        {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
    ]}}
    result = PatientDataGatherer(settings()).gather(request(prefetch=prefetch, raw=raw), TEMPLATES)
    assert [c["id"] for c in result.record.conditions] == ["ok", "abs"]
    assert result.skipped_resources == 5


def test_prefetched_patient_of_another_patient_is_refetched() -> None:
    prefetch = full_prefetch() | {"patient": resource("Patient", "someone-else")}
    with StubServer() as stub:
        serve_key(stub, "patient", Reply(body=resource("Patient", "p1")))
        result = PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
            request(prefetch=prefetch, fhir_server=stub.base + "/fhir"), TEMPLATES)
    assert result.record.patient["id"] == "p1"
    assert result.fetched_keys == ("patient",) and result.skipped_resources == 1


def test_fetched_patient_must_be_the_context_patient() -> None:
    prefetch = full_prefetch()
    del prefetch["patient"]
    with StubServer() as stub:
        serve_key(stub, "patient", Reply(body=resource("Patient", "someone-else")))
        with pytest.raises(CdsError) as err:
            PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
                request(prefetch=prefetch, fhir_server=stub.base + "/fhir"), TEMPLATES)
    assert err.value.status == 412 and "patient" in err.value.diagnostics


def test_draft_orders_come_from_the_context() -> None:
    draft = {"resourceType": "ServiceRequest", "id": "draft1", "status": "draft", "intent": "proposal",
             "subject": {"reference": "Patient/p1"}}
    result = PatientDataGatherer(settings()).gather(
        request(hook="order-sign", prefetch=full_prefetch(), draft_orders=[draft]), TEMPLATES)
    assert result.record.draft_orders == (draft,)
    assert [s["id"] for s in result.record.service_requests] == ["sr1"]


def test_neither_token_nor_patient_id_is_logged() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("cds_service.patient_data")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    pid = "pat-zq81x"
    prefetch = full_prefetch(pid)
    del prefetch["procedures"]
    try:
        with StubServer() as stub:
            serve_key(stub, "procedures", Reply(500, b"<html>oops</html>", content_type="text/html"), pid)
            PatientDataGatherer(settings(fhir_allowlist=stub.base)).gather(
                request(prefetch=prefetch, fhir_server=stub.base + "/fhir", token=TOKEN, patient_id=pid),
                TEMPLATES)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in records)
    assert "procedures" in text  # keys and reasons are logged...
    assert TOKEN not in text and pid not in text  # ...never the token or the patient


def test_unhashable_resource_types_in_prefetch_are_skipped_not_fatal():
    from cds_service.config import Settings
    from cds_service.patient_data import PatientDataGatherer, build_prefetch_templates
    from cds_service.protocol import parse_hook_request

    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": ["Condition"], "id": "x"}},
        {"resource": {"resourceType": {"nested": 1}, "id": "y"}},
        {"resource": {"resourceType": "Condition", "id": "ok", "subject": {"reference": "Patient/p1"}}}]}
    request = parse_hook_request({"hook": "patient-view", "hookInstance": "h",
                                  "context": {"userId": "Practitioner/1", "patientId": "p1"},
                                  "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"},
                                               "conditions": bundle}}, "patient-view")
    gatherer = PatientDataGatherer(Settings.from_env(environ={}))
    result = gatherer.gather(request, build_prefetch_templates(lambda name: []))
    assert [c["id"] for c in result.record.conditions] == ["ok"]
    assert result.skipped_resources >= 2
