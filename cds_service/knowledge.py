"""Value sets: loaded once from `valuesets/*.json` and indexed for constant-time code matching.

Each file is a FHIR R4 ValueSet whose `compose.include` lists either
- exact concepts (`system` + `concept[].code`), or
- an ICD-10-CM family: an include carrying the extension `PREFIX_EXTENSION` (valueString = the
  family prefix, e.g. "E11" or "M50.1") plus a FHIR `filter` (property "code", op "regex",
  value "<prefix>.*") so generic FHIR tooling reads the same meaning; `PREFIX_DISPLAY_EXTENSION`
  names the family (used as the label when a record's coding has no display).

Medication value sets also carry `INGREDIENT_EXTENSION` entries (valueString = an ingredient name,
e.g. "metformin") and `SYNONYM_EXTENSION` entries (brand names such as "Janumet", spellings such as
"vit B12", lab test names such as "methylmalonic acid"): records that code a product or test we do
not list (an RxNorm SCD/SBD, an NDC, the EHR's own orderable code) or only have text still match by
name, as whole words.  `EXCLUDED_TEXT_EXTENSION` names text that cancels a match by name for that
value set (a multivitamin "with B12" is not B12 replacement).  Never inventing a product code is
the point: matching by name is the principled fallback.

A concept may carry `REQUIRES_TEXT_EXTENSION` entries: it then counts only when the record's own
text (CodeableConcept.text or a coding's display) names one of the phrases.  This is for codes that
are broader than what the card says (Z90.49 is mostly used after cholecystectomy, E53.8 also
covers folate).  `UNVERIFIED_EXTENSION` holds codes kept for review only; they are never indexed,
so the matcher ignores them (clinical-codes.json status "unverified").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from cds_service.lab_values import LabUnits, normalize_unit

BASE_URL = "https://b12-neck-cds.example.org"
PREFIX_EXTENSION = f"{BASE_URL}/StructureDefinition/code-prefix"
INGREDIENT_EXTENSION = f"{BASE_URL}/StructureDefinition/ingredient-name"
UNVERIFIED_EXTENSION = f"{BASE_URL}/StructureDefinition/unverified-concept"
PREFIX_DISPLAY_EXTENSION = f"{BASE_URL}/StructureDefinition/code-prefix-display"
SYNONYM_EXTENSION = f"{BASE_URL}/StructureDefinition/name-synonym"
EXCLUDED_TEXT_EXTENSION = f"{BASE_URL}/StructureDefinition/excluded-text"
REQUIRES_TEXT_EXTENSION = f"{BASE_URL}/StructureDefinition/requires-supporting-text"
LAB_CANONICAL_UNIT_EXTENSION = f"{BASE_URL}/StructureDefinition/lab-canonical-unit"
"""On a laboratory ValueSet: the unit its rules compare in (valueString, UCUM)."""
LAB_UNIT_EXTENSION = f"{BASE_URL}/StructureDefinition/lab-unit-conversion"
"""On a laboratory ValueSet: one unit it accepts, with sub-extensions `unit` (valueString, UCUM),
`factor` (valueDecimal: multiply to get the canonical unit) and `source` (valueString)."""
LAB_PLAUSIBLE_EXTENSION = f"{BASE_URL}/StructureDefinition/lab-plausible-range"
"""On a laboratory ValueSet: valueRange (canonical unit) outside which a value is not interpreted."""
LAB_DEFAULT_UNIT_EXTENSION = f"{BASE_URL}/StructureDefinition/lab-default-unit"
"""On a concept of a laboratory ValueSet: the unit assumed when a result has none (valueString)."""

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

VALUESET_NAMES: tuple[str, ...] = (
    "neck-pain", "chronic-neck-pain", "neuropathic-features", "mechanical-causes",
    "compressive-causes", "red-flags", "diabetes", "metformin", "acid-suppressants",
    "vegan-vegetarian-diet", "malabsorption", "gastric-surgery", "alcohol-use-disorder",
    "b12-deficiency", "b12-replacement", "b12-lab", "mma-lab", "active-b12-lab",
    "neurological-red-flags", "peripheral-neuropathy", "b12-low-finding", "b12-deficiency-history",
    "malabsorption-persistent", "absent-answers", "pregnancy", "pregnancy-ended",
)
"""The value set names other modules rely on (a contract: file name = ValueSet.id = name)."""

NEGATION_CUES: tuple[str, ...] = tuple(f" {cue} " for cue in (
    "no", "not", "denies", "denied", "without", "negative", "negative for", "absent", "free of",
    "ruled out", "history of", "hx of", "h o", "resolved", "family history", "fh", "never"))
"""Whole-word cues that negate a name found after them in free text (matched on normalized text)."""
POST_NEGATION_CUES: tuple[str, ...] = tuple(f" {cue} " for cue in (
    "negative", "absent", "not present", "not seen", "ruled out", "unlikely", "resolved", "denied"))
"""Whole-word cues that negate a name found before them ("Babinski negative", "tingling resolved")."""
_WORD_CHARS = re.compile(r"[^a-z0-9]+")
_EMPTY: frozenset[str] = frozenset()
_CACHE_LIMIT = 50_000


def normalize_code(system: str, code: str) -> str:
    """Canonical form of a code for lookups.

    ICD-10-CM codes are compared upper-case, and the dot-less form some systems send ("M542") is
    given its dot back ("M54.2"), so both spellings match the same family.
    """
    code = code.strip()
    if system == ICD10CM:
        code = code.upper()
        if "." not in code and len(code) > 3:
            code = f"{code[:3]}.{code[3:]}"
    return code


def normalize_text(text: str) -> str:
    """Lower-case text with every run of non-alphanumerics turned into one space, padded with
    spaces so that whole-word matching is a plain substring test (`" metformin "`)."""
    return f" {_WORD_CHARS.sub(' ', text.lower()).strip()} "


@dataclass(frozen=True)
class ValueSetDef:
    """One value set as loaded (verified content only)."""

    name: str
    title: str
    url: str
    codes: tuple[tuple[str, str, str], ...]
    """(system, code, display) for exact concepts."""
    prefixes: tuple[tuple[str, str], ...]
    """(system, prefix) for code families (ICD-10-CM)."""
    prefix_displays: tuple[str, ...] = ()
    """Display of each family, parallel to `prefixes`."""
    ingredient_names: tuple[str, ...] = ()
    """Lower-case ingredient names for text matching of medications."""
    synonyms: tuple[str, ...] = ()
    """Lower-case brand names, spellings and test names, matched by text like ingredient names."""
    excluded_texts: tuple[str, ...] = ()
    """Lower-case phrases that cancel a match by text for this value set."""
    text_required: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(system, code, phrases): concepts that count only with one of the phrases in the record's text."""
    lab_units: LabUnits | None = None
    """Units, conversion factors and plausible range of a laboratory value set (None otherwise)."""

    def display_for(self, system: str, code: str) -> str | None:
        for s, c, d in self.codes:
            if s == system and c == code:
                return d
        if system == ICD10CM:
            code = normalize_code(system, code)
            for (s, prefix), d in zip(self.prefixes, self.prefix_displays):
                if s == system and code.startswith(prefix):
                    return d
        return None


