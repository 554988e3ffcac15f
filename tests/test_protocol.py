"""The card model enforces CDS Hooks 2.0's response rules, and request parsing its request rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cds_service.protocol import (Action, Card, CdsError, Link, OverrideReason, Source, Suggestion,
                                  cards_response, parse_hook_request)

SOURCE = Source(label="B12 CDS")


def card(**kw):
    base = {"summary": "Consider serum vitamin B12", "indicator": "info", "source": SOURCE}
    base.update(kw)
    return Card(**base)


def test_optional_fields_are_omitted_not_null():
    out = cards_response([card()])["cards"][0]
    assert set(out) == {"uuid", "summary", "indicator", "source"}
    assert out["source"] == {"label": "B12 CDS"}


@pytest.mark.parametrize("field,value", [
    ("summary", ""), ("detail", ""), ("detail", "   "), ("links", []), ("overrideReasons", []),
    ("suggestions", []),
])
def test_empty_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        card(**{field: value})


def test_summary_must_be_under_140_characters():
    card(summary="x" * 139)
    with pytest.raises(ValidationError):
        card(summary="x" * 140)


def test_indicator_is_one_of_info_warning_critical():
    for ok in ("info", "warning", "critical"):
        card(indicator=ok)
    with pytest.raises(ValidationError):
        card(indicator="hard-stop")


def test_suggestions_require_selection_behavior():
    sug = Suggestion(label="Order B12", actions=[Action(type="create", description="Order",
                                                       resource={"resourceType": "ServiceRequest"})])
    with pytest.raises(ValidationError):
        card(suggestions=[sug])
    out = card(suggestions=[sug], selectionBehavior="at-most-one").to_json()
    assert out["selectionBehavior"] == "at-most-one"
    assert out["suggestions"][0]["uuid"]


def test_at_most_one_allows_only_one_recommended_suggestion():
    s1, s2 = Suggestion(label="a", isRecommended=True), Suggestion(label="b", isRecommended=True)
    with pytest.raises(ValidationError):
        card(suggestions=[s1, s2], selectionBehavior="at-most-one")
    card(suggestions=[s1, s2], selectionBehavior="any")


def test_actions_need_type_description_and_resource_rules():
    with pytest.raises(ValidationError):
        Action(type="create", description="x")  # no resource
    with pytest.raises(ValidationError):
        Action(type="delete", description="x", resource={"resourceType": "ServiceRequest"})
    with pytest.raises(ValidationError):
        Action(type="create", description="", resource={"resourceType": "ServiceRequest"})
    Action(type="delete", description="x", resourceId="ServiceRequest/1")


def test_override_reasons_are_full_codings():
    with pytest.raises(ValidationError):
        OverrideReason(system="s", code="c")  # display required
    with pytest.raises(ValidationError):
        OverrideReason(code="c", display="d")
    out = card(overrideReasons=[OverrideReason(system="s", code="c", display="d")]).to_json()
    assert out["overrideReasons"] == [{"system": "s", "code": "c", "display": "d"}]


def test_links_rules():
    with pytest.raises(ValidationError):
        Link(label="x", url="https://a", type="absolute", appContext="ctx")
    with pytest.raises(ValidationError):
        Link(label="x", url="relative/path", type="absolute")
    Link(label="x", url="https://a", type="smart", appContext="ctx")


def test_unknown_card_fields_are_rejected():
    with pytest.raises(ValidationError):
        card(colour="red")


def _req(**context):
    ctx = {"userId": "Practitioner/1", "patientId": "p1"}
    ctx.update(context)
    return {"hook": "patient-view", "hookInstance": "h-1", "context": ctx}


def test_request_tolerates_unknown_members_and_extensions():
    body = _req()
    body["extension"] = {"org.example.thing": {"a": 1}}
    body["somethingNew"] = [1, 2]
    body["context"]["extension"] = {"org.example": True}
    parsed = parse_hook_request(body, "patient-view")
    assert parsed.context.patient_id == "p1"
    assert parsed.context.token_values()["userPractitionerId"] == "1"


@pytest.mark.parametrize("mutate,field", [
    (lambda b: b.pop("hook"), "hook"),
    (lambda b: b.update(hook="order-sign"), "hook"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b.update(hookInstance=7), "hookInstance"),
    (lambda b: b.pop("context"), "context"),
    (lambda b: b.update(context=[1]), "context"),
    (lambda b: b["context"].pop("patientId"), "context.patientId"),
    (lambda b: b["context"].update(patientId="Patient/1"), "context.patientId"),
    (lambda b: b["context"].update(userId="1"), "context.userId"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                           "scope": "s", "subject": "c"}), "fhirServer"),
    (lambda b: b.update(fhirServer="ftp://x"), "fhirServer"),
    (lambda b: b.update(prefetch=[1]), "prefetch"),
    (lambda b: b.update(hookInstance="x" * 500), "hookInstance"),
    (lambda b: b.update(fhirAuthorization=None), "fhirAuthorization"),
    (lambda b: b.update(fhirServer=None), "fhirServer"),
    (lambda b: b.update(prefetch=None), "prefetch"),
    (lambda b: b["context"].update(encounterId=None), "context.encounterId"),
    (lambda b: b["context"].update(patientId="../../metadata"), "context.patientId"),
    (lambda b: b["context"].update(encounterId="e 1"), "context.encounterId"),
    (lambda b: b.update(extension=[1]), "extension"),
    (lambda b: b["context"].update(extension="x"), "context.extension"),
    (lambda b: b.update(prefetch={"patient": "Patient/1"}), "prefetch.patient"),
    (lambda b: b.update(fhirServer="https://f", fhirAuthorization={"access_token": "t", "token_type": "Bearer",
                                                                   "scope": "s", "subject": "c"}),
     "fhirAuthorization.expires_in"),
    (lambda b: b.update(fhirServer="https://f", fhirAuthorization={"access_token": "t", "token_type": "MAC",
                                                                   "expires_in": 1, "scope": "s", "subject": "c"}),
     "fhirAuthorization.token_type"),
])
def test_invalid_requests_name_the_field(mutate, field):
    body = _req()
    mutate(body)
    with pytest.raises(CdsError) as err:
        parse_hook_request(body, "patient-view")
    assert err.value.status == 400
    assert err.value.outcome()["issue"][0]["expression"] == [field]


@pytest.mark.parametrize("value, blank", [
    ("", True), (" ", True), ("\t\n", True), ("\u00a0", True), ("\u3000\ufeff", True), ("\u2028", True),
    (" h-1", False), ("\u00a0h", False), ("h", False), ("!", False), ("~", False), ("\u00e9", False),
    ("\x1c", False),  # not ECMAScript whitespace (Python's str.strip() would remove it)
])
def test_blank_strings_are_refused_as_the_openapi_pattern_says(value, blank):
    """`"pattern": "\\S"`: a string of ECMAScript whitespace only is refused, anything else kept."""
    body = _req()
    body["hookInstance"] = value
    if blank:
        with pytest.raises(CdsError) as err:
            parse_hook_request(body, "patient-view")
        assert err.value.outcome()["issue"][0]["expression"] == ["hookInstance"]
    else:
        assert parse_hook_request(body, "patient-view").hook_instance == value


def test_order_hooks_require_a_draft_orders_bundle():
    body = {"hook": "order-sign", "hookInstance": "h", "context": {
        "userId": "Practitioner/1", "patientId": "p1", "draftOrders": {"resourceType": "Patient"}}}
    with pytest.raises(CdsError) as err:
        parse_hook_request(body, "order-sign")
    assert err.value.expression == "context.draftOrders"
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    assert parse_hook_request(body, "order-sign").context.draft_orders["resourceType"] == "Bundle"
    body["hook"] = "order-select"
    with pytest.raises(CdsError) as err:
        parse_hook_request(body, "order-select")
    assert err.value.expression == "context.selections"


def test_expires_in_accepts_integral_numbers_only():
    body = _req()
    body.update(fhirServer="https://f", fhirAuthorization={"access_token": "t", "token_type": "Bearer",
                                                          "expires_in": 300.0, "scope": "s", "subject": "c"})
    assert parse_hook_request(body, "patient-view").fhir_authorization is not None
    body["fhirAuthorization"]["expires_in"] = 1.5
    with pytest.raises(CdsError):
        parse_hook_request(body, "patient-view")


def test_access_token_is_not_in_repr():
    body = _req()
    body.update(fhirServer="https://fhir.example.org", fhirAuthorization={
        "access_token": "SECRET-TOKEN", "token_type": "Bearer", "expires_in": 300, "scope": "x", "subject": "y"})
    parsed = parse_hook_request(body, "patient-view")
    assert "SECRET-TOKEN" not in repr(parsed)
