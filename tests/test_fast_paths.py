"""The engine's fast paths answer exactly what the plain code they stand in for answers: the
frozen dataclasses' faster `__init__`, the "YYYY-MM-DD" date reader, the memo of concept
matches, the unit-spelling memo and the card uuids."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import date

import pytest

from cds_service import facts as facts_module
from cds_service.cards import uuid4, uuid4_pair
from cds_service.config import Settings
from cds_service.facts import Evidence, Match, PatientFacts, parse_date
from cds_service.frozen import fast_init
from cds_service.knowledge import Knowledge
from cds_service.lab_values import normalize_unit

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return Knowledge.load(Settings().valuesets_dir)


# --- fast_init ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plain:
    a: str
    b: int = 2
    c: tuple[int, ...] = ()


@fast_init
@dataclasses.dataclass(frozen=True)
class _Fast:
    a: str
    b: int = 2
    c: tuple[int, ...] = ()


def test_fast_init_builds_the_same_frozen_instance() -> None:
    for args, kwargs in [(("x",), {}), (("x", 5), {}), ((), {"a": "x", "c": (1,)}), (("x",), {"c": (3,), "b": 1})]:
        plain, fast = _Plain(*args, **kwargs), _Fast(*args, **kwargs)
        assert repr(fast) == repr(plain).replace("_Plain", "_Fast")
        assert dataclasses.astuple(fast) == dataclasses.astuple(plain)
        assert hash(fast) == hash(_Fast(*args, **kwargs)) and fast == _Fast(*args, **kwargs)
        assert vars(fast) == vars(plain) and list(vars(fast)) == ["a", "b", "c"]
    fast = _Fast("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.a = "y"  # type: ignore[misc]
    assert dataclasses.replace(fast, b=7) == _Fast("x", 7)
    with pytest.raises(TypeError):
        _Fast()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Fast("x", d=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Fast("x", 1, (), 4)  # type: ignore[call-arg]


def test_fast_init_refuses_fields_it_cannot_copy() -> None:
    with pytest.raises(TypeError):
        @fast_init
        @dataclasses.dataclass(frozen=True)
        class _Factory:
            a: list[int] = dataclasses.field(default_factory=list)
    with pytest.raises(TypeError):
        @fast_init
        @dataclasses.dataclass(frozen=True, slots=True)
        class _Slots:
            a: int = 1


def test_engine_records_keep_their_dataclass_behaviour() -> None:
    ev = Evidence("neck-pain", "Neck pain", "Condition", "c1", date(2024, 1, 2), SNOMED, "81680005")
    assert ev == Evidence.of("neck-pain", Match("Neck pain", SNOMED, "81680005"), "Condition", "c1", date(2024, 1, 2))
    assert ev.reference == "Condition/c1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.label = "other"  # type: ignore[misc]
    facts = PatientFacts("p", date(2026, 1, 1), 60, (ev,), True, None, (), (), (), (), (), (), (), (), ())
    assert facts.skipped_resources == 0 and facts.pregnancy == () and facts.unavailable == frozenset()
    assert [f.name for f in dataclasses.fields(facts)] == list(vars(facts))


def test_records_built_positionally_keep_their_field_order() -> None:
    """derive_facts, _lab_result and ClinicalEngine.evaluate pass these fields by position."""
    from cds_service.engine import Evaluation
    from cds_service.facts import LabResult

    assert [f.name for f in dataclasses.fields(PatientFacts)] == [
        "patient_id", "today", "age_years", "neck_pain", "chronic", "neck_pain_onset", "neuropathic",
        "mechanical", "compressive", "red_flags", "risk_factors", "already_handled", "b12_results",
        "mma_results", "pending_orders", "active_b12_results", "pending_results", "pregnancy", "unavailable",
        "skipped_resources", "skipped_references", "neurological_red_flags", "peripheral_neuropathy",
        "suspected_deficiency"]
    assert [f.name for f in dataclasses.fields(LabResult)] == [
        "resource_id", "loinc", "on", "value", "unit", "comparator", "value_ng_l", "analyte", "canonical",
        "canonical_unit", "value_text", "implausible", "pending"]
    assert [f.name for f in dataclasses.fields(Evaluation)] == [
        "decision", "cards", "card_kinds", "skipped_resources", "facts", "policy"]


# --- parse_date ----------------------------------------------------------------------------------

def test_parse_date_fast_path_reads_as_the_regex() -> None:
    rng = random.Random(7)
    alphabet = "0123456789-T:Z+ \n\u0660\u0661\u00b2x."  # ASCII and Arabic-Indic digits, a superscript
    cases = ["2024-01-02", "2024-02-30", "0000-01-01", "2024-13-01", " 2024-01-02", "2024-01-0x",
             "\u0661\u0669\u0669\u0660-\u0660\u0661-\u0660\u0662", "2024-0\u00b2-01", "2024-01-02\u00e9"]
    for _ in range(20000):
        cases.append("".join(rng.choice(alphabet) for _ in range(rng.randint(8, 14))))
        chars = list("2024-05-17T10:00")
        chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        cases.append("".join(chars))
    for text in cases:
        for partial_end in (False, True):
            expected = facts_module._parse_date_text(text, partial_end)  # the regex alone
            assert parse_date(text, partial_end=partial_end) == expected, text


# --- the memo of concept matches -------------------------------------------------------------

def _concept(text=None, *codings):
    concept = {"coding": [dict(c) for c in codings]}
    if text is not None:
        concept["text"] = text
    return concept


def test_concept_memo_answers_what_matching_answers(knowledge: Knowledge) -> None:
    np_snomed = {"system": SNOMED, "code": "81680005", "display": "Neck pain"}
    concepts = [
        _concept("Cervicalgia", np_snomed),
        _concept(None, np_snomed),
        _concept("Cervicalgia", {**np_snomed, "display": "Other words"}),
        _concept("Cervicalgia", {"system": ICD10CM, "code": "M54.2"}, np_snomed),
        _concept(5, {**np_snomed, "code": 81680005}),
        _concept(["a list"], np_snomed),  # unhashable: matched without the memo
        _concept("x", {**np_snomed, "display": {"an": "object"}}),
        _concept("x" * 3000, np_snomed),  # too long to keep
        {"coding": ["not a coding", np_snomed]},
        {"coding": "not a list"},
    ]
    for concept in concepts:
        codings = concept.get("coding")
        plain = (facts_module._match_codings(knowledge, concept, codings)
                 if isinstance(codings, list) else facts_module._NO_MATCH)
        for _ in range(2):  # computed, then remembered
            assert dict(facts_module._match_concept(knowledge, concept)) == dict(plain)


def test_concept_memo_never_reuses_an_answer_for_other_words(knowledge: Knowledge) -> None:
    first = facts_module._match_concept(knowledge, _concept("Cervicalgia", {"system": SNOMED, "code": "81680005"}))
    other = facts_module._match_concept(knowledge, _concept("Neck ache", {"system": SNOMED, "code": "81680005"}))
    assert first["neck-pain"].label == "Cervicalgia" and other["neck-pain"].label == "Neck ache"
    nothing = facts_module._match_concept(knowledge, _concept("Cervicalgia", {"system": SNOMED, "code": "1"}))
    assert not nothing


def test_concept_memo_is_bounded(knowledge: Knowledge, monkeypatch) -> None:
    monkeypatch.setattr(facts_module, "_CONCEPT_MEMO_LIMIT", 3)
    knowledge.concept_memo.clear()
    for i in range(10):
        facts_module._match_concept(knowledge, _concept(f"text {i}", {"system": SNOMED, "code": "81680005"}))
        assert len(knowledge.concept_memo) <= 3
    long_text = _concept("y" * 2000, {"system": SNOMED, "code": "81680005"})
    facts_module._match_concept(knowledge, long_text)
    assert all(key[0] != long_text["text"] for key in knowledge.concept_memo)


# --- lab values ----------------------------------------------------------------------------

def test_an_integer_value_reads_as_its_text_would() -> None:
    from cds_service.lab_values import parse_number, read_value

    rng = random.Random(11)
    values = [0, 1, -1, 245, 10 ** 18, -(10 ** 30), 2 ** 64, 10 ** 4000]
    values += [rng.randint(-10 ** rng.randint(1, 40), 10 ** rng.randint(1, 40)) for _ in range(2000)]
    for value in values:
        read = read_value({"valueQuantity": {"value": value, "unit": "pg/mL"}})
        expected = parse_number(str(value))
        assert read is not None and read.text == str(value)
        assert read.number == expected and read.number.as_tuple() == expected.as_tuple()


# --- units and uuids ---------------------------------------------------------------------------

@pytest.mark.parametrize("unit,expected", [("pg/mL", "pg/ml"), (" µmol / L ", "umol/l"), ("mcmol/L", "umol/l"),
                                           ("μmol/L", "umol/l"), ("x" * 40, "x" * 40)])
def test_normalize_unit_remembered_or_not(unit: str, expected: str) -> None:
    assert normalize_unit(unit) == expected
    assert normalize_unit(unit) == expected


def test_card_uuids_are_random_version_4() -> None:
    seen = set()
    for _ in range(2000):
        text = uuid4()
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 2000


def test_card_uuid_pairs_are_two_random_version_4_uuids() -> None:
    seen = set()
    digits: dict[int, set[str]] = {}
    for _ in range(2000):
        pair = uuid4_pair()
        for text in pair:
            parsed = uuid.UUID(text)
            assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
            for i, ch in enumerate(text.replace("-", "")):
                digits.setdefault(i, set()).add(ch)
        seen.update(pair)
    assert len(seen) == 4000  # never the same uuid twice, within a pair or across pairs
    # every digit but the version's is random (the variant's first digit: 8, 9, a or b)
    assert digits.pop(12) == {"4"} and digits.pop(16) == set("89ab")
    assert all(found == set("0123456789abcdef") for found in digits.values())


def test_forked_workers_never_draw_the_same_card_uuids() -> None:
    """gunicorn forks its workers from one preloaded app: each must draw its own random bytes
    (OpenSSL reseeds its generator in a forked child), or two workers would hand out the same
    card uuids and feedback would reach the wrong card."""
    import os

    uuid4_pair()  # the parent's generator is seeded and in use before the fork
    read_end, write_end = os.pipe()
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # child: write its first pair, then leave without running pytest's exit
            os.close(read_end)
            os.write(write_end, (",".join(uuid4_pair()) + "\n").encode())
            os._exit(0)
        children.append(pid)
    os.close(write_end)
    for pid in children:
        os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        drawn = [line.split(",") for line in pipe.read().splitlines()]
    drawn.append(list(uuid4_pair()))
    assert len(drawn) == 4
    flat = [u for pair in drawn for u in pair]
    assert len(set(flat)) == len(flat) == 8


# --- the validation verdict key ----------------------------------------------------------------

def test_verdict_key_tells_every_change_of_content_apart() -> None:
    from cds_service.fhir_validation import ValidationVerdicts

    key = ValidationVerdicts.key
    resource = {"resourceType": "Condition", "id": "c1", "code": {"coding": [{"system": SNOMED, "code": "81680005"}]}}
    assert key(resource) == key({**resource}) and len(key(resource)) == 32
    variants = [{**resource, "id": "c2"}, {**resource, "code": {"coding": [{"system": SNOMED, "code": "81680006"}]}},
                {**resource, "note": [{"text": "x"}]}, {**resource, "id": 1}, {**resource, "id": True}]
    keys = {key(v) for v in variants}
    assert len(keys) == len(variants) and key(resource) not in keys
    reordered = dict(reversed(list(resource.items())))
    assert key(reordered) != key(resource)  # validated again, never another's verdict
    assert key({**resource, "big": 2 ** 70}) is None  # not serialisable: not remembered


# --- the gate's memo ---------------------------------------------------------------------------

def _typed_head(resource: dict):
    import msgspec

    from cds_service import wire
    return msgspec.json.decode(msgspec.json.encode(resource), type=wire.Head)


def test_gate_memo_answers_by_the_words_of_each_head(knowledge: Knowledge) -> None:
    from cds_service.facts import _head_needed, head_gate

    gate = head_gate(knowledge)
    heads = [
        {"resourceType": "MedicationRequest", "medicationCodeableConcept": {"text": "Metformin 500 mg"}},
        {"resourceType": "MedicationRequest", "medicationCodeableConcept": {"text": "Amoxicillin 500 mg"}},
        {"resourceType": "MedicationStatement", "medicationCodeableConcept": {"coding": [{"display": "omeprazole"}]}},
        {"resourceType": "MedicationStatement", "medicationCodeableConcept": {"coding": [{"display": "paracetamol"}]}},
        {"resourceType": "MedicationRequest", "medicationReference": {"reference": "Medication/m1"}},
        {"resourceType": "MedicationRequest"},
        {"resourceType": "ServiceRequest", "code": {"text": "Vitamin B12 level"}},
        {"resourceType": "ServiceRequest", "code": {"text": "Full blood count"}},
        {"resourceType": "ServiceRequest", "code": {"coding": [{"system": "http://loinc.org", "code": "2132-9"}]}},
        {"resourceType": "ServiceRequest", "code": {"coding": []}},
        {"resourceType": "Condition", "code": {"text": "neck pain"}},
        {"resourceType": "Condition", "code": {"text": "neck pain", "coding": [{"system": SNOMED, "code": "38341003"}]}},
        {"resourceType": "Condition", "code": {"text": "neck pain", "coding": [{"system": "urn:ehr", "code": "x1"}]}},
        {"resourceType": "Condition", "code": {"coding": [{"system": "urn:ehr", "code": "x1"},
                                                          {"system": SNOMED, "code": "81680005"}]}},
        {"resourceType": "Condition", "code": {"coding": []}},
    ]
    expected = [_head_needed(knowledge, _typed_head(h)) for h in heads]
    assert expected[:2] == [True, False] and expected[6:8] == [True, False]
    assert expected[10:14] == [True, False, True, True]
    for _ in range(3):  # computed, then remembered: the same answers, each for its own words
        assert [gate(_typed_head(h)) for h in heads] == expected


def test_gate_memo_is_bounded(knowledge: Knowledge, monkeypatch) -> None:
    from cds_service import facts
    monkeypatch.setattr(facts, "_GATE_MEMO_LIMIT", 2)
    gate = facts.head_gate(knowledge)
    for i in range(6):
        assert gate(_typed_head({"resourceType": "ServiceRequest", "code": {"text": f"test {i}"}})) is False
    assert gate(_typed_head({"resourceType": "ServiceRequest", "code": {"text": "B12" + " " * 2000}})) is True
