"""Alert policy (cds_service/policy.py): suppression after feedback, encounter lockout, silent mode.

Everything goes through the HTTP endpoints as an EHR uses them (hook call, feedback, report), on
the real clock: the patients' dates are relative to today.  Expiry is tested with feedback whose
`outcomeTimestamp` lies in the past (a suppression runs from the outcome timestamp).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service import cli
from cds_service.app import services
from cds_service.policy import Situation
from tests.fhir_builders import ICD10CM, b12_result, condition, medication_request, patient
from tests.servers import Reply, StubServer

PV = "b12-neck-pain-patient-view"
OS = "b12-neck-pain-order-select"
OSIGN = "b12-neck-pain-order-sign"
OVERRIDE = "https://b12-neck-cds.example.org/CodeSystem/override-reason"
TODAY = datetime.now(timezone.utc).date()
PERIODS = json.loads((Path(__file__).resolve().parents[1] / "cards" / "suppression.json").read_text())


# --- patients and calls ------------------------------------------------------------------------

def chart(pid: str, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Chronic neck pain (120 days) + metformin: a b12-test card (info) unless `extra` changes it."""
    return [patient(date(1960, 1, 1), id=pid),
            condition("81680005", onset=TODAY - timedelta(days=120), patient_id=pid, id=f"{pid}-neck"),
            medication_request("6809", display="metformin", patient_id=pid, id=f"{pid}-met"), *extra]


def myelopathy(pid: str, rid: str = "flag") -> dict[str, Any]:
    return condition("202664003", display="Cervical myelopathy", patient_id=pid, id=f"{pid}-{rid}")


def paraesthesia(pid: str) -> dict[str, Any]:
    return condition("R20.2", ICD10CM, patient_id=pid, id=f"{pid}-para")


def low_b12(pid: str, days_ago: int, rid: str) -> dict[str, Any]:
    res = b12_result(150, on=TODAY - timedelta(days=days_ago), id=f"{pid}-{rid}")
    res["subject"] = {"reference": f"Patient/{pid}"}
    return res


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def prefetch(resources: list[dict[str, Any]]) -> dict[str, Any]:
    of = lambda t: [r for r in resources if r["resourceType"] == t]  # noqa: E731
    return {"patient": of("Patient")[0], "conditions": searchset(of("Condition")),
            "labResults": searchset(of("Observation")), "findings": None, "findingValues": None,
            "medicationRequests": searchset(of("MedicationRequest")), "medicationStatements": None,
            "procedures": None, "serviceRequests": None}


