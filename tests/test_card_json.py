"""The hot path's card JSON: byte for byte what the pydantic-built cards answered, and valid
against the CDS Hooks card model, for every card kind and decision.

`tests/reference_cards.py` is cards.py as it was when every card went through the pydantic
models: the oracle.  Cards are compared as `cards_response` serialised with orjson (what the
service sends), uuids masked; a builder that raises must raise for the oracle too.
"""

from __future__ import annotations

import itertools
import re
import uuid
from dataclasses import replace
from datetime import date
from decimal import Decimal

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from cds_service import cards, protocol
from cds_service.cards import CARD_KINDS, CardBuilder, RenderedCard, safe_text
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.facts import Evidence, LabResult, PatientFacts, RiskFactor
from cds_service.protocol import HookContext
from cds_service.record import PREFETCH_KEYS
from cds_service.rules import Decision, decide
from tests import reference_cards

ENGINE = ClinicalEngine.load(Settings())
TEXTS, KNOWLEDGE = ENGINE.texts, ENGINE.knowledge
SETTINGS = {
    "default": Settings(),
    "other": Settings(order_intent="proposal", b12_order_loinc="14685-2", b12_low_below_ng_l=150.5,
                      b12_normal_above_ng_l=400, active_b12_low_below_pmol_l=30,
                      active_b12_normal_above_pmol_l=70.5, recent_test_days=90),
}
BUILDERS = {name: (reference_cards.CardBuilder(TEXTS, KNOWLEDGE, s, ENGINE.verdicts),
                   CardBuilder(TEXTS, KNOWLEDGE, s, ENGINE.verdicts)) for name, s in SETTINGS.items()}
UUID = re.compile(rb'"uuid":"([0-9a-f-]{36})"')

HOSTILE = [
    "[click](https://evil.example/x)", "<img src=x onerror=alert(1)>", "<script>alert(1)</script>Metformin",
    "**bold** _it_ `code` ~~strike~~ |a|b|", "# Heading\n\n- item\n> quote", "visit www.evil.example now",
    "javascript://%0aalert(1)", "a & b < c > d &amp; &lt;x&gt;", "![img](http://x/y.png)", "back\\slash {x} (y)",
    "Type 2 diabetes mellitus without complications", "24 HR metformin hydrochloride 500 MG Extended Release",
    "café µg/L – naïve “quotes”", "  spaced\tout\r\ntext  ", "x" * 130, "y " * 300, "z" * 600, "", " ",
    "{risks} {value} {0}", "%s %d", "\u202eevil\u202c", "a\u00a0b\u2028c",
]
# Record text reaches the cards through orjson, which refuses lone surrogates (category Cs).
text = st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(blacklist_categories=("Cs",)), max_size=160))
dates = st.one_of(st.none(), st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31)))
ids = st.one_of(st.none(), st.sampled_from(["c1", "np-1", "a.b", "x" * 64]), st.text(max_size=8))
evidence = st.builds(
    Evidence, valueset=st.sampled_from(["neck-pain", "metformin", "red-flags", "neuropathic", "x"]),
    label=text, resource_type=st.sampled_from(["Condition", "Observation", "MedicationRequest", "Procedure"]),
    resource_id=ids, on=dates, system=st.sampled_from([None, "http://snomed.info/sct"]),
    code=st.sampled_from([None, "81680005"]))


def evidences(max_size: int = 7):
    # repeats on purpose: the bullets list each distinct entry once
    return st.lists(evidence, max_size=max_size).flatmap(
        lambda xs: st.lists(st.sampled_from(xs), max_size=2).map(lambda extra: tuple(xs + extra))
        if xs else st.just(()))


numbers = st.one_of(st.none(), st.integers(-5, 100_000).map(float),
                    st.floats(min_value=-1e6, max_value=1e9, allow_nan=False, allow_infinity=False))
units = st.one_of(st.none(), st.sampled_from(["pg/mL", "ng/L", "pmol/L", "umol/L", "µmol/L", "nmol/L", "mg/dL",
                                              "<b>pg/mL</b>", "[x](y)", "pg/mL" * 10, ""]), st.text(max_size=12))
