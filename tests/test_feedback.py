"""Feedback endpoint contract (CDS Hooks 2.0 cds-fb-1..3), the admin report route and the CLI."""

from __future__ import annotations

import copy
import json
from datetime import date, datetime, timedelta, timezone

import pytest

from cds_service import cli
from cds_service.http.feedback import FUTURE_SKEW_SECONDS, validate_feedback
from cds_service.protocol import CdsError
from cds_service.services import services
from cds_service.store import IssuedCard

SVC = "b12-neck-pain-patient-view"
URL = f"/cds-services/{SVC}/feedback"
TS = "2021-12-11T10:05:31Z"


def entry(**fields) -> dict:
    base = {"card": "card-1", "outcome": "overridden", "outcomeTimestamp": TS}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


ACCEPTED = entry(outcome="accepted", acceptedSuggestions=[{"id": "sg-1"}])
REASON = {"system": "https://b12.example.org/override", "code": "already-tested",
          "display": "Already tested"}


@pytest.fixture
def store(app):
    s = services(app).store
    s.record_issued_cards(SVC, "hook-1", "patient-1", [
        IssuedCard("card-1", "consider-b12-test", ("sg-1", "sg-2")),
        IssuedCard("card-2", "mechanical-first")])
    return s


def post(client, *entries, body=None):
    return client.post(URL, json={"feedback": list(entries)} if body is None else body)