def hook(client: Any, pid: str, resources: list[dict[str, Any]], service: str = PV,
         encounter: str | None = None) -> list[dict[str, Any]]:
    hook_name = service.removeprefix("b12-neck-pain-")
    body: dict[str, Any] = {"hook": hook_name, "hookInstance": "0f6b0c43-5e49-4d55-9a57-4f1f5b2a7e01",
                            "context": {"userId": "Practitioner/u1", "patientId": pid},
                            "prefetch": prefetch(resources)}
    if encounter:
        body["context"]["encounterId"] = encounter
    if hook_name != "patient-view":
        body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    if hook_name == "order-select":
        body["context"]["selections"] = []
    resp = client.post(f"/cds-services/{service}", json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["cards"]


def ago(days: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def override(client: Any, card: dict[str, Any], code: str | None, *, days_ago: float = 0,
             system: str = OVERRIDE, comment: str | None = None, service: str = PV) -> None:
    entry: dict[str, Any] = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": ago(days_ago)}
    reason: dict[str, Any] = {}
    if code:
        reason["reason"] = {"system": system, "code": code, "display": f"display of {code}"}
    if comment:
        reason["userComment"] = comment
    if reason:
        entry["overrideReason"] = reason
    resp = client.post(f"/cds-services/{service}/feedback", json={"feedback": [entry]})
    assert resp.status_code == 200, resp.get_json()


def accept(client: Any, card: dict[str, Any], *, days_ago: float = 0) -> None:
    entry = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": ago(days_ago),
             "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}
    assert client.post(f"/cds-services/{PV}/feedback", json={"feedback": [entry]}).status_code == 200


def hook_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "hook"]


def report(client: Any) -> dict[str, Any]:
    return client.get("/admin/feedback-report").get_json()


# --- suppression per reason and its expiry -------------------------------------------------------

REASONS = [(code, days) for code, days in PERIODS["overridden"].items() if code != "already-treated"]


@pytest.mark.parametrize("code,days", REASONS, ids=[c for c, _ in REASONS])
def test_an_override_suppresses_the_card_kind_for_its_reasons_period(client, caplog, code, days):
    assert days > 1
    # Dismissed one day short of the period: still suppressed, for this patient only.
    (card,) = hook(client, "p-fresh", chart("p-fresh"))
    override(client, card, code, days_ago=days - 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cds_service"):
        assert hook(client, "p-fresh", chart("p-fresh")) == []
    (line,) = hook_logs(caplog)
    assert line.reason == "suppressed" and line.policy == "suppressed"
    assert line.withheld_by.startswith(f"overridden:{code}@{ago(days - 1)[:10]}")
    assert "p-fresh" not in json.dumps(line.__dict__, default=str)  # no patient id in the log
    assert len(hook(client, "p-other", chart("p-other"))) == 1

    # Dismissed one day more than the period ago: the suppression has run out.
    (card,) = hook(client, "p-expired", chart("p-expired"))
    override(client, card, code, days_ago=days + 1)
    assert len(hook(client, "p-expired", chart("p-expired"))) == 1

    kind = {k["kind"]: k for k in report(client)["kinds"]}["b12-test"]
    assert kind["suppressed"] == 1
    assert kind["suppressed_by_reason"] == [{"outcome": "overridden", "system": OVERRIDE, "code": code,
                                             "display": f"display of {code}", "count": 1}]


def test_the_stored_suppression_runs_from_the_outcome_timestamp_for_the_period(app, client):
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "tested-elsewhere", days_ago=10)
    (row,) = services(app).store.suppression_rows()
    start = datetime.strptime(row["feedback_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    until = datetime.strptime(row["until"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert until - start == timedelta(days=PERIODS["overridden"]["tested-elsewhere"])
    assert row["patient_hash"] != "p1" and "p1" not in json.dumps(row)
    assert (row["kind"], row["outcome"], row["reason_code"]) == ("b12-test", "overridden", "tested-elsewhere")


@pytest.mark.parametrize("how", ["no reason", "comment only", "another code system"])
def test_a_dismissal_without_one_of_our_reasons_suppresses_for_the_other_period(client, how):
    days = PERIODS["overridden_other"]
    for pid, days_ago, shown in (("p-in", days - 1, 0), ("p-out", days + 1, 1)):
        (card,) = hook(client, pid, chart(pid))
        if how == "no reason":
            override(client, card, None, days_ago=days_ago)
        elif how == "comment only":
            override(client, card, None, comment="seen by neurology", days_ago=days_ago)
        else:
            override(client, card, "tested-elsewhere", system="https://ehr.example.org/reasons",
                     days_ago=days_ago)
        assert len(hook(client, pid, chart(pid))) == shown, (pid, how)


def test_an_accepted_suggestion_suppresses_until_a_result_could_be_expected(client, caplog):
    days = PERIODS["accepted"]["b12-test"]
    (card,) = hook(client, "p-acc", chart("p-acc"))
    accept(client, card, days_ago=days - 1)
    with caplog.at_level(logging.INFO, logger="cds_service"):
        assert hook(client, "p-acc", chart("p-acc")) == []
    assert hook_logs(caplog)[-1].withheld_by.startswith("accepted:-@")
    (card,) = hook(client, "p-acc-old", chart("p-acc-old"))
    accept(client, card, days_ago=days + 1)
    assert len(hook(client, "p-acc-old", chart("p-acc-old"))) == 1


def test_later_feedback_replaces_the_suppression(client):
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "patient-declined", days_ago=PERIODS["overridden"]["patient-declined"] + 5)
    (card,) = hook(client, "p1", chart("p1"))  # expired: shown again, dismissed again
    override(client, card, "mechanical-cause")
    assert hook(client, "p1", chart("p1")) == []
    suppression = report(client)["suppressions"]
    assert suppression["active"] == 1 and suppression["created"] == 1
    (item,) = suppression["by_reason"]
    assert (item["kind"], item["code"], item["active"]) == ("b12-test", "mechanical-cause", 1)


# --- a changed situation breaks the suppression -------------------------------------------------

def test_new_red_flag_evidence_breaks_the_suppression(client, caplog):
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "mechanical-cause")
    assert hook(client, "p1", chart("p1")) == []
    with caplog.at_level(logging.INFO, logger="cds_service"):
        (card,) = hook(client, "p1", chart("p1", myelopathy("p1")))
    assert card["summary"].startswith("Red flags")
    assert hook_logs(caplog)[-1].withheld_by == "suppression:new-red-flags"


def test_red_flags_already_there_when_the_card_was_dismissed_do_not_break_it(client):
    (card,) = hook(client, "p1", chart("p1", myelopathy("p1")))
    override(client, card, "not-relevant")
    assert hook(client, "p1", chart("p1", myelopathy("p1"))) == []
    assert len(hook(client, "p1", chart("p1", myelopathy("p1"), myelopathy("p1", "second")))) == 1


def test_a_warning_where_the_dismissed_card_was_info_breaks_the_suppression(client):
    (card,) = hook(client, "p1", chart("p1"))
    assert card["indicator"] == "info"
    override(client, card, "patient-declined")
    (card,) = hook(client, "p1", chart("p1", paraesthesia("p1")))
    assert card["indicator"] == "warning"


def test_a_new_low_result_breaks_the_suppression_of_the_low_b12_card(client):
    first = low_b12("p1", 30, "b12-a")
    (card,) = hook(client, "p1", chart("p1", first))
    assert "low vitamin B12" in card["summary"]
    override(client, card, "already-treated")
    assert hook(client, "p1", chart("p1", first)) == []
    (card,) = hook(client, "p1", chart("p1", first, low_b12("p1", 2, "b12-b")))
    assert "low vitamin B12" in card["summary"]


def test_another_card_kind_is_not_suppressed(client):
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "tested-elsewhere")
    (card,) = hook(client, "p1", chart("p1", low_b12("p1", 3, "b12-new")))
    assert "low vitamin B12" in card["summary"]