lab = st.builds(
    LabResult, resource_id=ids, loinc=st.sampled_from(["2132-9", "14685-2", "13964-2", "72160-5"]), on=dates,
    value=numbers, unit=units, comparator=st.sampled_from([None, "<", "<=", ">", ">=", "=", "ad"]),
    value_ng_l=numbers, analyte=st.sampled_from(["b12", "active-b12", "mma", "other"]), canonical=numbers,
    canonical_unit=st.sampled_from([None, "ng/L", "pmol/L", "nmol/L", "umol/L"]),
    value_text=st.one_of(st.none(), st.sampled_from(["245", "245.0", "0,36", "<200", "+3", "-.5", "abc"]),
                         st.text(max_size=6)),
    implausible=st.booleans(), pending=st.booleans())
labs = st.lists(lab, max_size=3).map(tuple)
risk = st.builds(RiskFactor, key=st.sampled_from(sorted(TEXTS.common["risk_factor_labels"])),
                 evidence=evidences(7), note=st.sampled_from([None, "duration-unknown", "unknown-note"]))


@st.composite
def patient_facts(draw) -> PatientFacts:
    red_flags = draw(evidences(3))
    return PatientFacts(
        patient_id=draw(st.sampled_from(["p1", "pat-123", "a.b-c", "x" * 64])),
        today=date(2026, 1, 1), age_years=draw(st.one_of(st.none(), st.integers(0, 120))),
        neck_pain=draw(evidences(3)), chronic=draw(st.booleans()), neck_pain_onset=draw(dates),
        neuropathic=draw(evidences(3)), mechanical=draw(evidences(7)), compressive=draw(evidences(7)),
        red_flags=red_flags, risk_factors=tuple(draw(st.lists(risk, max_size=9))),
        already_handled=draw(evidences(2)), b12_results=draw(labs), mma_results=draw(labs),
        pending_orders=draw(evidences(2)), active_b12_results=draw(labs),
        pending_results=draw(st.lists(lab, max_size=7).map(tuple)), pregnancy=draw(evidences(2)),
        unavailable=frozenset(draw(st.lists(st.one_of(st.sampled_from(PREFETCH_KEYS), text), max_size=4))),
        neurological_red_flags=red_flags if draw(st.booleans()) else draw(evidences(2)),
        peripheral_neuropathy=draw(evidences(2)), suspected_deficiency=draw(evidences(2)))


REASONS = ["risk-and-symptoms", "low-b12", "indeterminate-b12", "low-total-b12-in-pregnancy",
           "indeterminate-total-b12-in-pregnancy", "suspected-deficiency", "anything"]


@st.composite
def decision_for(draw, facts: PatientFacts, settings_: Settings) -> Decision:
    """What the rules choose for these facts, else a decision of a random kind with the results,
    reasons and suggestions the rules give that kind (and now and then any combination at all)."""
    how = draw(st.sampled_from(["rules", "coherent", "coherent", "any"]))
    if how == "rules":
        return decide(facts, settings_)
    results = facts.b12_results + facts.active_b12_results
    result = draw(st.sampled_from(results) if results else lab)
    kind = draw(st.sampled_from(CARD_KINDS))
    reasons, suggest = {"low-b12": (["low-b12"], [None]), "mma-test": (["indeterminate-b12"], ["mma"]),
                        "b12-test": (REASONS, ["b12", "active-b12"])}[kind]
    if how == "any":
        reasons, suggest = REASONS, [None, "b12", "active-b12", "mma"]
    if kind == "low-b12" and how != "any":
        result = replace(result, analyte=draw(st.sampled_from(["b12", "active-b12"])))
    return Decision(kind=kind, reason=draw(st.sampled_from(reasons)),
                    indicator=draw(st.sampled_from([None, "info", "warning"])),
                    b12_result=draw(st.one_of(st.just(result), st.none())) if kind != "low-b12" else result,
                    recommended=draw(st.booleans()), suggest=draw(st.sampled_from(suggest)))


