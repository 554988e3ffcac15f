"""Cards: content order, honest wording, escaping of record text, the ServiceRequest suggestion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest

from cds_service.cards import safe_text
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine, Evaluation
from cds_service.record import PREFETCH_KEYS
from tests.fhir_builders import (
    ICD10CM, NOW, SNOMED, b12_result, condition, days_before, hook_request, medication_request, metformin,
    neck_pain, observation, patient, procedure, record, years_before,
)

OVERRIDE_SYSTEM = "https://b12-neck-cds.example.org/CodeSystem/override-reason"


@pytest.fixture(scope="module")
def engine() -> ClinicalEngine:
    return ClinicalEngine.load(Settings())


def run(engine: ClinicalEngine, *resources, request=None, unavailable=frozenset(), draft_orders=()) -> Evaluation:
    return engine.evaluate(record(*resources, unavailable=unavailable, draft_orders=draft_orders),
                           request or hook_request(), NOW)


def only_card(ev: Evaluation):
    assert len(ev.cards) == 1, ev.decision
    return ev.cards[0]


def service_request_of(card) -> dict:
    (suggestion,) = card.model().suggestions
    (action,) = suggestion.actions
    assert action.type == "create"
    return action.resource


# --- summary -------------------------------------------------------------------------------------

def test_b12_card_summary_names_situation_and_top_risk_factors(engine) -> None:
    card = only_card(run(engine, neck_pain(onset_days=200), metformin(),
                         observation(code_text="Diet", value_code=(SNOMED, "1255165006"))))
    # no NICE-listed symptom documented: the card asks about symptoms and does not pre-select the order
    assert card.summary == ("Chronic neck pain with B12 risk factors (metformin, vegan/vegetarian diet): "
                            "ask about neurological symptoms; B12 test if present")
    assert card.indicator == "info"
    assert card.model().suggestions[0].isRecommended is False


def test_summary_stays_under_140_chars_with_many_risk_factors(engine) -> None:
    ev = run(engine, patient(years_before(80)), neck_pain(onset_days=5), condition("91019004"), metformin(),
             medication_request("7646"), condition("Z98.84", ICD10CM), condition("K90.0", ICD10CM),
             condition("765021002"), condition("E11.9", ICD10CM), condition("F10.20", ICD10CM))
    card = only_card(ev)
    assert len(card.summary) < 140
    assert card.summary.startswith("Neck pain with neuropathic features")
    assert "metformin" in card.summary and "more" in card.summary


def test_low_card_summary_has_value_and_date_and_no_suggestion(engine) -> None:
    card = only_card(run(engine, neck_pain(), b12_result(120, unit="pmol/L", loinc="14685-2", on=days_before(30))))
    # the laboratory's unit first, the ng/L equivalent in brackets (summary and detail)
    assert "120 pmol/L (163 ng/L) on " + days_before(30).isoformat() in card.summary
    assert card.indicator == "warning"
    assert card.model().suggestions is None and card.model().selectionBehavior is None
    assert "B12 120 pmol/L (163 ng/L) on" in card.detail


def test_mma_card_suggests_mma(engine) -> None:
    card = only_card(run(engine, neck_pain(), metformin(), b12_result(300, on=days_before(100))))
    sr = service_request_of(card)
    assert sr["code"]["coding"][0]["code"] == "13964-2"
    assert "indeterminate (180-350 ng/L)" in card.detail


# --- detail ordering and honesty -----------------------------------------------------------------

def test_detail_order_red_flags_then_mechanical_then_risks_then_results_then_note(engine) -> None:
    card = only_card(run(engine, neck_pain(), metformin(), condition("202664003", display="Cervical myelopathy"),
                         condition("39848009", onset=days_before(150), display="Whiplash"), condition("91019004"),
                         b12_result(300, on=days_before(200))))
    d = card.detail
    positions = [d.index(s) for s in ("Red flags documented", "Mechanical causes (after the red flags)", "B12 risk factors",
                                      "Neuropathic features", "Latest B12 / MMA results", "evidence linking")]
    assert positions == sorted(positions)
    assert f"Whiplash ({days_before(150).isoformat()})" in d
    assert card.indicator == "warning"


def test_mechanical_reminder_when_none_documented_and_no_red_flag_section(engine) -> None:
    card = only_card(run(engine, neck_pain(), metformin()))
    assert "posture" in card.detail and "spondylosis" in card.detail and "stenosis" in card.detail
    assert "Red flags" not in card.detail
    assert card.detail.index("Mechanical causes first") < card.detail.index("B12 risk factors")


def test_detail_is_honest_about_indirect_evidence(engine) -> None:
    detail = only_card(run(engine, neck_pain(), metformin())).detail
    assert "indirect" in detail and "neuropathy" in detail and "myelopathy" in detail
    assert "does not treat neck pain" in detail
    assert not re.search(r"\b(causes neck pain|cure|proven)\b", detail, re.I)
    # chronic neck pain alone does not meet the NICE "symptom + risk factor" criterion: say so
    assert "Neck pain by itself is not a listed symptom" in detail


def test_advice_does_not_ask_for_symptoms_already_documented(engine) -> None:
    detail = only_card(run(engine, neck_pain(), metformin(), condition("91019004"))).detail  # paresthesia
    assert "Neck pain by itself is not a listed symptom" not in detail
    assert "such as those documented above" in detail


def test_risk_factor_evidence_is_listed(engine) -> None:
    detail = only_card(run(engine, neck_pain(), procedure("53442002", performed=days_before(4000)),
                           medication_request(text="Metformin 1 g tablets"))).detail
    assert "- metformin: Metformin 1 g tablets" in detail
    assert f"gastric/ileal surgery: Gastrectomy \\(procedure\\) ({days_before(4000).isoformat()})" in detail


@pytest.mark.parametrize("key", PREFETCH_KEYS)
def test_unavailable_data_is_named(engine, key: str) -> None:
    wording = json.loads((Path(Settings().cards_dir) / "common.json").read_text())["unavailable_data"][key]
    card = only_card(run(engine, neck_pain(), metformin(), unavailable={key}))
    assert "Could not be checked" in card.detail and wording in card.detail


def test_no_unavailable_section_when_everything_was_read(engine) -> None:
    assert "Could not be checked" not in only_card(run(engine, neck_pain(), metformin())).detail


# --- escaping -------------------------------------------------------------------------------------

INJECTIONS = [
    "[click me](https://evil.example/x)",
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script> neck",
    "![pixel](http://evil.example/p.png)",
    "see https://evil.example and www.evil.example",
    "**bold** _it_ `code` # heading | table",
    "<a href='javascript:alert(1)'>x</a>",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_record_text_cannot_inject_links_or_html(engine, payload: str) -> None:
    card = only_card(run(engine, condition("81680005", display=payload, onset=days_before(100)),
                         medication_request(text=f"metformin {payload}"),
                         condition("39848009", text=payload)))
    d = card.detail
    assert "<" not in d and ">" not in d
    assert not re.search(r"(?<!\\)\[", d), "unescaped [ could open a link"
    assert not re.search(r"(?i)(https?|javascript):(?!\\)", d.replace("https://www.nice", "")), d
    assert "www.evil" not in d
    assert "](" not in d.replace("\\](", "")


def test_safe_text_keeps_plain_text_readable() -> None:
    assert safe_text("Metformin 500 mg tablets") == "Metformin 500 mg tablets"
    assert safe_text("line1\n\n# line2") == "line1 \\# line2"
    assert len(safe_text("x" * 500)) <= 120


# --- suggestion ServiceRequest ----------------------------------------------------------------------

def test_service_request_is_valid_and_complete(engine) -> None:
    request = hook_request(encounter_id="enc-7", user_id="PractitionerRole/role-3")
    card = only_card(run(engine, neck_pain(id="np-1"), neck_pain(system=ICD10CM, id="np-2"), metformin(),
                         condition("R20.2", ICD10CM), request=request))
    sr = service_request_of(card)
    ServiceRequest.model_validate(sr)
    assert sr["status"] == "draft" and sr["intent"] == "proposal"
    assert sr["code"]["coding"][0] == {"system": "http://loinc.org", "code": "2132-9",
                                       "display": "Cobalamin (Vitamin B12) [Mass/volume] in Serum or Plasma"}
    assert sr["subject"] == {"reference": "Patient/p1"}
    assert sr["reasonReference"] == [{"reference": "Condition/np-1"}, {"reference": "Condition/np-2"}]
    assert sr["encounter"] == {"reference": "Encounter/enc-7"}
    assert sr["requester"] == {"reference": "PractitionerRole/role-3"}
    assert card.model().selectionBehavior == "at-most-one" and card.model().suggestions[0].isRecommended


def test_no_encounter_and_no_requester_for_a_patient_user(engine) -> None:
    sr = service_request_of(only_card(run(engine, neck_pain(), metformin(),
                                          request=hook_request(user_id="Patient/p1"))))
    assert "encounter" not in sr and "requester" not in sr


def test_order_code_and_intent_come_from_settings() -> None:
    engine = ClinicalEngine.load(Settings(b12_order_loinc="14685-2", order_intent="order"))
    sr = service_request_of(only_card(run(engine, neck_pain(), metformin())))
    assert sr["code"]["coding"][0]["code"] == "14685-2" and sr["intent"] == "order"


def test_an_invalid_intent_fails_at_load() -> None:
    with pytest.raises(ValueError, match="order_intent"):
        ClinicalEngine.load(Settings(order_intent="whenever"))


def test_an_invalid_suggestion_is_dropped_not_the_card(engine, monkeypatch) -> None:
    # Make every intent unacceptable: the ServiceRequest cannot be built, the card still shows.
    from cds_service import cards as cards_mod
    monkeypatch.setattr(cards_mod, "REQUEST_INTENTS", frozenset())
    card = only_card(run(engine, neck_pain(), metformin()))
    assert card.model().suggestions is None and card.model().selectionBehavior is None


def test_order_loinc_outside_the_b12_valueset_fails_at_load() -> None:
    with pytest.raises(ValueError, match="b12_order_loinc"):
        ClinicalEngine.load(Settings(b12_order_loinc="16695-9"))


# --- source, links, override reasons, uuids -------------------------------------------------------

def test_source_links_override_reasons_and_uuids(engine) -> None:
    ev = run(engine, neck_pain(), metformin())
    card = only_card(ev)
    body = card.to_json()
    assert body["source"]["url"] == "https://www.nice.org.uk/guidance/ng239"
    assert body["source"]["topic"]["code"] == "b12-neck-pain"
    assert body["links"] == [{"label": "NICE NG239: Vitamin B12 deficiency in over 16s",
                              "url": "https://www.nice.org.uk/guidance/ng239", "type": "absolute"}]
    codes = {r["code"] for r in body["overrideReasons"]}
    assert {"tested-elsewhere", "mechanical-cause", "patient-declined", "not-relevant"} == codes
    assert all(r["system"] == OVERRIDE_SYSTEM and r["display"] for r in body["overrideReasons"])
    assert re.fullmatch(r"[0-9a-f-]{36}", body["uuid"]) and re.fullmatch(r"[0-9a-f-]{36}", body["suggestions"][0]["uuid"])
    assert ev.card_kinds == {card.uuid: "b12-test"}


def test_each_evaluation_gets_fresh_uuids(engine) -> None:
    a = only_card(run(engine, neck_pain(), metformin()))
    b = only_card(run(engine, neck_pain(), metformin()))
    assert a.uuid != b.uuid and a.model().suggestions[0].uuid != b.model().suggestions[0].uuid


def test_card_texts_cover_every_prefetch_key_and_kind() -> None:
    cards_dir = Path(Settings().cards_dir)
    common = json.loads((cards_dir / "common.json").read_text())
    assert set(PREFETCH_KEYS) <= set(common["unavailable_data"])
    for kind in ("low-b12", "mma-test", "b12-test"):
        spec = json.loads((cards_dir / f"{kind}.json").read_text())
        assert spec["kind"] == kind
        assert set(spec["override_reasons"]) <= set(common["override_reasons"])


def test_red_flags_lead_the_summary(engine) -> None:
    card = only_card(run(engine, neck_pain(), metformin(), condition("202664003")))  # cervical myelopathy
    assert card.summary.startswith("Red flags: assess urgently and check B12 alongside")
    assert "metformin" in card.summary and len(card.summary) < 140
    assert card.indicator == "warning"


# --- clinician review: red-flag cards -----------------------------------------------------------

def _myelopathy_card(engine_for_review):
    from tests.fhir_builders import condition, metformin, neck_pain, patient, record, hook_request, NOW
    rec = record(patient("1960-01-01"), neck_pain(onset_days=10, id="np"), metformin(id="met"),
                 condition("202664003", id="my"), condition("83561009", id="sten"))
    return engine_for_review.evaluate(rec, hook_request(), NOW)


def test_myelopathy_is_not_called_no_neurological_feature_and_cannot_be_dismissed_as_mechanical() -> None:
    """A red-flag myelopathy is itself a neurological sign B12 deficiency can cause: the card must
    not say 'None documented' under it, nor offer 'a mechanical cause explains the symptoms' (a
    stenosis does not rule out subacute combined degeneration; that dismissal hides the card)."""
    from cds_service.config import Settings
    from cds_service.engine import ClinicalEngine

    engine = ClinicalEngine.load(Settings())
    ev = _myelopathy_card(engine)
    (card,) = ev.cards
    assert card.indicator == "warning"
    neuro_section = card.detail.split("**Neuropathic features**", 1)[1].split("**", 1)[0]
    assert "None documented" not in neuro_section and "red flags above" in neuro_section
    codes = [r.code for r in card.model().overrideReasons]
    assert "mechanical-cause" not in codes and "tested-elsewhere" in codes