def test_situation_fingerprints_carry_no_record_data(app, client):
    (card,) = hook(client, "p1", chart("p1", myelopathy("p1")))
    override(client, card, "not-relevant")
    (row,) = services(app).store.suppression_rows()
    situation = Situation.from_json(row["situation"])
    assert situation.indicator == "warning" and len(situation.red_flags) == 1 and situation.b12 is None
    assert "myelopathy" not in row["situation"].lower() and "p1" not in row["situation"]


# --- shared across app instances -------------------------------------------------------------------

def test_suppression_is_shared_by_two_apps_on_one_sqlite_database(make_app: Callable[..., Flask]):
    first, second = make_app().test_client(), make_app().test_client()
    (card,) = hook(first, "p1", chart("p1"))
    override(first, card, "tested-elsewhere")
    assert hook(second, "p1", chart("p1")) == []


# --- encounter lockout -------------------------------------------------------------------------------

def test_order_hooks_do_not_repeat_a_card_shown_in_the_same_encounter(client, caplog):
    assert len(hook(client, "p1", chart("p1"), PV, encounter="enc-1")) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cds_service"):
        assert hook(client, "p1", chart("p1"), OS, encounter="enc-1") == []
        assert hook(client, "p1", chart("p1"), OSIGN, encounter="enc-1") == []
    assert [r.reason for r in hook_logs(caplog)] == ["locked-out", "locked-out"]
    assert hook_logs(caplog)[0].withheld_by.startswith(f"shown by {PV}@")
    # another encounter, the chart itself, a changed situation: shown
    assert len(hook(client, "p1", chart("p1"), OS, encounter="enc-2")) == 1
    assert len(hook(client, "p1", chart("p1"), PV, encounter="enc-1")) == 1
    assert len(hook(client, "p1", chart("p1", myelopathy("p1")), OSIGN, encounter="enc-1")) == 1
    # without an encounter id there is nothing to lock to
    assert len(hook(client, "p1", chart("p1"), OS)) == 1
    assert {k["kind"]: k for k in report(client)["kinds"]}["b12-test"]["locked_out"] == 2