contexts = st.builds(HookContext, user_id=st.sampled_from(["Practitioner/doc1", "PractitionerRole/r-2", "Patient/p1",
                                                           "Practitioner/", "RelatedPerson/x"]),
                     patient_id=st.just("p1"), encounter_id=st.sampled_from([None, "enc-1"]))


def answer(builder, decision: Decision, facts: PatientFacts, context: HookContext):
    """What the service would send: the serialised answer, or the kind of error raised."""
    try:
        card = builder.build(decision, facts, context)
    except ValueError:  # the card models' ValidationError is a ValueError too
        return "ValueError", None
    except Exception as err:  # noqa: BLE001 - whatever the oracle raises, the new path must raise too
        return type(err).__name__, None
    if card is None:
        return None, None
    return orjson.dumps(protocol.cards_response([card])), card


def check_same_answer(settings_name: str, decision: Decision, facts: PatientFacts, context: HookContext) -> None:
    old_builder, new_builder = BUILDERS[settings_name]
    old, _ = answer(old_builder, decision, facts, context)
    new, card = answer(new_builder, decision, facts, context)
    if not isinstance(old, bytes):
        assert new == old
        return
    assert UUID.sub(b'"uuid":"-"', new) == UUID.sub(b'"uuid":"-"', old)
    assert isinstance(card, RenderedCard)
    # The new card is a valid protocol.Card, and the model's own JSON is exactly what is sent.
    assert orjson.dumps(protocol.cards_response([card.model()])) == new
    uuids = [uuid.UUID(u.decode()) for u in UUID.findall(new)]
    assert all(u.version == 4 for u in uuids) and len(set(uuids)) == len(uuids)
    assert card.suggestion_uuids == tuple(s["uuid"] for s in card.json.get("suggestions", ()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), facts=patient_facts(), context=contexts,
       settings_name=st.sampled_from(sorted(SETTINGS)))
def test_card_json_is_what_the_pydantic_cards_answered(data, facts, context, settings_name) -> None:
    decision = data.draw(decision_for(facts, SETTINGS[settings_name]))
    check_same_answer(settings_name, decision, facts, context)


# --- every card kind and decision, deterministically --------------------------------------------

def _ev(label: str, rid: str | None = "r1", on: date | None = date(2025, 3, 4), vs: str = "x") -> Evidence:
    return Evidence(vs, label, "Condition", rid, on)


TOTAL_LOW = LabResult("l1", "2132-9", date(2025, 12, 1), 120.0, "pmol/L", value_ng_l=162.6, canonical=162.6,
                      canonical_unit="ng/L", value_text="120")
TOTAL_INDET = LabResult("l2", "2132-9", date(2025, 11, 1), 245.0, "pg/mL", comparator="<", value_ng_l=245.0,
                        canonical=245.0, canonical_unit="ng/L", value_text="245")
ACTIVE_LOW = LabResult("l3", "72160-5", None, 18.0, "pmol/L", analyte="active-b12", canonical=18.0,
                       canonical_unit="pmol/L", value_text="18")
MMA = LabResult("l4", "13964-2", date(2025, 10, 1), 0.36, "umol/L", analyte="mma", canonical=360.0,
                canonical_unit="nmol/L", value_text="0.36")
PENDING = replace(TOTAL_INDET, pending=True, resource_id="l5")
IMPLAUSIBLE = replace(TOTAL_LOW, implausible=True, value=99999.0, value_text="99999", resource_id="l6")

DECISIONS = {
    "low-total": Decision("low-b12", "low-b12", "warning", TOTAL_LOW),
    "low-active": Decision("low-b12", "low-b12", "warning", ACTIVE_LOW),
    "mma": Decision("mma-test", "indeterminate-b12", "info", TOTAL_INDET, recommended=False, suggest="mma"),
    "mma-recommended": Decision("mma-test", "indeterminate-b12", "warning", TOTAL_INDET, recommended=True,
                                suggest="mma"),
    "b12": Decision("b12-test", "risk-and-symptoms", "info", recommended=False, suggest="b12"),
    "b12-recommended": Decision("b12-test", "risk-and-symptoms", "info", recommended=True, suggest="b12"),
    "active-b12": Decision("b12-test", "risk-in-pregnancy", "info", recommended=True, suggest="active-b12"),
    "pregnancy-low-total": Decision("b12-test", "low-total-b12-in-pregnancy", "warning", TOTAL_LOW,
                                    recommended=True, suggest="active-b12"),
    "pregnancy-indeterminate": Decision("b12-test", "indeterminate-total-b12-in-pregnancy", "info", TOTAL_INDET,
                                        recommended=True, suggest="active-b12"),
}
FLAGS = ("red_flags", "pregnancy", "suspected", "mechanical", "neuropathic", "lots")