def assert_outcome(resp, status: int, expression: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    outcome = resp.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = outcome["issue"][0]
    assert issue["severity"] == "error"
    if expression is not None:
        assert issue["expression"] == [expression], issue
        assert expression in issue["diagnostics"] or expression == ""
    return issue


# --- valid bodies ----------------------------------------------------------------------------

VALID_ENTRIES = {
    "overridden without reason": entry(),
    "overridden with coded reason": entry(overrideReason={"reason": REASON}),
    "overridden with reason without display": entry(
        overrideReason={"reason": {"system": "https://x.example", "code": "c"}}),
    "overridden with comment only": entry(overrideReason={"userComment": "patient declined"}),
    "overridden with reason and comment": entry(overrideReason={"reason": REASON, "userComment": "x"}),
    "accepted with suggestions": entry(outcome="accepted",
                                       acceptedSuggestions=[{"id": "sg-1"}, {"id": "sg-2"}]),
    "extension members tolerated": entry(extension={"org.example.x": 1},
                                         overrideReason={"userComment": "c", "extension": {}}),
    "unknown members tolerated": entry(futureField=True),
    "fractional seconds": entry(outcomeTimestamp="2021-12-11T10:05:31.123456789Z"),
    "zero offset": entry(outcomeTimestamp="2021-12-11T10:05:31+00:00"),
    "lower-case t and z": entry(outcomeTimestamp="2021-12-11t10:05:31z"),
    "leap second": entry(outcomeTimestamp="2016-12-31T23:59:60Z"),
}


@pytest.mark.parametrize("item", VALID_ENTRIES.values(), ids=VALID_ENTRIES.keys())
def test_valid_feedback_is_stored_and_answered_200(client, store, item):
    resp = post(client, item)
    assert resp.status_code == 200
    assert resp.get_json() == {}
    (row,) = store.feedback_rows()
    assert row["card_uuid"] == "card-1" and row["outcome"] == item["outcome"]
    assert row["service_id"] == SVC and not row["unknown_card"]


def test_stored_values_match_the_request(client, store):
    assert post(client, entry(overrideReason={"reason": REASON, "userComment": "seen last week"}),
                ACCEPTED).status_code == 200
    overridden, accepted = store.feedback_rows()
    assert (overridden["reason_system"], overridden["reason_code"], overridden["reason_display"],
            overridden["user_comment"]) == (REASON["system"], REASON["code"], REASON["display"],
                                            "seen last week")
    assert overridden["outcome_timestamp"] == "2021-12-11T10:05:31.000000Z"
    assert accepted["accepted_suggestions"] == ["sg-1"] and accepted["reason_code"] is None


def test_several_cards_in_one_post(client, store):
    resp = post(client, entry(card="card-1"), entry(card="card-2"), ACCEPTED)
    assert resp.status_code == 200
    assert sorted(r["card_uuid"] for r in store.feedback_rows()) == ["card-1", "card-1", "card-2"]


def test_repeated_feedback_is_idempotent(client, store):
    same_instant = ["2021-12-11T10:05:31Z", "2021-12-11T10:05:31.000Z", "2021-12-11T10:05:31+00:00"]
    for ts in same_instant:
        assert post(client, entry(outcomeTimestamp=ts), entry(outcomeTimestamp=ts)).status_code == 200
    assert len(store.feedback_rows()) == 1
    # the same card reported again later is a new report, not a duplicate
    assert post(client, entry(outcomeTimestamp="2021-12-11T10:06:00Z")).status_code == 200
    assert len(store.feedback_rows()) == 2


def test_feedback_for_an_unknown_card_is_stored_and_flagged(client, store):
    assert post(client, entry(card="never-issued"), entry(card="card-1")).status_code == 200
    flags = {r["card_uuid"]: r["unknown_card"] for r in store.feedback_rows()}
    assert flags == {"never-issued": True, "card-1": False}


def test_unknown_suggestion_is_stored_and_flagged(client, store):
    assert post(client, entry(outcome="accepted", acceptedSuggestions=[{"id": "nope"}])).status_code == 200
    (row,) = store.feedback_rows()
    assert row["unknown_suggestions"] and not row["unknown_card"]


# --- invalid bodies: 400 naming entry and field, nothing stored ------------------------------

LONG = "x" * 129
INVALID = {
    "body not an object": ([ACCEPTED], None),
    "feedback missing": ({}, "feedback"),
    "feedback null": ({"feedback": None}, "feedback"),
    "feedback empty": ({"feedback": []}, "feedback"),
    "feedback not an array": ({"feedback": ACCEPTED}, "feedback"),
    "too many entries": ({"feedback": [entry()] * 501}, "feedback"),
    "entry not an object": ({"feedback": ["card-1"]}, "feedback[0]"),
    "card missing": ({"feedback": [entry(card=...)]}, "feedback[0].card"),
    "card empty": ({"feedback": [entry(card="")]}, "feedback[0].card"),
    "card blank": ({"feedback": [entry(card="  ")]}, "feedback[0].card"),
    "card not a string": ({"feedback": [entry(card=12)]}, "feedback[0].card"),
    "card too long": ({"feedback": [entry(card=LONG)]}, "feedback[0].card"),
    "outcome missing": ({"feedback": [entry(outcome=...)]}, "feedback[0].outcome"),
    "outcome unknown": ({"feedback": [entry(outcome="dismissed")]}, "feedback[0].outcome"),
    "outcome wrong case": ({"feedback": [entry(outcome="Accepted")]}, "feedback[0].outcome"),
    "outcome too long": ({"feedback": [entry(outcome="a" * 40)]}, "feedback[0].outcome"),
    "accepted without suggestions": ({"feedback": [entry(outcome="accepted")]},
                                     "feedback[0].acceptedSuggestions"),
    "acceptedSuggestions null": ({"feedback": [entry(outcome="accepted", acceptedSuggestions=None)]},
                                 "feedback[0].acceptedSuggestions"),
    "acceptedSuggestions empty": ({"feedback": [entry(outcome="accepted", acceptedSuggestions=[])]},
                                  "feedback[0].acceptedSuggestions"),
    "acceptedSuggestions not an array": (
        {"feedback": [entry(outcome="accepted", acceptedSuggestions={"id": "sg-1"})]},
        "feedback[0].acceptedSuggestions"),
    "suggestion not an object": ({"feedback": [entry(outcome="accepted", acceptedSuggestions=["sg-1"])]},
                                 "feedback[0].acceptedSuggestions[0]"),
    "suggestion id missing": (
        {"feedback": [entry(outcome="accepted", acceptedSuggestions=[{"id": "a"}, {"uuid": "b"}])]},
        "feedback[0].acceptedSuggestions[1].id"),
    "suggestion id too long": ({"feedback": [entry(outcome="accepted", acceptedSuggestions=[{"id": LONG}])]},
                               "feedback[0].acceptedSuggestions[0].id"),
    "too many suggestions": (
        {"feedback": [entry(outcome="accepted", acceptedSuggestions=[{"id": f"s{i}"} for i in range(101)])]},
        "feedback[0].acceptedSuggestions"),
    "suggestions on an overridden card": ({"feedback": [entry(acceptedSuggestions=[{"id": "sg-1"}])]},
                                          "feedback[0].acceptedSuggestions"),
    "override reason on an accepted card": (
        {"feedback": [dict(ACCEPTED, overrideReason={"userComment": "x"})]}, "feedback[0].overrideReason"),
    "overrideReason empty": ({"feedback": [entry(overrideReason={})]}, "feedback[0].overrideReason"),
    "overrideReason null": ({"feedback": [entry(overrideReason=None)]}, "feedback[0].overrideReason"),
    "overrideReason not an object": ({"feedback": [entry(overrideReason="busy")]},
                                     "feedback[0].overrideReason"),
    "reason not a Coding": ({"feedback": [entry(overrideReason={"reason": "busy"})]},
                            "feedback[0].overrideReason.reason"),
    "reason without code": ({"feedback": [entry(overrideReason={"reason": {"system": "s"}})]},
                            "feedback[0].overrideReason.reason.code"),
    "reason without system": ({"feedback": [entry(overrideReason={"reason": {"code": "c"}})]},
                              "feedback[0].overrideReason.reason.system"),
    "reason code too long": (
        {"feedback": [entry(overrideReason={"reason": {"system": "s", "code": "c" * 257}})]},
        "feedback[0].overrideReason.reason.code"),
    "reason system too long": (
        {"feedback": [entry(overrideReason={"reason": {"system": "s" * 2049, "code": "c"}})]},
        "feedback[0].overrideReason.reason.system"),
    "reason display empty": (
        {"feedback": [entry(overrideReason={"reason": {"system": "s", "code": "c", "display": ""}})]},
        "feedback[0].overrideReason.reason.display"),
    "reason display too long": (
        {"feedback": [entry(overrideReason={"reason": {"system": "s", "code": "c", "display": "d" * 1025}})]},
        "feedback[0].overrideReason.reason.display"),
    "userComment not a string": ({"feedback": [entry(overrideReason={"userComment": 5})]},
                                 "feedback[0].overrideReason.userComment"),
    "userComment too long": ({"feedback": [entry(overrideReason={"userComment": "c" * 4097})]},
                             "feedback[0].overrideReason.userComment"),
    "userComment null": ({"feedback": [entry(overrideReason={"reason": REASON, "userComment": None})]},
                         "feedback[0].overrideReason.userComment"),
    "timestamp missing": ({"feedback": [entry(outcomeTimestamp=...)]}, "feedback[0].outcomeTimestamp"),
    "timestamp not a date-time": ({"feedback": [entry(outcomeTimestamp="yesterday")]},
                                  "feedback[0].outcomeTimestamp"),
    "timestamp date only": ({"feedback": [entry(outcomeTimestamp="2021-12-11")]},
                            "feedback[0].outcomeTimestamp"),
    "timestamp without zone": ({"feedback": [entry(outcomeTimestamp="2021-12-11T10:05:31")]},
                               "feedback[0].outcomeTimestamp"),
    "timestamp without seconds": ({"feedback": [entry(outcomeTimestamp="2021-12-11T10:05Z")]},
                                  "feedback[0].outcomeTimestamp"),
    "timestamp not UTC": ({"feedback": [entry(outcomeTimestamp="2021-12-11T10:05:31+01:00")]},
                          "feedback[0].outcomeTimestamp"),
    "timestamp impossible date": ({"feedback": [entry(outcomeTimestamp="2021-02-30T10:05:31Z")]},
                                  "feedback[0].outcomeTimestamp"),
    "timestamp impossible hour": ({"feedback": [entry(outcomeTimestamp="2021-12-11T25:05:31Z")]},
                                  "feedback[0].outcomeTimestamp"),
    "timestamp with Arabic-Indic digits": (
        {"feedback": [entry(outcomeTimestamp="\u0662\u0660\u0662\u0661-12-11T10:05:31Z")]},
        "feedback[0].outcomeTimestamp"),
    "timestamp with full-width digits": (
        {"feedback": [entry(outcomeTimestamp="2021-12-11T\uff11\uff10:05:31Z")]},
        "feedback[0].outcomeTimestamp"),
    "timestamp far in the future": ({"feedback": [entry(outcomeTimestamp="2999-01-01T00:00:00Z")]},
                                    "feedback[0].outcomeTimestamp"),
    "timestamp next year": ({"feedback": [entry(outcomeTimestamp=f"{date.today().year + 1}-06-01T00:00:00Z")]},
                            "feedback[0].outcomeTimestamp"),
    "timestamp epoch number": ({"feedback": [entry(outcomeTimestamp=1639217131)]},
                               "feedback[0].outcomeTimestamp"),
    "timestamp too long": ({"feedback": [entry(outcomeTimestamp="2021-12-11T10:05:31." + "1" * 60 + "Z")]},
                           "feedback[0].outcomeTimestamp"),
    "extension not an object": ({"feedback": [entry(extension=[1])]}, "feedback[0].extension"),
    "reason extension not an object": (
        {"feedback": [entry(overrideReason={"reason": dict(REASON, extension="x")})]},
        "feedback[0].overrideReason.reason.extension"),
    "suggestion extension not an object": (
        {"feedback": [entry(outcome="accepted", acceptedSuggestions=[{"id": "s", "extension": 1}])]},
        "feedback[0].acceptedSuggestions[0].extension"),
}


@pytest.mark.parametrize("body,expression", INVALID.values(), ids=INVALID.keys())
def test_invalid_feedback_is_400_naming_the_field(client, store, body, expression):
    resp = post(client, body=body)
    issue = assert_outcome(resp, 400)
    if expression is None:
        assert "expression" not in issue
    else:
        assert issue["expression"] == [expression]
        assert expression in issue["diagnostics"]
    assert store.feedback_rows() == []


def test_one_bad_entry_rejects_the_whole_request_and_names_its_index(client, store):
    bad = entry(card="card-2", outcome="maybe")
    resp = post(client, ACCEPTED, entry(card="card-2"), bad, entry())
    issue = assert_outcome(resp, 400)
    assert issue["expression"] == ["feedback[2].outcome"]
    assert store.feedback_rows() == []


def test_validation_does_not_mutate_or_echo_the_comment(client, store):
    secret = "Patient John Doe, MRN 12345, refused"
    body = {"feedback": [entry(overrideReason={"userComment": secret}, outcomeTimestamp="bad")]}
    original = copy.deepcopy(body)
    resp = post(client, body=body)
    assert_outcome(resp, 400, "feedback[0].outcomeTimestamp")
    assert secret not in resp.get_data(as_text=True)
    assert body == original


# --- transport errors -------------------------------------------------------------------------

def test_unknown_service_is_404_and_nothing_stored(client, store):
    resp = client.post("/cds-services/not-a-service/feedback", json={"feedback": [entry()]})
    assert_outcome(resp, 404)
    assert store.feedback_rows() == []


@pytest.mark.parametrize("service_id", ["b12-neck-pain-patient-view", "b12-neck-pain-order-select",
                                        "b12-neck-pain-order-sign"])
def test_every_service_takes_feedback(client, store, service_id):
    resp = client.post(f"/cds-services/{service_id}/feedback", json={"feedback": [entry()]})
    assert resp.status_code == 200
    assert [r["service_id"] for r in store.feedback_rows()] == [service_id]


def test_non_json_is_415(client, store):
    resp = client.post(URL, data=json.dumps({"feedback": [entry()]}), content_type="text/plain")
    assert_outcome(resp, 415)
    assert_outcome(client.post(URL, data=b"feedback=1",
                               content_type="application/x-www-form-urlencoded"), 415)
    assert store.feedback_rows() == []


@pytest.mark.parametrize("raw", [b"{", b'{"feedback": [}', b"", b"\xff\xfe", b"NaN"])
def test_malformed_json_is_400(client, store, raw):
    assert_outcome(client.post(URL, data=raw, content_type="application/json"), 400)
    assert store.feedback_rows() == []


def test_deeply_nested_json_is_400(client, store):
    nested: dict = {}
    cursor = nested
    for _ in range(100):  # deeper than max_json_depth (64)
        cursor["x"] = {}
        cursor = cursor["x"]
    assert_outcome(post(client, entry(extension=nested)), 400)
    assert store.feedback_rows() == []


def test_get_on_feedback_is_405(client):
    assert_outcome(client.get(URL), 405)


# --- authentication -------------------------------------------------------------------------

def test_feedback_and_report_require_a_valid_jwt(make_app):
    app = make_app(auth_disabled=False)
    client = app.test_client()
    assert_outcome(client.post(URL, json={"feedback": [entry()]}), 401)
    assert_outcome(client.post(URL, json={"feedback": [entry()]},
                               headers={"Authorization": "Bearer not.a.jwt"}), 401)
    assert_outcome(client.get("/admin/feedback-report"), 401)
    assert services(app).store.feedback_rows() == []


def test_auth_is_checked_before_the_service_id(make_app):
    client = make_app(auth_disabled=False).test_client()
    assert_outcome(client.post("/cds-services/nope/feedback", json={}), 401)


# --- report: route and command --------------------------------------------------------------

def _seed_report(client) -> None:
    assert post(client, ACCEPTED, entry(card="card-2", overrideReason={"reason": REASON}),
                entry(card="ghost")).status_code == 200


def test_report_route_returns_per_kind_numbers(client, store):
    _seed_report(client)
    resp = client.get("/admin/feedback-report")
    assert resp.status_code == 200
    report = resp.get_json()
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert kinds["consider-b12-test"]["accepted"] == 1
    assert kinds["consider-b12-test"]["acceptance_rate"] == 1.0
    assert kinds["mechanical-first"]["overridden"] == 1
    assert kinds["mechanical-first"]["override_reasons"][0]["code"] == "already-tested"
    assert report["totals"]["issued"] == 2 and report["totals"]["acceptance_rate"] == 0.5
    assert report["unknown_card_feedback"] == {"entries": 1, "cards": 1}
    assert report == {**store.feedback_report(), "generated_at": report["generated_at"]}


def test_report_route_since(client, store):
    _seed_report(client)
    future = client.get("/admin/feedback-report?since=2999-01-01").get_json()
    assert future["since"] == "2999-01-01" and future["kinds"] == []
    past = client.get("/admin/feedback-report?since=2000-01-01").get_json()
    assert past["totals"]["issued"] == 2


@pytest.mark.parametrize("since", ["yesterday", "2024-13-01", "2024-1-1", "", "2024-01-01T00:00:00Z"])
def test_report_route_rejects_a_bad_since(client, since):
    assert_outcome(client.get(f"/admin/feedback-report?since={since}"), 400, "since")


def test_feedback_report_command(app, store, client, monkeypatch, capsys):
    _seed_report(client)
    monkeypatch.setenv("CDS_DATA_DIR", services(app).settings.data_dir)
    monkeypatch.delenv("CDS_DATABASE_URL", raising=False)

    assert cli.main(["feedback-report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["accepted"] == 1 and report["totals"]["overridden"] == 1

    assert cli.main(["feedback-report"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert any(line.split()[:6] == ["consider-b12-test", "1", "1", "1", "0", "100.0%"] for line in lines)
    assert any(line.split()[:6] == ["mechanical-first", "1", "1", "0", "1", "0.0%"] for line in lines)
    assert any(line.split()[:6] == ["TOTAL", "2", "2", "1", "1", "50.0%"] for line in lines)
    assert "Already tested" in table
    assert "never issued: 1 entries" in table

    assert cli.main(["feedback-report", "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"] == []
    with pytest.raises(SystemExit):
        cli.main(["feedback-report", "--since", "soon"])


def test_future_timestamps_are_accepted_only_within_the_clock_skew_allowance():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)

    def check(moment: datetime) -> None:
        ts = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        validate_feedback({"feedback": [entry(outcomeTimestamp=ts)]}, now=now)

    check(now + timedelta(seconds=FUTURE_SKEW_SECONDS))  # an EHR clock a little ahead
    check(now - timedelta(days=3650))  # old feedback is fine
    with pytest.raises(CdsError) as err:
        check(now + timedelta(seconds=FUTURE_SKEW_SECONDS, microseconds=1))
    assert err.value.status == 400 and err.value.expression == "feedback[0].outcomeTimestamp"


@pytest.mark.parametrize("since", ["\u0662\u0660\u0662\u0661-01-01", "2021-\uff10\uff11-01"])
def test_report_since_with_non_ascii_digits_is_400(client, since):
    resp = client.get("/admin/feedback-report", query_string={"since": since})
    assert assert_outcome(resp, 400)["expression"] == ["since"]