def test_a_card_shown_by_an_order_hook_locks_out_the_next_order_hook(client):
    assert len(hook(client, "p1", chart("p1"), OS, encounter="enc-1")) == 1
    assert hook(client, "p1", chart("p1"), OSIGN, encounter="enc-1") == []


def test_lockout_zero_turns_it_off(make_app):
    client = make_app(encounter_lockout_hours=0).test_client()
    assert len(hook(client, "p1", chart("p1"), PV, encounter="enc-1")) == 1
    assert len(hook(client, "p1", chart("p1"), OS, encounter="enc-1")) == 1


# --- silent mode ----------------------------------------------------------------------------------------

def test_silent_service_evaluates_and_records_but_returns_no_card(make_app, caplog):
    client = make_app(silent_services=PV).test_client()
    with caplog.at_level(logging.INFO, logger="cds_service"):
        assert hook(client, "p1", chart("p1"), PV, encounter="enc-1") == []
    line = hook_logs(caplog)[-1]
    assert (line.reason, line.withheld_by) == ("silent", "CDS_SILENT_SERVICES")
    # a silent card was never shown: it neither locks out the order hooks nor counts as issued
    assert len(hook(client, "p1", chart("p1"), OS, encounter="enc-1")) == 1
    kind = {k["kind"]: k for k in report(client)["kinds"]}["b12-test"]
    assert (kind["issued"], kind["silent"]) == (1, 1)
    assert report(client)["withheld"] == {"silent": 1, "suppressed": 0, "locked_out": 0}


def test_silent_card_kind_spares_the_other_kinds(make_app):
    client = make_app(silent_card_kinds="b12-test").test_client()
    assert hook(client, "p1", chart("p1")) == []
    assert hook(client, "p1", chart("p1"), OSIGN) == []
    (card,) = hook(client, "p2", chart("p2", low_b12("p2", 3, "b")))
    assert "low vitamin B12" in card["summary"]
    kinds = {k["kind"]: k for k in report(client)["kinds"]}
    assert kinds["b12-test"]["silent"] == 2 and kinds["b12-test"]["issued"] == 0
    assert kinds["low-b12"]["issued"] == 1 and kinds["low-b12"]["silent"] == 0


@pytest.mark.parametrize("setting", [{"silent_services": "b12-neck-pain-patient-veiw"},
                                     {"silent_card_kinds": "b12"}, {"encounter_lockout_hours": -1}])
def test_a_mistyped_governance_setting_fails_at_start(make_app, setting):
    with pytest.raises(ValueError):
        make_app(**setting)


def test_feedback_report_command_lists_withheld_cards_and_suppressions(make_app, tmp_path, monkeypatch, capsys):
    client = make_app(silent_card_kinds="low-b12").test_client()
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "tested-elsewhere")
    hook(client, "p1", chart("p1"))
    hook(client, "p2", chart("p2", low_b12("p2", 3, "b")))
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDS_DATABASE_URL", raising=False)
    assert cli.main(["feedback-report"]) == 0
    text = capsys.readouterr().out
    assert "low-b12: 1 silent (would have been shown), 0 suppressed, 0 locked out" in text
    assert "suppressed after overridden: display of tested-elsewhere" in text
    assert "Suppressions from feedback: 1 created, 1 active now" in text


# --- the store read ---------------------------------------------------------------------------------

def test_the_policy_read_is_one_statement_on_indexes(app):
    store = services(app).store
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    now = datetime.now(timezone.utc)
    store.policy_records("p1", "b12-test", now, "enc-1", now - timedelta(hours=24))
    assert len(statements) == 1 and statements[0].startswith("SELECT")
    store._connection().set_trace_callback(None)
    sql = statements[0]
    plan = " ".join(str(r[-1]) for r in store._connection().execute("EXPLAIN QUERY PLAN " + sql).fetchall())
    assert "SCAN" not in plan, plan
    assert "sqlite_autoindex_suppressions" in plan and "issued_cards_encounter" in plan