def facts_with(flags: frozenset[str]) -> PatientFacts:
    hostile = _ev("[click](https://evil.example) <b>x</b> **y**", rid="hostile")
    lots = "lots" in flags
    red = (_ev("Cervical myelopathy", rid="my"), hostile) if "red_flags" in flags else ()
    return PatientFacts(
        patient_id="p1", today=date(2026, 1, 1), age_years=83, neck_pain=(_ev("Neck pain", rid="np"),),
        chronic="lots" not in flags, neck_pain_onset=None if lots else date(2024, 1, 1),
        neuropathic=(_ev("Paraesthesia"), hostile) if "neuropathic" in flags else (),
        mechanical=tuple(_ev(f"Spondylosis {i}", rid=f"m{i}") for i in range(7 if lots else 1))
        if "mechanical" in flags else (),
        compressive=tuple(_ev(f"Stenosis {i} " + "w" * 40 * i) for i in range(7 if lots else 1))
        if "mechanical" in flags else (),
        red_flags=red,
        risk_factors=tuple(RiskFactor(k, (hostile, _ev("Metformin 500 mg")) * (4 if lots else 1),
                                      "duration-unknown" if k == "metformin" else None)
                           for k in list(TEXTS.common["risk_factor_labels"])[: 9 if lots else 2]),
        already_handled=(), b12_results=(TOTAL_LOW, TOTAL_INDET) if lots else (TOTAL_INDET,),
        mma_results=(MMA,) if lots else (), pending_orders=(),
        active_b12_results=(ACTIVE_LOW,) if lots else (),
        pending_results=(PENDING, IMPLAUSIBLE) * (3 if lots else 0),
        pregnancy=(_ev("Pregnant", rid="preg"),) if "pregnancy" in flags else (),
        unavailable=frozenset(PREFETCH_KEYS[:3] + ("<b>weird</b>",)) if lots else frozenset(),
        neurological_red_flags=red[:1], suspected_deficiency=(_ev("?B12 deficiency"),) if "suspected" in flags else ())


@pytest.mark.parametrize("decision_name", sorted(DECISIONS))
def test_every_card_kind_and_variant_is_the_same_and_valid(decision_name: str) -> None:
    context = HookContext(user_id="Practitioner/doc1", patient_id="p1", encounter_id="enc-1")
    for n in range(len(FLAGS) + 1):
        for flags in itertools.combinations(FLAGS, n):
            for settings_name in SETTINGS:
                check_same_answer(settings_name, DECISIONS[decision_name], facts_with(frozenset(flags)), context)


def test_all_kinds_suggestions_and_override_variants_are_covered() -> None:
    """The deterministic grid reaches every kind, suggestion and override-reason variant."""
    _, builder = BUILDERS["default"]
    seen = set()
    for decision in DECISIONS.values():
        for red in (frozenset(), frozenset({"red_flags"})):
            card = builder.build(decision, facts_with(red), HookContext("Practitioner/d", "p1"))
            body = card.to_json()
            codes = tuple(r["code"] for r in body["overrideReasons"])
            order = body["suggestions"][0]["actions"][0]["resource"]["code"]["coding"][0]["code"] \
                if "suggestions" in body else None
            seen.add((decision.kind, order, "mechanical-cause" in codes))
    assert {k for k, _, _ in seen} == set(CARD_KINDS)
    assert {o for _, o, _ in seen} == {None, "2132-9", "13964-2", "72160-5"}
    assert {m for _, _, m in seen} == {True, False}