@dataclass(frozen=True)
class Knowledge:
    """All value sets plus the lookup indexes built from them."""

    valuesets: dict[str, ValueSetDef]
    _exact: dict[tuple[str, str], frozenset[str]] = field(repr=False)
    _prefixes: dict[str, dict[str, frozenset[str]]] = field(repr=False)
    _prefix_lengths: dict[str, tuple[int, ...]] = field(repr=False)
    _ingredients: tuple[tuple[str, str], ...] = field(repr=False)
    """(" name ", value set name), longest names first (ingredient names and synonyms)."""
    _excluded: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """(" phrase ", value set name): text that cancels a match by text."""
    _text_required: dict[tuple[str, str], dict[str, tuple[str, ...]]] = field(default_factory=dict, repr=False)
    """(system, normalized code) -> {value set name: (" phrase ", ...)} for conditional concepts."""
    _cache: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict, repr=False, compare=False)
    """Memo of match_code: records repeat the same few codes (vitals, labs) thousands of times."""
    _affirmed_cache: dict[tuple[str, frozenset[str]], dict[str, str]] = field(
        default_factory=dict, repr=False, compare=False)
    """Memo of match_text_affirmed (problem-list texts repeat across patients)."""
    _text_cache: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)
    """Memo of match_text (medication texts repeat across refills)."""
    concept_memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """A memo facts.py keeps of what a whole CodeableConcept matches (per Knowledge, as the
    answer depends on the value sets); facts.py bounds it."""

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> "Knowledge":
        """Read every `*.json` ValueSet in `directory` (fails loudly on a broken file: a missing
        value set must stop the service at start-up, not silently change clinical behaviour)."""
        defs: dict[str, ValueSetDef] = {}
        for path in sorted(Path(directory).glob("*.json")):
            with path.open(encoding="utf-8") as fh:
                resource = json.load(fh)
            vs = parse_valueset(resource)
            if vs.name != path.stem:
                raise ValueError(f"{path}: ValueSet.name {vs.name!r} must equal the file name")
            defs[vs.name] = vs
        missing = [n for n in VALUESET_NAMES if n not in defs]
        if missing:
            raise ValueError(f"value sets missing from {directory}: {', '.join(missing)}")
        return cls.from_valuesets(defs)

    @classmethod
    def from_valuesets(cls, defs: dict[str, ValueSetDef]) -> "Knowledge":
        exact: dict[tuple[str, str], set[str]] = {}
        prefixes: dict[str, dict[str, set[str]]] = {}
        ingredients: list[tuple[str, str]] = []
        excluded: list[tuple[str, str]] = []
        text_required: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {}
        for vs in defs.values():
            for name in vs.synonyms:
                ingredients.append((normalize_text(name), vs.name))
            for phrase in vs.excluded_texts:
                excluded.append((normalize_text(phrase), vs.name))
            for system, code, phrases in vs.text_required:
                text_required.setdefault((system, normalize_code(system, code)), {})[vs.name] = tuple(
                    normalize_text(p) for p in phrases)
            for system, code, _ in vs.codes:
                exact.setdefault((system, normalize_code(system, code)), set()).add(vs.name)
            for system, prefix in vs.prefixes:
                prefixes.setdefault(system, {}).setdefault(normalize_code(system, prefix), set()).add(vs.name)
            for name in vs.ingredient_names:
                ingredients.append((normalize_text(name), vs.name))
        ingredients = sorted(set(ingredients), key=lambda item: (-len(item[0]), item))
        return cls(
            valuesets=dict(defs),
            _exact={k: frozenset(v) for k, v in exact.items()},
            _prefixes={s: {p: frozenset(n) for p, n in m.items()} for s, m in prefixes.items()},
            _prefix_lengths={s: tuple(sorted({len(p) for p in m})) for s, m in prefixes.items()},
            _ingredients=tuple(ingredients),
            _excluded=tuple(excluded),
            _text_required=text_required,
        )

    # -- lookups ------------------------------------------------------------------------------
    def match_code(self, system: Any, code: Any) -> frozenset[str]:
        """Names of the value sets containing (system, code); empty for anything malformed."""
        key = (system, code)
        try:
            found = self._cache.get(key)  # before the type checks: the common case is a known pair
        except TypeError:  # unhashable: an object or list where a string belongs
            return _EMPTY
        if found is not None:
            return found
        if type(system) is not str or type(code) is not str:
            return _EMPTY
        found = self._lookup(system, code)
        if len(self._cache) >= _CACHE_LIMIT:  # bounded: arbitrary input cannot grow it forever
            self._cache.clear()
        self._cache[key] = found
        return found

    def known_codes(self) -> Callable[[tuple[Any, Any]], frozenset[str] | None]:
        """`(system, code) -> value-set names` for the pairs `match_code` has seen, else None:
        the memo's own lookup, for loops over thousands of codings (call `match_code` on None).
        Stays valid when the memo is cleared."""
        return self._cache.get

    def _lookup(self, system: str, code: str) -> frozenset[str]:
        if not code.strip():
            return _EMPTY
        code = normalize_code(system, code)
        found = self._exact.get((system, code), _EMPTY)
        lengths = self._prefix_lengths.get(system)
        if lengths:
            families = self._prefixes[system]
            for n in lengths:
                if n > len(code):
                    break
                hit = families.get(code[:n])
                if hit:
                    found = found | hit
        return found

    def match_text(self, text: Any) -> frozenset[str]:
        """Names of the medication value sets whose ingredient name appears as whole words in
        `text` (case-insensitive)."""
        if type(text) is not str or not text:
            return _EMPTY
        found = self._text_cache.get(text)
        if found is None:
            norm = normalize_text(text)
            found = frozenset(vs for name, vs in self._ingredients if name in norm)
            if found:
                cancelled = {vs for phrase, vs in self._excluded if vs in found and phrase in norm}
                found = found - cancelled
            if len(self._text_cache) >= _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache[text] = found
        return found

    def match_text_affirmed(self, text: Any, allowed: frozenset[str]) -> dict[str, str]:
        """Value set name -> the phrase found, for the sets in `allowed` whose names appear in
        `text` (whole words) and are not preceded by a negation cue ("no", "denies", "without",
        "history of"...) or followed by a post-negation cue ("negative", "resolved"...): NegEx-style
        triggers, Chapman et al., J Biomed Inform 2001.  For free-text problem-list entries, where "Cervical spondylosis without
        myelopathy" must not read as myelopathy."""
        if type(text) is not str or not text:
            return {}
        key = (text, allowed)
        cached = self._affirmed_cache.get(key)
        if cached is not None:
            return dict(cached)
        norm = normalize_text(text)
        found: dict[str, str] = {}
        for phrase, vs in self._ingredients:
            if vs in allowed and vs not in found:
                at = norm.find(phrase)
                if at < 0 or any(cue in norm[:at + 1] for cue in NEGATION_CUES):
                    continue
                if any(cue in norm[at + len(phrase) - 1:] for cue in POST_NEGATION_CUES):
                    continue
                found[vs] = phrase.strip()
        if found:
            for phrase, vs in self._excluded:
                if vs in found and phrase in norm:
                    del found[vs]
        if len(self._affirmed_cache) >= _CACHE_LIMIT:
            self._affirmed_cache.clear()
        self._affirmed_cache[key] = dict(found)
        return found

    def supported(self, name: str, system: str, code: str, texts: Any) -> bool:
        """Whether value set `name`'s concept (system, code) counts given the record's own `texts`
        (concept text, coding displays).  True for every concept without REQUIRES_TEXT_EXTENSION;
        a conditional one needs one of its phrases, as whole words, in one of the texts."""
        if not self._text_required:
            return True
        phrases = self._text_required.get((system, normalize_code(system, code)), {}).get(name)
        if phrases is None:
            return True
        for text in texts:
            if type(text) is str and text:
                norm = normalize_text(text)
                if any(p in norm for p in phrases):
                    return True
        return False

    def valueset_codes(self, name: str) -> list[tuple[str, str]]:
        """Exact (system, code) pairs of a value set (no families, no ingredient names): what a
        FHIR search `code=system|code,...` can use.  Raises KeyError for an unknown name."""
        return [(s, c) for s, c, _ in self.valuesets[name].codes]

    def valueset_prefixes(self, name: str) -> list[tuple[str, str]]:
        """Code families (system, prefix) of a value set, which FHIR token search cannot express."""
        return list(self.valuesets[name].prefixes)

    def display(self, name: str, system: str, code: str) -> str | None:
        return self.valuesets[name].display_for(system, code)

    def lab_units(self, name: str) -> LabUnits | None:
        """Unit knowledge of laboratory value set `name` (None when it has none)."""
        vs = self.valuesets.get(name)
        return vs.lab_units if vs else None