# --- b12-cds evaluate explains a suppressed card ------------------------------------------------------

@pytest.fixture
def fhir_stub():
    resources = chart("p1")
    with StubServer() as stub:
        stub.route("/fhir/Patient/p1", Reply(body=resources[0]))
        stub.route("/fhir/Condition", Reply(body=searchset([resources[1]])))
        stub.route("/fhir/MedicationRequest", Reply(body=searchset([resources[2]])))
        for rtype in ("Observation", "MedicationStatement", "Procedure", "ServiceRequest", "Medication"):
            stub.route(f"/fhir/{rtype}", Reply(body=searchset([])))
        yield stub.base + "/fhir"


def test_evaluate_says_suppressed_with_the_feedback_that_caused_it(app, client, tmp_path, fhir_stub,
                                                                      monkeypatch, capsys):
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "tested-elsewhere", days_ago=3)
    withheld_before = services(app).store.feedback_report()["withheld"]
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDS_DATABASE_URL", raising=False)

    assert cli.main(["evaluate", "--fhir-server", fhir_stub, "--patient", "p1", "--use-store"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("No cards: suppressed.")
    assert f"overridden on {ago(3)[:10]} (reason: tested-elsewhere (display of tested-elsewhere)" in text

    assert cli.main(["evaluate", "--fhir-server", fhir_stub, "--patient", "p1", "--use-store", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["cards"] == []
    explanation = answer["explanation"]
    assert explanation["reason"] == "suppressed"
    assert (explanation["decision"]["reason"], explanation["decision"]["kind"]) == ("risk-and-symptoms", "b12-test")
    policy = explanation["policy"]
    assert policy["delivery"] == "suppressed"
    cause = policy["cause"]
    assert (cause["source"], cause["outcome"], cause["reason_code"]) == ("feedback", "overridden", "tested-elsewhere")
    assert cause["since"][:10] == ago(3)[:10]
    # --use-store reads the service's store and writes nothing to it
    assert services(app).store.feedback_report()["withheld"] == withheld_before

    # Without --use-store: a throwaway store, so the rules' card is shown.
    assert cli.main(["evaluate", "--fhir-server", fhir_stub, "--patient", "p1", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["cards"]) == 1 and answer["explanation"]["reason"] == "risk-and-symptoms"


def test_evaluate_with_an_encounter_says_locked_out(app, client, tmp_path, fhir_stub, monkeypatch, capsys):
    assert len(hook(client, "p1", chart("p1"), PV, encounter="enc-7")) == 1
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDS_DATABASE_URL", raising=False)
    assert cli.main(["evaluate", "--fhir-server", fhir_stub, "--patient", "p1", "--hook", "order-sign",
                     "--encounter", "enc-7", "--use-store"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"No cards: locked-out. The rules chose a b12-test card, already shown in this "
                           f"encounter by {PV}")


def test_suppression_periods_are_checked_at_start(make_app, tmp_path):
    cards = tmp_path / "cards"
    shutil.copytree(Path(__file__).resolve().parents[1] / "cards", cards)
    periods = json.loads((cards / "suppression.json").read_text())
    periods["overridden"]["no-such-reason"] = 10
    (cards / "suppression.json").write_text(json.dumps(periods))
    with pytest.raises(ValueError, match="unknown override reasons"):
        make_app(cards_dir=str(cards))
    (cards / "suppression.json").unlink()
    with pytest.raises(ValueError, match="suppression.json is missing"):
        make_app(cards_dir=str(cards))


def test_a_deployment_can_change_a_period(make_app, tmp_path):
    cards = tmp_path / "cards"
    shutil.copytree(Path(__file__).resolve().parents[1] / "cards", cards)
    periods = json.loads((cards / "suppression.json").read_text())
    periods["overridden"]["tested-elsewhere"] = 0  # 0: this reason does not suppress
    (cards / "suppression.json").write_text(json.dumps(periods))
    client = make_app(cards_dir=str(cards)).test_client()
    (card,) = hook(client, "p1", chart("p1"))
    override(client, card, "tested-elsewhere")
    assert len(hook(client, "p1", chart("p1"))) == 1