def test_fresh_uuids_for_every_card_and_suggestion() -> None:
    _, builder = BUILDERS["default"]
    built = [builder.build(DECISIONS["b12"], facts_with(frozenset()), HookContext("Practitioner/d", "p1"))
             for _ in range(50)]
    all_uuids = [c.uuid for c in built] + [u for c in built for u in c.suggestion_uuids]
    assert len(set(all_uuids)) == 100


def test_shared_parts_are_not_changed_by_a_card() -> None:
    """Lists of a card are its own: removing a link or reason from one card leaves the next intact."""
    _, builder = BUILDERS["default"]
    first = builder.build(DECISIONS["b12"], facts_with(frozenset()), HookContext("Practitioner/d", "p1"))
    first.json["links"].clear()
    first.json["overrideReasons"].pop()
    second = builder.build(DECISIONS["b12"], facts_with(frozenset()), HookContext("Practitioner/d", "p1"))
    assert second.json["links"] and len(second.json["overrideReasons"]) == len(first.json["overrideReasons"]) + 1


# --- the checks that replace per-request validation ---------------------------------------------

def test_a_card_file_the_model_rejects_fails_when_the_builder_is_made() -> None:
    common = dict(TEXTS.common, links=[{"label": "NICE", "url": "not-a-url", "type": "absolute"}])
    with pytest.raises(ValueError, match="absolute"):
        CardBuilder(cards.CardTexts(common, TEXTS.kinds), KNOWLEDGE, Settings())
    # only "mechanical-cause" to offer: a red-flag card would have no override reason left
    kinds = dict(TEXTS.kinds, **{"b12-test": dict(TEXTS.kinds["b12-test"], override_reasons=["mechanical-cause"])})
    with pytest.raises(ValueError, match="overrideReasons"):
        CardBuilder(cards.CardTexts(TEXTS.common, kinds), KNOWLEDGE, Settings())
    kinds = dict(TEXTS.kinds, **{"mma-test": dict(TEXTS.kinds["mma-test"],
                                                  suggestion=dict(TEXTS.kinds["mma-test"]["suggestion"], label=" "))})
    with pytest.raises(ValueError, match="label"):
        CardBuilder(cards.CardTexts(TEXTS.common, kinds), KNOWLEDGE, Settings())


@pytest.mark.parametrize("summary, detail, indicator", [
    ("x" * 140, "detail", "info"), (" ", "detail", "info"), ("summary", "\n", "info"), ("summary", "d", "urgent")])
def test_a_card_breaking_the_model_rules_is_an_error_not_an_answer(summary, detail, indicator) -> None:
    with pytest.raises(ValueError):
        protocol.Card(summary=summary, detail=detail, indicator=indicator, source=protocol.Source(label="s"))
    with pytest.raises(ValueError):
        cards._check_card(summary, detail, indicator)


# --- safe_text: memoised, same guarantees ------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(value=text, limit=st.sampled_from([cards.MAX_RECORD_TEXT, 20, 500]))
@example(value="[click](https://evil.example)", limit=cards.MAX_RECORD_TEXT)
@example(value="<img src=x onerror=alert(1)>www.x.org", limit=cards.MAX_RECORD_TEXT)
def test_safe_text_is_the_reference_sanitiser_also_from_memory(value: str, limit: int) -> None:
    expected = reference_cards.safe_text(value, limit)
    assert safe_text(value, limit) == expected
    assert safe_text(value, limit) == expected  # second call: from the memo when it was kept
    assert safe_text(Decimal("1.50")) == reference_cards.safe_text(Decimal("1.50"))  # not a str: not kept


def test_safe_text_memory_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(cards, "_SAFE_TEXT_CACHE", {})
    monkeypatch.setattr(cards, "_SAFE_TEXT_CACHE_LIMIT", 10)
    for i in range(35):
        assert safe_text(f"<b>label {i}</b> [x](y)") == f"label {i} \\[x\\]\\(y\\)"
    assert 0 < len(cards._SAFE_TEXT_CACHE) <= 10
    safe_text("long " * 200)  # longer than is kept: computed, not remembered
    assert "long " * 200 not in cards._SAFE_TEXT_CACHE