def parse_valueset(resource: dict[str, Any]) -> ValueSetDef:
    """Read one ValueSet resource into a `ValueSetDef` (unverified codes are ignored)."""
    if resource.get("resourceType") != "ValueSet":
        raise ValueError("not a ValueSet")
    name = resource["name"]
    codes: list[tuple[str, str, str]] = []
    prefixes: list[tuple[str, str]] = []
    prefix_displays: list[str] = []
    text_required: list[tuple[str, str, tuple[str, ...]]] = []
    default_units: dict[str, str] = {}
    for include in resource.get("compose", {}).get("include", []):
        system = include["system"]
        prefix = _extension_value(include, PREFIX_EXTENSION, "valueString")
        if prefix:
            prefixes.append((system, prefix))
            prefix_displays.append(_extension_value(include, PREFIX_DISPLAY_EXTENSION, "valueString") or prefix)
            continue
        if include.get("filter"):
            # A filter we cannot evaluate would silently match nothing: refuse it.
            raise ValueError(f"ValueSet {name}: filter without the {PREFIX_EXTENSION} extension")
        for concept in include.get("concept", []):
            codes.append((system, concept["code"], concept.get("display", concept["code"])))
            phrases = tuple(e["valueString"] for e in concept.get("extension", [])
                            if e.get("url") == REQUIRES_TEXT_EXTENSION)
            if phrases:
                text_required.append((system, concept["code"], phrases))
            default_unit = _extension_value(concept, LAB_DEFAULT_UNIT_EXTENSION, "valueString")
            if default_unit:
                default_units[concept["code"]] = default_unit
    extensions = resource.get("extension", [])
    names = tuple(e["valueString"].lower() for e in extensions if e.get("url") == INGREDIENT_EXTENSION)
    synonyms = tuple(e["valueString"].lower() for e in extensions if e.get("url") == SYNONYM_EXTENSION)
    excluded = tuple(e["valueString"].lower() for e in extensions if e.get("url") == EXCLUDED_TEXT_EXTENSION)
    return ValueSetDef(name=name, title=resource.get("title", name), url=resource.get("url", ""),
                       codes=tuple(codes), prefixes=tuple(prefixes),
                       prefix_displays=tuple(prefix_displays), ingredient_names=names,
                       synonyms=synonyms, excluded_texts=excluded, text_required=tuple(text_required),
                       lab_units=_lab_units(resource, default_units))


