"""The explanation is a view of the Evaluation the cards were built from: every fact with the
record entry behind it, what was not found, what could not be had, what was skipped."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from cds_service import rules
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine, Evaluation
from cds_service.explain import RULE_OF_REASON, RULES_TABLE, explain
from cds_service.facts import PatientFacts
from tests.fhir_builders import (
    NOW, RXNORM, SNOMED, b12_result, condition, days_before, hook_request, metformin, neck_pain, patient, record,
)

ENGINE = ClinicalEngine.load(Settings())
RULES_MD = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


def evaluate(*resources, unavailable=frozenset()):
    rec = record(*resources)
    rec = dataclasses.replace(rec, unavailable=frozenset(unavailable))
    return ENGINE.evaluate(rec, hook_request(), now=NOW)


def test_card_explanation_names_each_fact_with_its_record_entry() -> None:
    ev = evaluate(patient("1960-01-01"), neck_pain(id="np1", onset_days=200), metformin(id="met1"))
    assert ev.cards, "this patient gets a B12 test card"
    out = explain(ev)
    assert out["decision"]["kind"] == "b12-test" and out["decision"]["reason"] == rules.RISK_AND_SYMPTOMS
    assert out["decision"]["rule"] == "8" and out["decision"]["rules_table"] == RULES_TABLE
    [np] = out["facts"]["neck_pain"]
    assert np["reference"] == "Condition/np1" and np["system"] == SNOMED and np["code"] == "81680005"
    assert np["on"] == days_before(200).isoformat()
    [risk] = out["facts"]["risk_factors"]
    assert risk["key"] == "metformin" and risk["evidence"][0]["reference"] == "MedicationRequest/met1"
    assert risk["evidence"][0]["system"] == RXNORM
    assert out["cards"][0]["uuid"] == ev.cards[0].uuid and out["cards"][0]["kind"] == "b12-test"
    assert {m["fact"] for m in out["not_found"]} >= {"b12_results", "pending_orders", "red_flags"}
    json.dumps(out)  # plain data


def test_no_card_explanation_gives_the_reason_the_result_and_what_was_missing() -> None:
    ev = evaluate(patient("1960-01-01"), neck_pain(), metformin(),
                  b12_result(520, on=days_before(100), id="b12a"), unavailable={"procedures"})
    out = explain(ev, unavailable_wording={"procedures": "surgical procedures"})
    assert not ev.cards
    assert out["decision"]["kind"] is None and out["decision"]["reason"] == rules.RECENT_NORMAL
    assert out["decision"]["rule"] == "7b" and out["decision"]["b12_band"] == "normal"
    assert out["decision"]["b12_result"]["resource_id"] == "b12a" and out["decision"]["b12_result"]["value"] == 520
    assert out["unavailable"] == [{"key": "procedures", "what": "surgical procedures"}]
    assert out["cards"] == []


def test_skipped_invalid_entries_are_listed() -> None:
    bad = condition("81680005", id="broken")
    bad["onsetDateTime"] = "not-a-date"
    out = explain(evaluate(patient("1960-01-01"), bad))
    assert out["skipped_invalid"] == ["Condition/broken"]
    assert out["decision"]["reason"] == rules.NO_NECK_PAIN and out["decision"]["rule"] == "1"


def test_a_fact_added_later_shows_up_without_editing_explain() -> None:
    @dataclasses.dataclass(frozen=True)
    class MoreFacts(PatientFacts):
        smoker: bool = True

    ev = evaluate(patient("1960-01-01"), neck_pain())
    facts = MoreFacts(**{f.name: getattr(ev.facts, f.name) for f in dataclasses.fields(PatientFacts)})

    @dataclasses.dataclass(frozen=True)
    class MoreEvaluation(Evaluation):
        suppressed_by: str | None = "silent-mode"

    out = explain(MoreEvaluation(decision=ev.decision, cards=ev.cards, card_kinds=ev.card_kinds,
                                 skipped_resources=0, facts=facts))
    assert out["facts"]["smoker"] is True
    assert out["suppressed_by"] == "silent-mode"


def test_every_reason_code_has_its_row_in_the_rules_table() -> None:
    reasons = {v for k, v in vars(rules).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z0-9-]+", v)}
    assert reasons == set(RULE_OF_REASON), "a new reason code needs its rules-table row in RULE_OF_REASON"
    text = RULES_MD.read_text(encoding="utf-8")
    assert "## Rules, applied in order (the first that applies decides)" in text  # the anchor of RULES_TABLE
    rows = [(m.group(1), m.group(0)) for m in re.finditer(r"^\| (\w+) \|.*$", text, re.MULTILINE)]
    for reason, row in RULE_OF_REASON.items():
        in_row = any(n == row and f"`{reason}`" in line for n, line in rows)
        in_card_line = re.search(rf"`{reason}`\s+\(rule {row}\b", text)
        assert in_row or in_card_line, f"docs/rules.md does not give {reason} as rule {row}"


# --- over HTTP: demo and dev modes only ------------------------------------------------------

import pytest  # noqa: E402

from cds_service.http.hooks import EXPLANATION_EXTENSION  # noqa: E402
from cds_service.record import PREFETCH_KEYS  # noqa: E402
from tests.log_capture import service_log  # noqa: E402,F401 (fixture)
from tests.servers import hook_body, searchset  # noqa: E402


def _prefetch() -> dict:
    full = dict.fromkeys(PREFETCH_KEYS)
    full["patient"] = patient("1960-01-01", id="p1")
    full["conditions"] = searchset(neck_pain(id="np1", onset_days=200, patient_id="p1"))
    full["medicationRequests"] = searchset(metformin(id="met1", patient_id="p1"))
    return full


@pytest.mark.parametrize("mode", [{"dev_mode": True}, {"demo_mode": True}])
def test_hook_answer_carries_the_explanation_in_dev_and_demo_modes(make_app, mode, service_log) -> None:
    client = make_app(**mode).test_client()
    resp = client.post("/cds-services/b12-neck-pain-patient-view",
                       json=hook_body(patient_id="p1", prefetch=_prefetch()))
    assert resp.status_code == 200
    answer = resp.get_json()
    expl = answer["extension"][EXPLANATION_EXTENSION]
    assert expl["decision"]["kind"] == "b12-test" and expl["cards"][0]["uuid"] == answer["cards"][0]["uuid"]
    assert expl["facts"]["neck_pain"][0]["reference"] == "Condition/np1"
    assert expl["data_sources"]["prefetched"] == sorted(PREFETCH_KEYS)
    # The explanation holds record ids: none of it goes to the logs.
    assert service_log.events("hook"), "the hook's log line was captured"
    assert "np1" not in service_log.text and "met1" not in service_log.text and "81680005" not in service_log.text


def test_production_answer_has_no_explanation(make_app) -> None:
    client = make_app().test_client()
    resp = client.post("/cds-services/b12-neck-pain-patient-view",
                       json=hook_body(patient_id="p1", prefetch=_prefetch()))
    assert resp.status_code == 200
    assert "extension" not in resp.get_json() and resp.get_json()["cards"]
