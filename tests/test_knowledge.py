"""Value sets and the code index: contract names, FHIR validity, exact/family/text matching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fhir.resources.R4B.valueset import ValueSet

from cds_service.config import Settings
from cds_service.knowledge import (
    ICD10CM, INGREDIENT_EXTENSION, LOINC, PREFIX_EXTENSION, RXNORM, SNOMED, UNVERIFIED_EXTENSION,
    VALUESET_NAMES, Knowledge, normalize_code,
)

VALUESETS_DIR = Path(Settings().valuesets_dir)


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return Knowledge.load(VALUESETS_DIR)


def _files() -> list[Path]:
    return sorted(VALUESETS_DIR.glob("*.json"))


def test_every_contract_name_has_a_file_with_matching_id_and_name() -> None:
    names = {p.stem for p in _files()}
    assert set(VALUESET_NAMES) <= names
    for path in _files():
        res = json.loads(path.read_text())
        assert res["id"] == res["name"] == path.stem


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.stem)
def test_each_valueset_is_valid_fhir_r4(path: Path) -> None:
    ValueSet.model_validate(json.loads(path.read_text()))


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.stem)
def test_family_includes_carry_both_the_prefix_extension_and_a_matching_regex_filter(path: Path) -> None:
    for include in json.loads(path.read_text())["compose"]["include"]:
        if "filter" in include:
            prefix = next(e["valueString"] for e in include["extension"] if e["url"] == PREFIX_EXTENSION)
            assert include["system"] == ICD10CM
            (flt,) = include["filter"]
            assert flt["property"] == "code" and flt["op"] == "regex"
            assert flt["value"].replace("\\", "") == prefix + ".*"


# Codes the shared clinical file marks unverified or wrong: they must never match anything.
UNVERIFIED_OR_WRONG = [
    (SNOMED, "24930006"), (SNOMED, "300928006"), (SNOMED, "1255166007"), (SNOMED, "84568007"),
    (RXNORM, "11248"), (RXNORM, "5514"), (ICD10CM, "T41.0X1A"), (LOINC, "30428-7"),
    (SNOMED, "128196005"),  # lumbar (not cervical) radiculopathy
    (SNOMED, "24026003"),   # babesiosis, wrongly used for myofascial pain
    (LOINC, "16695-9"),     # whole-blood cobalamin, not serum
    (SNOMED, "279039007"),  # wrongly labelled "chronic neck pain" in one repo
    (ICD10CM, "F10.90"),    # alcohol use, unspecified: not a use disorder
    (ICD10CM, "K51.90"),    # ulcerative colitis: deliberately not a malabsorption risk
]


@pytest.mark.parametrize("system,code", UNVERIFIED_OR_WRONG)
def test_unverified_and_known_wrong_codes_never_match(knowledge: Knowledge, system: str, code: str) -> None:
    assert knowledge.match_code(system, code) == frozenset()


def test_unverified_codes_are_kept_for_review_in_a_separate_extension() -> None:
    diet = json.loads((VALUESETS_DIR / "vegan-vegetarian-diet.json").read_text())
    kept = {e["valueCoding"]["code"] for e in diet["extension"] if e["url"] == UNVERIFIED_EXTENSION}
    assert {"24930006", "300928006"} <= kept
    listed = {c["code"] for inc in diet["compose"]["include"] for c in inc.get("concept", [])}
    assert not kept & listed


@pytest.mark.parametrize("system,code,expected", [
    (SNOMED, "81680005", {"neck-pain"}),
    (ICD10CM, "M54.2", {"neck-pain"}),
    (ICD10CM, "M542", {"neck-pain"}),                      # dot-less ICD spelling
    (ICD10CM, "m54.2", {"neck-pain"}),                     # case
    (ICD10CM, "E11.9", {"diabetes"}),                      # family E11
    (ICD10CM, "E11.42", {"diabetes", "neuropathic-features", "peripheral-neuropathy"}),
    # radiculopathy is a compressive (mechanical) explanation and neck pain, not a B12 feature
    (ICD10CM, "M50.121", {"neck-pain", "mechanical-causes", "compressive-causes"}),
    (SNOMED, "54404000", {"neck-pain", "mechanical-causes", "compressive-causes"}),
    (ICD10CM, "M47.812", {"mechanical-causes"}),  # spondylosis without radiculopathy: not compressive
    (SNOMED, "202664003", {"red-flags", "neurological-red-flags"}),
    (SNOMED, "22325002", {"red-flags", "neurological-red-flags"}),
    (ICD10CM, "R26.81", {"red-flags", "neurological-red-flags"}),
    (ICD10CM, "M50.22", {"mechanical-causes", "compressive-causes"}),
    (ICD10CM, "S13.4XXA", {"mechanical-causes"}),
    (ICD10CM, "D51.0", {"b12-deficiency"}),
    (ICD10CM, "S12.9XXA", {"red-flags"}),
    (LOINC, "14685-2", {"b12-lab"}),
    (LOINC, "13964-2", {"mma-lab"}),
    (RXNORM, "6809", {"metformin"}),
    (SNOMED, "1255165006", {"vegan-vegetarian-diet"}),
    ("http://terminology.hl7.org/CodeSystem/diet", "vegetarian", {"vegan-vegetarian-diet"}),
])
def test_match_code(knowledge: Knowledge, system: str, code: str, expected: set[str]) -> None:
    assert knowledge.match_code(system, code) == expected


@pytest.mark.parametrize("system,code", [
    (ICD10CM, "M50"),        # the parent of family M50.1 is not in the family
    (ICD10CM, "M54.1"),      # a sibling of M54.12
    (ICD10CM, "E12.9"),      # no such diabetes family
    (SNOMED, "M54.2"),       # right code, wrong system
    ("http://snomed.info/sct/", "81680005"),
])
def test_near_misses_do_not_match(knowledge: Knowledge, system: str, code: str) -> None:
    assert knowledge.match_code(system, code) == frozenset()


@pytest.mark.parametrize("system,code", [(None, "x"), (SNOMED, None), (SNOMED, ""), (5, 6),
                                         ([SNOMED], "81680005"), (SNOMED, {"c": 1})])
def test_malformed_codings_match_nothing(knowledge: Knowledge, system, code) -> None:
    assert knowledge.match_code(system, code) == frozenset()


@pytest.mark.parametrize("text,expected", [
    ("Metformin hydrochloride 500 MG Oral Tablet", {"metformin"}),
    ("sitagliptin / metformin 50/1000", {"metformin"}),
    ("ESOMEPRAZOLE 40mg", {"acid-suppressants"}),
    ("Famotidine", {"acid-suppressants"}),
    ("Vitamin B12 1000 microgram tablets", {"b12-replacement", "b12-lab"}),  # callers keep their kind
    ("Vitamin B-12 1000 mcg", {"b12-replacement", "b12-lab"}),
    ("B12 injection", {"b12-replacement"}),        # giving B12 is not a test
    ("Janumet 50 mg/1000 mg tablet", {"metformin"}),  # brand name of a combination product
    ("NEXIUM 40MG", {"acid-suppressants"}),
    ("Centrum multivitamin with B12", {"b12-lab"}),  # a multivitamin is not B12 replacement
    ("Hydroxocobalamin 1mg/1ml injection", {"b12-replacement"}),
    ("metformine", set()),          # whole words only
    ("paracetamol 500 mg", set()),
    ("", set()),
])
def test_match_text_uses_whole_ingredient_names(knowledge: Knowledge, text: str, expected: set[str]) -> None:
    assert knowledge.match_text(text) == expected


def test_medication_valuesets_declare_ingredient_names() -> None:
    for name in ("metformin", "acid-suppressants", "b12-replacement"):
        res = json.loads((VALUESETS_DIR / f"{name}.json").read_text())
        assert any(e["url"] == INGREDIENT_EXTENSION for e in res["extension"])


def test_valueset_codes_lists_exact_codes_only(knowledge: Knowledge) -> None:
    assert knowledge.valueset_codes("b12-lab") == [(LOINC, "2132-9"), (LOINC, "14685-2")]
    assert knowledge.valueset_codes("mma-lab") == [(LOINC, "13964-2")]
    diabetes = knowledge.valueset_codes("diabetes")
    assert (SNOMED, "44054006") in diabetes
    assert all(code != "E11" for _, code in diabetes)  # families are not search codes
    assert (ICD10CM, "E11") in knowledge.valueset_prefixes("diabetes")
    with pytest.raises(KeyError):
        knowledge.valueset_codes("no-such-set")


def test_load_fails_when_a_contract_valueset_is_missing(tmp_path: Path) -> None:
    for path in _files():
        if path.stem != "metformin":
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ValueError, match="metformin"):
        Knowledge.load(tmp_path)


def test_load_refuses_a_filter_it_cannot_evaluate(tmp_path: Path) -> None:
    for path in _files():
        shutil.copy(path, tmp_path / path.name)
    res = json.loads((tmp_path / "diabetes.json").read_text())
    res["compose"]["include"].append({"system": ICD10CM, "filter": [{"property": "concept", "op": "is-a", "value": "E10"}]})
    (tmp_path / "diabetes.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="filter"):
        Knowledge.load(tmp_path)


def test_normalize_code_only_rewrites_icd() -> None:
    assert normalize_code(ICD10CM, " e119 ") == "E11.9"
    assert normalize_code(ICD10CM, "E11") == "E11"
    assert normalize_code(LOINC, " 2132-9 ") == "2132-9"


def test_memoised_lookups_give_the_same_answers_and_keep_code_and_text_apart(knowledge: Knowledge) -> None:
    assert knowledge.match_text("metformin") == {"metformin"}
    assert knowledge.match_code("", "metformin") == frozenset()  # a code is never matched as text
    for _ in range(2):
        assert knowledge.match_code(ICD10CM, "E11.9") == {"diabetes"}
        assert knowledge.match_code(ICD10CM, "Z00.00") == frozenset()