def _lab_units(resource: dict[str, Any], default_units: dict[str, str]) -> LabUnits | None:
    """The unit knowledge of a laboratory ValueSet (see LAB_*_EXTENSION), None when absent.
    Factors are read as decimals from their JSON text so 1.355 stays exactly 1.355."""
    canonical = _extension_value(resource, LAB_CANONICAL_UNIT_EXTENSION, "valueString")
    if not canonical:
        return None
    factors: dict[str, Decimal] = {normalize_unit(canonical): Decimal(1)}
    for ext in resource.get("extension", []):
        if ext.get("url") != LAB_UNIT_EXTENSION:
            continue
        parts = {e.get("url"): e for e in ext.get("extension", [])}
        unit = parts["unit"]["valueString"]
        factor = Decimal(str(parts["factor"]["valueDecimal"]))
        if factor <= 0 or not parts.get("source", {}).get("valueString"):
            raise ValueError(f"ValueSet {resource.get('name')}: unit {unit!r} needs a positive factor and a source")
        factors[normalize_unit(unit)] = factor
    plausible = _extension_value(resource, LAB_PLAUSIBLE_EXTENSION, "valueRange") or {}
    low = plausible.get("low", {}).get("value")
    high = plausible.get("high", {}).get("value")
    for code, unit in default_units.items():
        if normalize_unit(unit) not in factors:
            raise ValueError(f"ValueSet {resource.get('name')}: default unit {unit!r} of {code} has no factor")
    return LabUnits(canonical=canonical, factors=factors,
                    plausible_low=Decimal(str(low)) if low is not None else None,
                    plausible_high=Decimal(str(high)) if high is not None else None,
                    default_units=dict(default_units) or None)


def _extension_value(element: dict[str, Any], url: str, key: str) -> Any:
    for ext in element.get("extension", []):
        if ext.get("url") == url:
            return ext.get(key)
    return None
