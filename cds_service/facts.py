"""Facts: what the rules need to know about one patient, derived from the raw FHIR JSON.

Matching runs on the raw dicts with the value-set index (cheap: a few dict lookups per coding);
only resources that matched something the rules use are validated with fhir.resources R4B, and a
matched resource that fails validation is skipped and counted in `skipped_resources`.  Nothing in
here raises on malformed input: every field is type-checked before use.

Counting rules (docs/rules.md, "What counts"):
- Conditions count when clinicalStatus is active/recurrence/relapse (or absent), there is no
  abatement[x] (an abated Condition is not active, whatever its status says), and
  verificationStatus is not refuted/entered-in-error.  An encounter diagnosis with no clinical
  status counts only while recent (`encounter_diagnosis_days`).  Surgical history and structural
  malabsorption (value set malabsorption-persistent) count whatever their clinical status (a
  gastrectomy does not "resolve"; Crohn's disease in remission keeps its ileal damage).
- A B12-deficiency diagnosis means "already handled" only when confirmed: provisional,
  differential or unconfirmed is a suspected deficiency (a reason to test); a resolved one is a
  history of deficiency (a risk factor).
- Observations with status entered-in-error or cancelled never count; lab results count only when
  final, amended or corrected; a finding recorded as absent (No, false, an absent/negative code,
  a data-absent reason) never counts.
- Medications count when active or on-hold, matched by code, else by ingredient, brand or product
  name in the text/display, including a Medication given by reference (contained, or one of the
  record's Medication resources).  Acid suppressants count only when long-term.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from types import MappingProxyType
from typing import Any

from cds_service.config import Settings
from cds_service.fhir_validation import ValidationVerdicts, is_valid_r4b
from cds_service.frozen import fast_init
from cds_service.knowledge import LOINC, Knowledge
from cds_service.lab_values import ReadValue, is_plausible, read_value, unit_factor
from cds_service.record import PatientRecord
from cds_service.wire import Concept, Head

log = logging.getLogger("cds_service.facts")

# --- constants --------------------------------------------------------------------------------

RISK_FACTOR_ORDER: tuple[str, ...] = (
    "metformin", "acid-suppressants", "gastric-surgery", "malabsorption", "b12-deficiency-history",
    "vegan-vegetarian-diet", "older-age", "diabetes", "alcohol-use-disorder",
)
"""Risk-factor keys, strongest/most specific marker first (metformin is a stronger B12 marker
than diabetes itself: clinical-knowledge.md 1c).  Keys equal value-set names, plus "older-age"."""

CONDITION_SETS = frozenset({
    "neck-pain", "chronic-neck-pain", "neuropathic-features", "mechanical-causes",
    "compressive-causes", "red-flags", "diabetes", "vegan-vegetarian-diet", "malabsorption",
    "gastric-surgery", "alcohol-use-disorder", "b12-deficiency",
    "neurological-red-flags", "peripheral-neuropathy", "b12-low-finding", "b12-deficiency-history",
    "malabsorption-persistent", "pregnancy", "pregnancy-ended",
})
FINDING_SETS = frozenset({"neuropathic-features", "vegan-vegetarian-diet", "red-flags",
                          "neurological-red-flags", "peripheral-neuropathy", "b12-low-finding",
                          "pregnancy", "pregnancy-ended"})
"""Sets an Observation may establish, by its code or its valueCodeableConcept (a pregnancy-status
Observation, LOINC 82810-3, carries "pregnant"/"not pregnant" as its value)."""
LAB_SETS = frozenset({"b12-lab", "mma-lab", "active-b12-lab"})
"""Laboratory value sets, matched on Observation.code and on each Observation.component.code (a
panel such as "B12 and folate" sends its results as components)."""
ANALYTE_OF_SET = {"b12-lab": "b12", "active-b12-lab": "active-b12", "mma-lab": "mma"}
MEDICATION_SETS = frozenset({"metformin", "acid-suppressants", "b12-replacement"})
SURGERY_SET = "gastric-surgery"
ABSENT_ANSWERS = "absent-answers"
SUSPECTED_VERIFICATION = frozenset({"provisional", "differential", "unconfirmed"})
"""FHIR condition-ver-status codes short of confirmed: for a B12-deficiency diagnosis these mean
"suspected, to be tested" (never "already handled")."""
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ABATEMENT_KEYS = ("abatementDateTime", "abatementAge", "abatementPeriod", "abatementRange",
                  "abatementString", "abatementBoolean")
_ABATEMENT_KEY_SET = frozenset(ABATEMENT_KEYS)
DURATION_UNKNOWN = "duration-unknown"
"""RiskFactor.note: an acid suppressant counted although no start date was recorded."""

COUNTED_CLINICAL = frozenset({"active", "recurrence", "relapse"})
EXCLUDED_VERIFICATION = frozenset({"refuted", "entered-in-error"})
EXCLUDED_OBSERVATION = frozenset({"entered-in-error", "cancelled"})
FINAL_LAB = frozenset({"final", "amended", "corrected"})
PENDING_LAB = frozenset({"registered", "preliminary", "partial"})
"""A result in progress: never banded; a recent one means the test is under way (rules)."""
ACTIVE_MEDICATION = frozenset({"active", "on-hold"})
PENDING_ORDER = frozenset({"active", "on-hold"})
DEAD_DRAFT = frozenset({"revoked", "entered-in-error", "completed", "cancelled", "stopped"})
NEGATIVE_ANSWERS = frozenset({"no", "n", "absent", "negative", "neg", "none", "false", "not present",
                              "not detected", "denies", "denied", "not found"})

# Unit conversion factors, plausible ranges and the unit assumed for a unit-less result are data
# in each laboratory ValueSet file (valuesets/b12-lab.json etc.), with their sources.

_NO_MATCH: Mapping[str, Match] = MappingProxyType({})
"""Shared read-only 'nothing matched' (avoids allocating a dict per coded element)."""
_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_from_iso_date = date.fromisoformat


# --- fact records -----------------------------------------------------------------------------

@fast_init
@dataclass(frozen=True)
class Match:
    """How one coded element (or medication text) matched a value set."""

    label: str
    """Text from the record (concept text, else the coding's display), else the value set's display."""
    system: str | None = None
    """The matching coding's system; None for a match by text (ingredient name)."""
    code: str | None = None
    """The matching coding's code as sent; None for a match by text."""


@fast_init
@dataclass(frozen=True)
class Evidence:
    """One record entry supporting a fact.  `label` is text from the record (unescaped)."""

    valueset: str
    label: str
    resource_type: str
    resource_id: str | None
    on: date | None = None
    system: str | None = None
    """System of the coding that matched (None: matched by text, or derived like age)."""
    code: str | None = None
    """Code that matched, as the record sent it."""

    @classmethod
    def of(cls, valueset: str, match: Match, resource_type: str, resource_id: str | None,
           on: date | None = None) -> "Evidence":
        """Evidence from a value-set `match` in a record entry."""
        return cls(valueset, match.label, resource_type, resource_id, on, match.system, match.code)

    @property
    def reference(self) -> str | None:
        return f"{self.resource_type}/{self.resource_id}" if self.resource_id else None


@fast_init
@dataclass(frozen=True)
class RiskFactor:
    key: str
    """One of RISK_FACTOR_ORDER."""
    evidence: tuple[Evidence, ...]
    note: str | None = None
    """A caveat the card states next to the risk factor (e.g. DURATION_UNKNOWN)."""


@fast_init
@dataclass(frozen=True)
class LabResult:
    """A B12, active-B12 or MMA result (final/amended/corrected, or in progress: `pending`)."""

    resource_id: str | None
    loinc: str
    on: date | None
    value: float | None
    unit: str | None
    """The unit as the laboratory reported it (Quantity.unit, else its UCUM code, else the unit
    in a string value), or the LOINC code's own unit when none was sent."""
    comparator: str | None = None
    value_ng_l: float | None = None
    """Total B12 in ng/L, None when the value or its unit cannot be read (then it is not banded)."""
    analyte: str = "b12"
    """"b12" (total), "active-b12" (holotranscobalamin) or "mma"."""
    canonical: float | None = None
    """The value in the analyte's canonical unit (ng/L, pmol/L, nmol/L); None when unreadable,
    in an unknown unit, or implausible."""
    canonical_unit: str | None = None
    value_text: str | None = None
    """The number exactly as reported ("245", "245.0", "0.36"), for display."""
    implausible: bool = False
    """A value outside the analyte's plausible range: never interpreted, not a test done."""
    pending: bool = False
    """Registered/preliminary: the test is in progress; never banded."""


@fast_init
@dataclass(frozen=True)
class PatientFacts:
    patient_id: str
    today: date
    age_years: int | None
    neck_pain: tuple[Evidence, ...]
    chronic: bool
    neck_pain_onset: date | None
    neuropathic: tuple[Evidence, ...]
    mechanical: tuple[Evidence, ...]
    compressive: tuple[Evidence, ...]
    red_flags: tuple[Evidence, ...]
    risk_factors: tuple[RiskFactor, ...]
    already_handled: tuple[Evidence, ...]
    """A confirmed, active B12-deficiency diagnosis or active B12 replacement."""
    b12_results: tuple[LabResult, ...]
    """Newest first; results without a date last."""
    mma_results: tuple[LabResult, ...]
    pending_orders: tuple[Evidence, ...]
    active_b12_results: tuple[LabResult, ...] = ()
    """Active B12 (holotranscobalamin) results, newest first."""
    pending_results: tuple[LabResult, ...] = ()
    """B12/active-B12/MMA results still registered or preliminary, newest first."""
    pregnancy: tuple[Evidence, ...] = ()
    """Evidence of a current pregnancy (recent, not abated, resolved or followed by a delivery)."""
    unavailable: frozenset[str] = frozenset()
    skipped_resources: int = 0
    skipped_references: tuple[str, ...] = ()
    """"Type/id" of each matched record entry skipped as invalid FHIR R4 (no content)."""
    neurological_red_flags: tuple[Evidence, ...] = ()
    """Myelopathy, cord compression, gait/balance disturbance: red flags that are also NICE NG239
    neurological presentations of B12 deficiency (a subset of `red_flags`)."""
    peripheral_neuropathy: tuple[Evidence, ...] = ()
    """Distal polyneuropathy (a subset of `neuropathic`): no root compression explains it."""
    suspected_deficiency: tuple[Evidence, ...] = ()
    """A provisional/differential/unconfirmed B12-deficiency diagnosis or a low-B12 finding."""

    @property
    def unexplained_symptoms(self) -> bool:
        """A NICE NG239-listed neurological symptom that no documented cause explains: a
        myelopathy/gait red flag, a distal polyneuropathy, or sensory features (paraesthesia,
        numbness, neuropathic pain) without a documented nerve-root compression (which explains
        radicular symptoms only)."""
        return bool(self.neurological_red_flags or self.peripheral_neuropathy
                    or (self.neuropathic and not self.compressive))

    def risk(self, key: str) -> RiskFactor | None:
        return next((r for r in self.risk_factors if r.key == key), None)


# --- small, type-safe readers -----------------------------------------------------------------

def _s(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _codings(concept: Any) -> list[dict[str, Any]]:
    coding = _d(concept).get("coding")
    return [c for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []


def _status_codes(concept: Any) -> set[str]:
    """The non-blank codes of a status CodeableConcept (as `_codings` + `_s`, unrolled: it runs
    twice for every matched Condition)."""
    if type(concept) is dict:
        coding = concept.get("coding")
        if type(coding) is list and len(coding) == 1:
            # The common case, one coding ("active", "confirmed"): its code read without the
            # loop (the general path below gives the same set).
            only = coding[0]
            if type(only) is dict:
                code = only.get("code")
                if type(code) is str:
                    return {code} if code.strip() else set()
    codes: set[str] = set()
    if isinstance(concept, dict):
        coding = concept.get("coding")
        if isinstance(coding, list):
            for c in coding:
                if isinstance(c, dict):
                    code = c.get("code")
                    if isinstance(code, str) and code.strip():
                        codes.add(code)
    return codes


def parse_date(value: Any, *, partial_end: bool = False) -> date | None:
    """The calendar date of a FHIR date/dateTime/instant string, else None.

    Partial dates take the first day of the year/month, or the last with `partial_end` (used for
    birth dates, so an age is never over-stated)."""
    if type(value) is str and len(value) >= 10 and value[4] == "-" and value[7] == "-":
        # Nearly every FHIR date starts "YYYY-MM-DD": read it without the regex.  First with
        # `date.fromisoformat`, which takes exactly ASCII "YYYY-MM-DD" with a real calendar
        # date (5 times faster than slicing and converting the parts); anything else it refuses
        # (other digits, an impossible date) goes on as before.
        try:
            return _from_iso_date(value[:10])
        except ValueError:
            pass
        # The same answer as below: `isdecimal` is exactly `\d` (Unicode Nd), so the regex would
        # read these three groups from the same characters (and a value starting with 4 digits
        # has no leading space to strip).
        year, month, day = value[:4], value[5:7], value[8:10]
        if year.isdecimal() and month.isdecimal() and day.isdecimal():
            try:
                return date(int(year), int(month), int(day))
            except ValueError:
                return None
    return _parse_date_text(value, partial_end)


def _parse_date_text(value: Any, partial_end: bool) -> date | None:
    """`parse_date` by the regex, for any value (the fast path above reads the common case)."""
    text = _s(value)
    if not text:
        return None
    m = _DATE_RE.match(text.strip())
    if not m:
        return None
    try:
        year = int(m.group(1))
        month = int(m.group(2)) if m.group(2) else (12 if partial_end else 1)
        if m.group(3):
            return date(year, month, int(m.group(3)))
        if partial_end:
            nxt = date(year + (month == 12), month % 12 + 1, 1)
            return date.fromordinal(nxt.toordinal() - 1)
        return date(year, month, 1)
    except (ValueError, OverflowError):
        return None


def age_on(birth: date, today: date) -> int:
    """Completed years on `today` (a 75th birthday today gives 75)."""
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def _first_date(resource: dict[str, Any], *paths: str) -> date | None:
    """First readable date among dotted `paths` (e.g. "onsetPeriod.start")."""
    for path in paths:
        first, rest = _PATH_PARTS.get(path) or _path_parts(path)
        node: Any = resource.get(first) if isinstance(resource, dict) else None
        for part in rest:
            node = node.get(part) if isinstance(node, dict) else None
        found = parse_date(node)
        if found:
            return found
    return None


_PATH_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {}
"""Memo of `_path_parts` (the paths are the few literals of this module)."""


def _path_parts(path: str) -> tuple[str, tuple[str, ...]]:
    """A dotted path as (first field, the fields below it)."""
    first, *rest = path.split(".")
    parts = _PATH_PARTS[path] = (first, tuple(rest))
    return parts


# --- validation -------------------------------------------------------------------------------

class _Validator:
    """Validates each matched resource at most once per call; counts the failures and keeps
    their references (type/id, never content) so `evaluate` can say which entries were skipped."""

    def __init__(self, verdicts: ValidationVerdicts | None = None) -> None:
        self.skipped = 0
        self.skipped_refs: list[str] = []
        self._seen: dict[int, bool] = {}
        self._verdicts = verdicts

    def ok(self, resource: dict[str, Any], expected_type: str) -> bool:
        key = id(resource)  # the resources outlive the call: ids are not reused meanwhile
        seen = self._seen.get(key)
        if seen is not None:
            return seen
        self._seen[key] = valid = is_valid_r4b(resource, expected_type, self._verdicts)
        if not valid:
            self.skipped += 1
            rid = resource.get("id")
            self.skipped_refs.append(f"{expected_type}/{rid}" if type(rid) is str else expected_type)
        return valid


# --- matching ---------------------------------------------------------------------------------

_CONCEPT_MEMO_LIMIT = 4096
"""Entries kept in `Knowledge.concept_memo` (then it starts over, like knowledge.py's memos)."""
_CONCEPT_MEMO_KEY_CHARS = 1024
"""Only concepts with at most this many characters of text are kept: a few MiB at most."""


def _match_concept(knowledge: Knowledge, concept: Any) -> Mapping[str, Match]:
    """Value-set name -> `Match` for every set a CodeableConcept's codings fall in (read-only:
    the mapping is shared).

    This runs for every coded element of every resource, so it is written for speed: exact type
    checks, and a memo of the answer by everything it depends on, the concept's text and each
    coding's (system, code, display): records repeat the same concepts call after call.  Equal
    keys give equal answers (a value that is not a string counts as absent wherever it stands,
    so 1, 1.0 and True cannot be told apart, nor need to be); a list or object in one of those
    places is unhashable and is matched without the memo."""
    if type(concept) is not dict:
        return _NO_MATCH
    codings = concept.get("coding")
    if type(codings) is not list:
        return _NO_MATCH
    first = codings[0] if len(codings) == 1 else None
    if type(first) is dict:  # the common single coding: its key built without a list
        memo_key: tuple[Any, ...] = (concept.get("text"), (first.get("system"), first.get("code"), first.get("display")))
    else:
        key: list[Any] = [concept.get("text")]
        for coding in codings:
            if type(coding) is dict:
                key.append((coding.get("system"), coding.get("code"), coding.get("display")))
            elif isinstance(coding, dict):  # a dict subclass (never from JSON): read without the memo
                return _match_codings(knowledge, concept, codings)
        memo_key = tuple(key)
    memo = knowledge.concept_memo
    try:
        found = memo.get(memo_key)
    except TypeError:  # unhashable: a list or object where a string belongs
        return _match_codings(knowledge, concept, codings)
    if found is None:
        found = _match_codings(knowledge, concept, codings)
        if _key_chars(memo_key) <= _CONCEPT_MEMO_KEY_CHARS:  # bounded memory, whatever is sent
            if len(memo) >= _CONCEPT_MEMO_LIMIT:
                memo.clear()
            memo[memo_key] = found
    return found


def _key_chars(key: tuple[Any, ...]) -> int:
    """Characters of the strings in a `_match_concept` memo key; "too many" when it holds
    anything but strings and None (a number there is unusual, and may be any size)."""
    total = 0
    for value in (key[0], *(v for coding in key[1:] for v in coding)):
        if type(value) is str:
            total += len(value)
        elif value is not None:
            return _CONCEPT_MEMO_KEY_CHARS + 1
    return total


def _match_codings(knowledge: Knowledge, concept: dict[str, Any], codings: list[Any]) -> Mapping[str, Match]:
    """`_match_concept` without the memo."""
    found: dict[str, Match] | None = None
    for coding in codings:
        if type(coding) is not dict:
            continue
        system, code = coding.get("system"), coding.get("code")
        names = knowledge.match_code(system, code)
        if not names:
            continue
        text = _s(concept.get("text"))
        if found is None:
            found = {}
        for name in names:
            if name not in found:
                # A concept broader than the card's wording (Z90.49, E53.8...) counts only when
                # the record's own text says what it is (REQUIRES_TEXT_EXTENSION).
                if not knowledge.supported(name, system, code, _concept_texts(concept)):
                    continue
                found[name] = Match(text or _s(coding.get("display"))
                                    or knowledge.display(name, system, code.strip()) or code, system, code)
    return MappingProxyType(found) if found else _NO_MATCH


def _concept_texts(concept: dict[str, Any]) -> list[str | None]:
    """The record's own words for a CodeableConcept: its text and every coding's display."""
    return [_s(concept.get("text"))] + [_s(c.get("display")) for c in _codings(concept)]


def _referenced_medication(resource: dict[str, Any],
                           medications: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The Medication a `medicationReference` points to: a contained one ("#id"), else one of the
    record's Medication resources ("Medication/id", absolute or versioned URLs included)."""
    ref = _s(_d(resource.get("medicationReference")).get("reference"))
    if not ref:
        return None
    if ref.startswith("#"):
        contained = resource.get("contained")
        for item in contained if isinstance(contained, list) else ():
            if isinstance(item, dict) and item.get("resourceType") == "Medication" and item.get("id") == ref[1:]:
                return item
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Medication":
        return medications.get(parts[-1])
    return None


def _match_medication(knowledge: Knowledge, resource: dict[str, Any],
                      medications: Mapping[str, dict[str, Any]] = MappingProxyType({})) -> dict[str, Match]:
    """Medication value sets of a MedicationRequest/Statement.

    Codes first (medicationCodeableConcept, or the referenced Medication's code and ingredient
    codes); when no code is known, names (ingredient, brand, spelling; value-set extensions) in
    the texts and displays of the same places and in medicationReference.display.  A combination
    product matches every value set one of its ingredients is in."""
    concept = resource.get("medicationCodeableConcept")
    if resource.get("medicationReference") is None:
        # The common case, a medication given inline: what the loops below find, read directly
        # (no reference means no other concept and no reference display).
        found = {name: match for name, match in _match_concept(knowledge, concept).items()
                 if name in MEDICATION_SETS}
        if found or not isinstance(concept, dict):
            return found
        for text in dict.fromkeys(_concept_texts(concept)):
            if text:
                for name in knowledge.match_text(text):
                    if name in MEDICATION_SETS:
                        found.setdefault(name, Match(text))
        return found
    concepts: list[Any] = [concept]
    texts: list[str | None] = [_s(_d(resource.get("medicationReference")).get("display"))]
    medication = _referenced_medication(resource, medications)
    if medication is not None and _s(medication.get("status")) != "entered-in-error":
        concepts.append(medication.get("code"))
        ingredients = medication.get("ingredient")
        for item in ingredients if isinstance(ingredients, list) else ():
            if isinstance(item, dict):
                concepts.append(item.get("itemCodeableConcept"))
                texts.append(_s(_d(item.get("itemReference")).get("display")))
    found: dict[str, Match] = {}
    for concept in concepts:
        for name, match in _match_concept(knowledge, concept).items():
            if name in MEDICATION_SETS:
                found.setdefault(name, match)
    if found:
        return found  # a known code decides; free text may be stale or about something else
    for concept in concepts:
        if isinstance(concept, dict):
            texts += _concept_texts(concept)
    for text in dict.fromkeys(texts):  # text and display are often the same string
        if text:
            for name in knowledge.match_text(text):
                if name in MEDICATION_SETS:
                    found.setdefault(name, Match(text))
    return found


_VALUE_KEYS = ("valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger",
               "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod")


def _is_negative_answer(knowledge: Knowledge, obs: dict[str, Any]) -> bool:
    """An Observation that records the *absence* of a finding, however it is coded: value false,
    "No"/"Absent"/"Negative" text, an answer code in the absent-answers value set (SNOMED,
    HL7 v2/v3, LOINC answer codes) as value or interpretation, or no value at all but a
    dataAbsentReason (the question was not answered: nothing is established)."""
    if obs.get("valueBoolean") is False:
        return True
    if obs.get("dataAbsentReason") is not None and not any(k in obs for k in _VALUE_KEYS):
        return True
    value_cc = _d(obs.get("valueCodeableConcept"))
    answers = [_s(obs.get("valueString"))] + _concept_texts(value_cc)
    if any(a and a.strip().rstrip(".").lower() in NEGATIVE_ANSWERS for a in answers):
        return True
    if ABSENT_ANSWERS in _match_concept(knowledge, value_cc):
        return True
    interpretations = obs.get("interpretation")
    return any(ABSENT_ANSWERS in _match_concept(knowledge, i)
               for i in (interpretations if isinstance(interpretations, list) else ()))


# --- the derivation ---------------------------------------------------------------------------

class _Collector:
    def __init__(self, today: date, settings: Settings) -> None:
        self.today = today
        self.settings = settings
        self.by_set: dict[str, list[Evidence]] = {}
        self.onsets: list[date] = []
        self.acid: list[tuple[Evidence, bool, date | None]] = []
        """Acid-suppressant entries: (evidence, start known, earliest date seen)."""

    def add(self, name: str, ev: Evidence) -> None:
        self.by_set.setdefault(name, []).append(ev)


def _dicts(resources: Iterable[Any]) -> Iterable[dict[str, Any]]:
    return (r for r in resources if isinstance(r, dict))


def derive_facts(record: PatientRecord, context: Any, knowledge: Knowledge, settings: Settings,
                 now: datetime | date, verdicts: ValidationVerdicts | None = None) -> PatientFacts:
    """Derive the `PatientFacts` the rules read.  `context` is the hook's `HookContext` (only
    `patient_id` is read); `now` fixes "today" so results are reproducible.  `verdicts` remembers
    validation results across calls (the engine owns one)."""
    today = now.date() if isinstance(now, datetime) else now
    validator = _Validator(verdicts)
    col = _Collector(today, settings)
    medications = {m["id"]: m for m in _dicts(record.medications) if type(m.get("id")) is str} \
        if record.medications else {}

    # (A reader is not called for an empty group: most records have several.)
    if record.conditions:
        _conditions(record.conditions, knowledge, validator, col)
    labs = _observations(record.observations, knowledge, validator, col) if record.observations else []
    if record.medication_requests:
        _medications(record.medication_requests, "MedicationRequest", knowledge, validator, col, medications)
    if record.medication_statements:
        _medications(record.medication_statements, "MedicationStatement", knowledge, validator, col, medications)
    _acid_suppressant_risk(col)
    if record.procedures:
        _procedures(record.procedures, knowledge, validator, col)
    if record.service_requests:
        _service_requests(record.service_requests, knowledge, validator, col)
    if record.draft_orders:
        _draft_orders(record.draft_orders, knowledge, validator, col, medications)

    age = None
    patient = record.patient if isinstance(record.patient, dict) else None
    if patient:
        birth = parse_date(patient.get("birthDate"), partial_end=True)
        if birth and validator.ok(patient, "Patient"):
            age = age_on(birth, today)

    found = {name: tuple(evidence) for name, evidence in col.by_set.items()}
    get = found.get
    risks: list[RiskFactor] = []
    for key in RISK_FACTOR_ORDER:
        if key == "older-age":
            if age is not None and age >= settings.older_age_years:
                label = f"birth date {patient.get('birthDate')}"
                risks.append(RiskFactor(key, (Evidence("older-age", label, "Patient", _s(patient.get("id"))),)))
        else:
            evidence = get(key)
            if evidence:
                unknown = key == "acid-suppressants" and bool(get("acid-suppressants-duration-unknown"))
                risks.append(RiskFactor(key, evidence, DURATION_UNKNOWN if unknown else None))

    onsets = col.onsets
    onset = min(onsets) if onsets else None
    chronic = "chronic-neck-pain" in found or (onset is not None and (today - onset).days >= settings.chronic_days)

    b12: list[LabResult] = []
    mma: list[LabResult] = []
    active_b12: list[LabResult] = []
    pending: list[LabResult] = []
    for result in labs:
        if result.pending:
            pending.append(result)
        elif result.analyte == "b12":
            b12.append(result)
        elif result.analyte == "mma":
            mma.append(result)
        elif result.analyte == "active-b12":
            active_b12.append(result)

    patient_id = _s(getattr(context, "patient_id", None)) or (_s(patient.get("id")) if patient else None) or ""
    # (Every list in `found` has at least one entry, so "in found" is "recorded at all".)
    # Positional, in field order: 24 keyword arguments cost a hook call about 1.5 us more.
    return PatientFacts(
        patient_id,                                                        # patient_id
        today,                                                             # today
        age,                                                               # age_years
        get("neck-pain", ()),                                              # neck_pain
        chronic,                                                           # chronic
        onset,                                                             # neck_pain_onset
        get("neuropathic-features", ()),                                   # neuropathic
        get("mechanical-causes", ()),                                      # mechanical
        get("compressive-causes", ()),                                     # compressive
        get("red-flags", ()),                                              # red_flags
        tuple(risks),                                                      # risk_factors
        get("b12-deficiency", ()) + get("b12-replacement", ()),            # already_handled
        _newest_first(b12) if b12 else (),                                 # b12_results
        _newest_first(mma) if mma else (),                                 # mma_results
        get("pending-order", ()),                                          # pending_orders
        _newest_first(active_b12) if active_b12 else (),                   # active_b12_results
        _newest_first(pending) if pending else (),                         # pending_results
        current_pregnancy(found["pregnancy"], get("pregnancy-ended", ()), today,
                          settings.pregnancy_days) if "pregnancy" in found else (),  # pregnancy
        frozenset(record.unavailable),                                     # unavailable
        validator.skipped,                                                 # skipped_resources
        tuple(validator.skipped_refs) if validator.skipped_refs else (),   # skipped_references
        get("neurological-red-flags", ()),                                 # neurological_red_flags
        get("peripheral-neuropathy", ()),                                  # peripheral_neuropathy
        get("b12-deficiency-suspected", ()) + get("b12-low-finding", ()),  # suspected_deficiency
    )


def _newest_first(results: list[LabResult]) -> tuple[LabResult, ...]:
    if len(results) < 2:  # the common case: nothing to sort
        return tuple(results)
    return tuple(sorted(results, key=_result_date, reverse=True))


def _result_date(result: LabResult) -> date:
    """Sort key: the result's date, results without one last (newest first)."""
    return result.on or date.min


def _abated(res: dict[str, Any], today: date) -> bool:
    """A Condition with any abatement[x] (dateTime, age, period, range, string) is not active.
    Only an abatement date still in the future leaves it active."""
    if res.keys().isdisjoint(_ABATEMENT_KEY_SET):  # the common case, tested in one call
        return False
    for key in ABATEMENT_KEYS:
        value = res.get(key)
        if value is None or value is False:
            continue
        if key == "abatementDateTime":
            when = parse_date(value)
            return when is None or when <= today
        if key == "abatementPeriod":
            end = parse_date(_d(value).get("end"))
            return end is None or end <= today
        return True
    return False


def _is_encounter_diagnosis(res: dict[str, Any]) -> bool:
    categories = res.get("category")
    return any(c.get("code") == "encounter-diagnosis" and c.get("system") in (CONDITION_CATEGORY, None)
               for cat in (categories if isinstance(categories, list) else ()) for c in _codings(cat))


TEXT_MATCHED_CONDITION_SETS = frozenset({
    "neck-pain", "red-flags", "neurological-red-flags", "neuropathic-features", "peripheral-neuropathy",
    "compressive-causes", "mechanical-causes",
})
"""Sets a Condition without any standard code may establish by its text: the trigger, the neurology
and its mechanical explanations.  Not "already handled" or risk factors: text alone never silences
the card for a deficiency, nor adds a risk factor."""
STANDARD_SYSTEMS = frozenset({
    "http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10",
    "http://hl7.org/fhir/sid/icd-9-cm", "http://loinc.org",
})


def _match_condition_text(knowledge: Knowledge, concept: Any) -> dict[str, Match]:
    """A problem-list entry with no standard coding (text only, or only the EHR's own code): its
    text and displays are matched by name, unless negated.  A standard code is authoritative, so an
    entry that has one is never re-read from its text."""
    if type(concept) is not dict or any(c.get("system") in STANDARD_SYSTEMS for c in _codings(concept)):
        return {}
    found: dict[str, Match] = {}
    for text in dict.fromkeys(_concept_texts(concept)):
        if text:
            for name in knowledge.match_text_affirmed(text, TEXT_MATCHED_CONDITION_SETS):
                found.setdefault(name, Match(text))
    return found


def current_pregnancy(evidence: tuple[Evidence, ...], ended: tuple[Evidence, ...], today: date,
                      max_days: int) -> tuple[Evidence, ...]:
    """The pregnancy evidence that still describes a current pregnancy.

    A record counts when it is dated within `max_days` (a pregnancy lasts at most about 42 weeks,
    so an older "pregnant" record describes a pregnancy that has ended, whatever its status) and
    no "ended" record (not pregnant, delivery, postpartum care, an abatement) is dated on or after
    it.  An undated record counts (its active status is the only statement we have)."""
    ends = [e.on for e in ended if e.on is not None]
    kept = []
    for e in evidence:
        if e.on is not None and ((today - e.on).days > max_days or e.on > today):
            continue
        if e.on is not None and any(end >= e.on for end in ends):
            continue
        if e.on is None and ends:
            continue
        kept.append(e)
    return tuple(kept)


def _abatement_date(res: dict[str, Any]) -> date | None:
    """The date a Condition abated, when one can be read."""
    return _first_date(res, "abatementDateTime", "abatementPeriod.end", "abatementPeriod.start")


def _conditions(resources: Iterable[Any], knowledge: Knowledge, validator: _Validator,
                col: _Collector) -> None:
    today = col.today
    by_set = col.by_set
    for res in resources:
        if not isinstance(res, dict):
            continue
        code = res.get("code")
        by_code = _match_concept(knowledge, code)
        if by_code.keys() <= CONDITION_SETS:  # the common case: every set is one a Condition counts in
            matched = dict(by_code)
        else:
            matched = {k: v for k, v in by_code.items() if k in CONDITION_SETS}
        if not matched:
            matched = _match_condition_text(knowledge, code)
            if not matched:
                continue
        verification = _status_codes(res.get("verificationStatus"))
        if verification and not verification.isdisjoint(EXCLUDED_VERIFICATION):
            continue
        onset = _date_or_period(res, "onsetDateTime", "onsetPeriod") or parse_date(res.get("recordedDate"))
        ended_on: date | None = None
        clinical = _status_codes(res.get("clinicalStatus"))
        active = (not clinical or not clinical.isdisjoint(COUNTED_CLINICAL)) and not _abated(res, today)
        if active and not clinical and _is_encounter_diagnosis(res):
            # An encounter diagnosis says what was true at that visit; without a clinical status
            # it is taken as current only while recent (a design choice, docs/rules.md).
            when = parse_date(res.get("recordedDate")) or onset
            active = when is not None and (today - when).days <= col.settings.encounter_diagnosis_days
        if not active:
            # Inactive/resolved/remission/abated: surgical history and structural malabsorption
            # still count (the absorption risk persists); a past B12 deficiency is a history.
            kept = {k: v for k, v in matched.items() if k == SURGERY_SET}
            if "malabsorption-persistent" in matched and "malabsorption" in matched:
                kept["malabsorption"] = matched["malabsorption"]
            if "b12-deficiency" in matched:
                kept["b12-deficiency-history"] = matched["b12-deficiency"]
            if "b12-deficiency-history" in matched:
                kept["b12-deficiency-history"] = matched["b12-deficiency-history"]
            # A delivery or "not pregnant" stays a fact; an abated pregnancy is evidence that it
            # ended, from its abatement date (without a date it simply no longer counts).
            if "pregnancy-ended" in matched:
                kept["pregnancy-ended"] = matched["pregnancy-ended"]
            if "pregnancy" in matched and _abatement_date(res):
                ended_on = _abatement_date(res)
                kept["pregnancy-ended"] = matched["pregnancy"]
            matched = kept
            if not matched:
                continue
        if "b12-deficiency" in matched and verification and not verification.isdisjoint(SUSPECTED_VERIFICATION):
            # NICE NG239: a suspected deficiency is confirmed by testing; it is not "handled".
            matched["b12-deficiency-suspected"] = matched.pop("b12-deficiency")
        if "chronic-neck-pain" in matched and "neck-pain" not in matched:
            # G89.29/G89.4 say "chronic pain", not where: chronic *neck* pain only on the same
            # Condition as a neck-pain code.
            del matched["chronic-neck-pain"]
            if not matched:
                continue
        if not validator.ok(res, "Condition"):
            continue
        rid = _s(res.get("id"))
        for name, match in matched.items():
            on = ended_on if name == "pregnancy-ended" and ended_on else onset
            ev = Evidence(name, match.label, "Condition", rid, on, match.system, match.code)
            group = by_set.get(name)
            if group is None:
                by_set[name] = [ev]
            else:
                group.append(ev)
        if "neck-pain" in matched and onset:
            col.onsets.append(onset)


def _date_or_period(res: dict[str, Any], at: str, period: str) -> date | None:
    """`_first_date(res, at, period + ".start")` unrolled (the readers' common pair of paths)."""
    found = parse_date(res.get(at))
    if found is None:
        node = res.get(period)
        if isinstance(node, dict):
            found = parse_date(node.get("start"))
    return found


def _observations(resources: Iterable[Any], knowledge: Knowledge, validator: _Validator,
                  col: _Collector) -> list[LabResult]:
    labs: list[LabResult] = []
    for res in resources:
        if type(res) is not dict:
            continue
        by_code = _match_concept(knowledge, res.get("code"))
        value_cc = res.get("valueCodeableConcept")
        components = res.get("component")
        if not by_code and value_cc is None and type(components) is not list:
            continue  # fast path: most observations (vitals, other labs) match nothing
        status = _s(res.get("status"))
        if status in EXCLUDED_OBSERVATION:
            continue
        lab = by_code.keys() & LAB_SETS
        # A panel ("B12 and folate") sends its results as components with their own codes.
        parts = [(res, lab)] if lab else []
        if type(components) is list:
            for comp in components:
                if type(comp) is dict:
                    comp_lab = _match_concept(knowledge, comp.get("code")).keys() & LAB_SETS
                    if comp_lab:
                        parts.append((comp, comp_lab))
        if parts:
            if (status not in FINAL_LAB and status not in PENDING_LAB) or not validator.ok(res, "Observation"):
                continue
            for element, sets in parts:
                labs.append(_lab_result(res, element, sets, knowledge, pending=status in PENDING_LAB))
            if lab:
                continue
        if not by_code and value_cc is None:
            continue
        findings = {k: v for k, v in by_code.items() if k in FINDING_SETS}
        if findings and _is_negative_answer(knowledge, res):
            findings = {}
        for name, match in _match_concept(knowledge, value_cc).items():
            if name in FINDING_SETS:
                findings.setdefault(name, match)
        if not findings or not validator.ok(res, "Observation"):
            continue
        on = _effective_date(res)
        for name, match in findings.items():
            col.add(name, Evidence.of(name, match, "Observation", _s(res.get("id")), on))
    return labs


def _effective_date(res: dict[str, Any]) -> date | None:
    """An Observation's date: `_first_date(res, "effectiveDateTime", "effectivePeriod.start",
    "effectiveInstant", "issued")` unrolled."""
    return (_date_or_period(res, "effectiveDateTime", "effectivePeriod") or parse_date(res.get("effectiveInstant"))
            or parse_date(res.get("issued")))


_LAB_SET_ORDER = ("b12-lab", "active-b12-lab", "mma-lab")


def _lab_result(res: dict[str, Any], element: dict[str, Any], sets: Iterable[str], knowledge: Knowledge,
                pending: bool) -> LabResult:
    """One result: `element` is the Observation itself or one of its components (the date, id and
    status are the Observation's).  The value is read wherever FHIR puts it (lab_values.read_value)
    and converted with the analyte's unit table; an implausible value is kept but not interpreted,
    and logged without the value or any patient data."""
    for set_name in _LAB_SET_ORDER:
        if set_name in sets:
            break
    else:  # the callers pass a part of LAB_SETS that is not empty
        raise ValueError(f"no laboratory value set in {sorted(sets)}")
    analyte = ANALYTE_OF_SET[set_name]
    loinc = ""  # the first LOINC coding in the set, as sent (stripped)
    concept = element.get("code")
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for coding in codings if isinstance(codings, list) else ():
        if isinstance(coding, dict) and coding.get("system") == LOINC:
            code = coding.get("code")
            if _s(code) and set_name in knowledge.match_code(LOINC, code):
                loinc = code.strip()
                break
    on = _effective_date(res)
    read: ReadValue | None = read_value(element)
    units = knowledge.lab_units(set_name)
    unit = read.unit if read else None
    canonical = None
    implausible = False
    if read is not None and units is not None:
        found = unit_factor(read, units, loinc)
        if found is not None:
            factor, found_unit = found
            if unit is None:
                unit = found_unit  # no unit sent: the LOINC code's own unit was assumed
            value = read.number * factor
            if is_plausible(value, units) and read.number > 0:
                canonical = float(value)
            else:
                implausible = True
                log.warning("implausible laboratory value not interpreted",
                            extra={"event": "implausible_lab_value", "detail": analyte})
        elif read.number <= 0:
            implausible = True
            log.warning("implausible laboratory value not interpreted",
                        extra={"event": "implausible_lab_value", "detail": analyte})
    return LabResult(  # positional, in field order (keywords cost more, see derive_facts)
        _s(res.get("id")),                                     # resource_id
        loinc,                                                 # loinc
        on,                                                    # on
        float(read.number) if read else None,                  # value
        unit,                                                  # unit
        read.comparator if read else None,                     # comparator
        canonical if analyte == "b12" and not pending else None,  # value_ng_l
        analyte,                                               # analyte
        None if pending else canonical,                        # canonical
        units.canonical if units else None,                    # canonical_unit
        read.text if read else None,                           # value_text
        implausible,                                           # implausible
        pending)                                               # pending


def _medications(resources: Iterable[Any], rtype: str, knowledge: Knowledge, validator: _Validator,
                 col: _Collector, medications: Mapping[str, dict[str, Any]]) -> None:
    for res in resources:
        if not isinstance(res, dict):
            continue
        status = res.get("status")  # (`_s(status) in` the set, for a set of non-blank strings)
        if not isinstance(status, str) or status not in ACTIVE_MEDICATION:
            continue
        matched = _match_medication(knowledge, res, medications)
        if not matched or not validator.ok(res, rtype):
            continue
        on = (parse_date(res.get("authoredOn")) or _date_or_period(res, "effectiveDateTime", "effectivePeriod")
              or parse_date(res.get("dateAsserted")))
        rid = _s(res.get("id"))
        for name, match in matched.items():
            ev = Evidence(name, match.label, rtype, rid, on, match.system, match.code)
            if name == "acid-suppressants":
                col.acid.append((ev, *_course_dates(res, rtype)))
            else:
                col.add(name, ev)


def _course_dates(res: dict[str, Any], rtype: str) -> tuple[bool, date | None]:
    """(start known, earliest date) of a medication entry, for the duration of acid suppression.

    A start is known from MedicationStatement.effectivePeriod.start, or from the authoredOn of a
    MedicationRequest that is not a renewal (no priorPrescription).  Any date on a still-active
    entry (authoredOn, effective, dateAsserted) proves use since then."""
    authored = parse_date(res.get("authoredOn"))
    period = res.get("effectivePeriod")
    started = parse_date(period.get("start")) if isinstance(period, dict) else None
    dates = [d for d in (authored, started, parse_date(res.get("effectiveDateTime")),
                         parse_date(res.get("dateAsserted"))) if d]
    if rtype == "MedicationStatement":
        known = started is not None
    else:
        known = authored is not None and res.get("priorPrescription") is None
    return known, (min(dates) if dates else None)


def _acid_suppressant_risk(col: _Collector) -> None:
    """AAFP 2017 (Langan): PPI/H2-blocker use for more than 12 months is the B12 risk.  Counted
    when any active entry dates back at least `acid_suppressant_min_days`; not counted when every
    entry has a known start more recent than that (a short course); otherwise (no start date
    recorded) counted, and the card says the duration is unknown."""
    if not col.acid:
        return
    limit = col.settings.acid_suppressant_min_days
    long_term = any(seen is not None and (col.today - seen).days >= limit for _, _, seen in col.acid)
    all_known_short = all(known for _, known, _ in col.acid)
    if not long_term and all_known_short:
        return
    for ev, _, _ in col.acid:
        col.add("acid-suppressants", ev)
    if not long_term:
        col.add("acid-suppressants-duration-unknown", col.acid[0][0])


def _procedures(resources: Iterable[Any], knowledge: Knowledge, validator: _Validator,
                col: _Collector) -> None:
    for res in _dicts(resources):
        if res.get("status") != "completed":
            continue
        match = _match_concept(knowledge, res.get("code")).get(SURGERY_SET)
        if match is None or not validator.ok(res, "Procedure"):
            continue
        on = _first_date(res, "performedDateTime", "performedPeriod.start")
        col.add(SURGERY_SET, Evidence.of(SURGERY_SET, match, "Procedure", _s(res.get("id")), on))


def _lab_order(knowledge: Knowledge, res: dict[str, Any]) -> Match | None:
    """The B12/MMA test a ServiceRequest orders: by code, else (an EHR's own orderable code) by
    the test's name in its text or displays (lab-name synonyms in the b12-lab/mma-lab sets)."""
    concept = res.get("code")
    matched = _match_concept(knowledge, concept)
    found = next((matched[k] for k in ("b12-lab", "mma-lab") if k in matched), None)
    if found is not None or not isinstance(concept, dict):
        return found
    for text in dict.fromkeys(_concept_texts(concept)):
        if text:
            names = knowledge.match_text(text)
            if "b12-lab" in names or "mma-lab" in names:
                return Match(text)
    return None


def _service_requests(resources: Iterable[Any], knowledge: Knowledge, validator: _Validator,
                      col: _Collector) -> None:
    """Active B12/MMA orders.  One authored more than `pending_order_max_days` ago is stale (never
    collected or never resulted): it no longer stands for a test in progress."""
    for res in _dicts(resources):
        if _s(res.get("status")) not in PENDING_ORDER:
            continue
        match = _lab_order(knowledge, res)
        if match is None or not validator.ok(res, "ServiceRequest"):
            continue
        on = _first_date(res, "authoredOn", "occurrenceDateTime", "occurrencePeriod.start")
        if on is not None and (col.today - on).days > col.settings.pending_order_max_days:
            continue
        col.add("pending-order", Evidence.of("pending-order", match, "ServiceRequest", _s(res.get("id")), on))


def _draft_orders(resources: Iterable[Any], knowledge: Knowledge, validator: _Validator,
                  col: _Collector, medications: Mapping[str, dict[str, Any]] = MappingProxyType({})) -> None:
    """Orders being written in this order-select/order-sign session (context.draftOrders).

    A draft B12/MMA test is a pending order; a draft B12 prescription means the deficiency is
    already being handled.  Drafts are checked loosely (any live status), as they are unsigned."""
    for res in _dicts(resources):
        if _s(res.get("status")) in DEAD_DRAFT:
            continue
        rtype = res.get("resourceType")
        if rtype == "ServiceRequest":
            match = _lab_order(knowledge, res)
            if match is not None and validator.ok(res, rtype):
                col.add("pending-order", Evidence.of("pending-order", match, rtype, _s(res.get("id"))))
        elif rtype == "MedicationRequest":
            match = _match_medication(knowledge, res, medications).get("b12-replacement")
            if match is not None and validator.ok(res, rtype):
                col.add("b12-replacement", Evidence.of("b12-replacement", match, rtype, _s(res.get("id"))))


# --- which resources the derivation can use -----------------------------------------------------

HEAD_FIELDS: tuple[str, ...] = (
    "resourceType", "id", "subject", "patient", "code", "valueCodeableConcept", "component",
    "medicationCodeableConcept", "medicationReference",
)
"""The top-level fields `resource_needed` reads (plus those the gatherer's patient check reads):
the *head* of a resource, which the gatherer decodes before deciding to decode the rest."""

_ALWAYS_NEEDED = frozenset({"Patient", "Medication"})
_OBSERVATION_SETS = LAB_SETS | FINDING_SETS


def _coded_in(knowledge: Knowledge, concept: Any, sets: frozenset[str]) -> bool:
    """Whether a coding of `concept` is in one of `sets` (by code alone: `_match_concept` may
    still refuse a concept that needs supporting text, so this is the wider test)."""
    if type(concept) is not dict:
        return False
    codings = concept.get("coding")
    if type(codings) is not list:
        return False
    match = knowledge.match_code
    for coding in codings:
        if type(coding) is dict and not match(coding.get("system"), coding.get("code")).isdisjoint(sets):
            return True
    return False


def resource_needed(knowledge: Knowledge, resource: Mapping[str, Any] | Head) -> bool:
    """Whether `derive_facts` could read anything from `resource`, judged from its head (the
    `HEAD_FIELDS` as a dict or a typed `wire.Head`; a full resource works too).  True is a superset of what the derivation uses:
    it is the first test each per-type reader above applies (a code or text in one of its value
    sets), before any status, date or validity check, so a resource for which this is False
    contributes nothing to the facts and need not be decoded.  MedicationRequests/Statements
    given by reference and every Patient and Medication are always needed."""
    if type(resource) is Head:
        return _head_needed(knowledge, resource)
    rtype = resource.get("resourceType")
    if rtype == "Observation":  # most resources: vitals and other labs, read by code only
        if _coded_in(knowledge, resource.get("code"), _OBSERVATION_SETS):
            return True
        value_cc = resource.get("valueCodeableConcept")
        if value_cc is not None and _coded_in(knowledge, value_cc, FINDING_SETS):
            return True
        components = resource.get("component")
        return type(components) is list and any(
            type(comp) is dict and _coded_in(knowledge, comp.get("code"), LAB_SETS) for comp in components)
    if rtype == "Condition":
        code = resource.get("code")
        return _coded_in(knowledge, code, CONDITION_SETS) or bool(_match_condition_text(knowledge, code))
    if rtype in ("MedicationRequest", "MedicationStatement"):
        # As `_match_medication` without a reference: the concept's codes, else its names.
        if resource.get("medicationReference") is not None:
            return True
        concept = resource.get("medicationCodeableConcept")
        return _coded_in(knowledge, concept, MEDICATION_SETS) or _named_in(knowledge, concept, MEDICATION_SETS)
    if rtype == "Procedure":
        return _coded_in(knowledge, resource.get("code"), _SURGERY_SETS)
    if rtype == "ServiceRequest":
        # As `_lab_order`: the test's code, else its name.
        concept = resource.get("code")
        return _coded_in(knowledge, concept, _LAB_ORDER_SETS) or _named_in(knowledge, concept, _LAB_ORDER_SETS)
    return type(rtype) is str and rtype in _ALWAYS_NEEDED


_SURGERY_SETS = frozenset({SURGERY_SET})
_LAB_ORDER_SETS = frozenset({"b12-lab", "mma-lab"})


def _named_in(knowledge: Knowledge, concept: Any, sets: frozenset[str]) -> bool:
    """Whether the text or a coding's display of `concept` names one of `sets` (`match_text`)."""
    if type(concept) is not dict:
        return False
    return any(text and not knowledge.match_text(text).isdisjoint(sets) for text in _concept_texts(concept))


# The same test on a typed head (wire.Head): the hook path's common case, so written for speed.
# It must decide exactly as `resource_needed` on the dict head (tests/test_partial_decoding.py
# checks both on generated resources).

def _typed_coded_in(knowledge: Knowledge, concept: Concept | None, sets: frozenset[str]) -> bool:
    if concept is None or concept.coding is None:
        return False
    match = knowledge.match_code
    for coding in concept.coding:
        if not match(coding.system, coding.code).isdisjoint(sets):
            return True
    return False


def _typed_texts(concept: Concept) -> list[str]:
    """As `_concept_texts`: the concept's text and its codings' displays (blank ones left out)."""
    texts = [concept.text] if concept.text and concept.text.strip() else []
    return texts + [c.display for c in concept.coding or () if c.display and c.display.strip()]


def _typed_named_in(knowledge: Knowledge, concept: Concept | None, sets: frozenset[str]) -> bool:
    return concept is not None and any(
        not knowledge.match_text(text).isdisjoint(sets) for text in _typed_texts(concept))


_GATE_MEMO_LIMIT = 4096
"""Entries kept in the memo of `head_gate` (then it starts over)."""


def head_gate(knowledge: Knowledge) -> Callable[[Head], bool]:
    """`_head_needed` bound to `knowledge`, with the common case inlined: an Observation (vital
    signs, other labs: most of every record) whose codings are all known pairs outside the
    rules' sets is answered with one memo lookup per coding and no further call, and so is a
    Condition with a standard code.  A medication or an order, whose names are matched in their
    texts, is answered from a memo of `_head_needed`'s answer keyed by the fields it reads
    (`_gate_key`)."""
    known = knowledge.known_codes()
    match = knowledge.match_code
    observation_sets = _OBSERVATION_SETS
    condition_sets = CONDITION_SETS
    verdicts: dict[tuple[Any, ...], bool] = {}

    def needed(head: Head) -> bool:
        if head.resourceType == "Observation" and head.valueCodeableConcept is None \
                and head.component is None:
            code = head.code
            if code is None or code.coding is None:
                return False
            for coding in code.coding:
                names = known((coding.system, coding.code))
                if names is None:
                    names = match(coding.system, coding.code)
                if not names.isdisjoint(observation_sets):
                    return True
            return False
        if head.resourceType == "Condition" and head.code is not None and head.code.coding:
            # As `_head_needed`: a coding in the rules' sets decides; else a standard code means
            # the text is not read (the problem lists' common case, answered here).
            standard = False
            for coding in head.code.coding:
                names = known((coding.system, coding.code))
                if names is None:
                    names = match(coding.system, coding.code)
                if not names.isdisjoint(condition_sets):
                    return True
                if coding.system in STANDARD_SYSTEMS:
                    standard = True
            if standard:
                return False
        key = _gate_key(head)
        if key is None:
            return _head_needed(knowledge, head)
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = _head_needed(knowledge, head)
            if _gate_key_chars(key) <= _CONCEPT_MEMO_KEY_CHARS:  # bounded memory, whatever is sent
                if len(verdicts) >= _GATE_MEMO_LIMIT:
                    verdicts.clear()
                verdicts[key] = verdict
        return verdict

    return needed


def _typed_concept_key(concept: Concept | None) -> tuple[Any, ...] | None:
    """Everything `_head_needed` can read of a typed concept: its text and its codings."""
    if concept is None:
        return None
    codings = concept.coding
    return (concept.text, None if codings is None else tuple((c.system, c.code, c.display) for c in codings))


def _gate_key(head: Head) -> tuple[Any, ...] | None:
    """The fields `_head_needed` reads for a ServiceRequest or a MedicationRequest/Statement
    (whose names it looks for in texts: 1-2 µs), as a memo key; None for the other heads, which
    it answers by code about as fast as the key is built (measured on the bench patients)."""
    rtype = head.resourceType
    if rtype == "ServiceRequest":
        return (rtype, _typed_concept_key(head.code))
    if rtype == "MedicationRequest" or rtype == "MedicationStatement":
        if head.medicationReference is not None:
            return None
        return (rtype, _typed_concept_key(head.medicationCodeableConcept))
    return None


def _gate_key_chars(key: Any) -> int:
    """Characters of the strings in a `_gate_key` (nested tuples of strings and None)."""
    if type(key) is str:
        return len(key)
    if type(key) is tuple:
        return sum(_gate_key_chars(part) for part in key)
    return 0


def _head_needed(knowledge: Knowledge, head: Head) -> bool:
    rtype = head.resourceType
    if rtype == "Observation":
        code = head.code
        if code is not None and code.coding is not None:
            match = knowledge.match_code
            for coding in code.coding:
                if not match(coding.system, coding.code).isdisjoint(_OBSERVATION_SETS):
                    return True
        if head.valueCodeableConcept is not None and \
                _typed_coded_in(knowledge, head.valueCodeableConcept, FINDING_SETS):
            return True
        return head.component is not None and any(
            _typed_coded_in(knowledge, comp.code, LAB_SETS) for comp in head.component)
    if rtype == "Condition":
        code = head.code
        if _typed_coded_in(knowledge, code, CONDITION_SETS):
            return True
        if code is None or any(c.system in STANDARD_SYSTEMS for c in code.coding or ()):
            return False  # as `_match_condition_text`: a standard code is never re-read from text
        return any(knowledge.match_text_affirmed(text, TEXT_MATCHED_CONDITION_SETS)
                   for text in dict.fromkeys(_typed_texts(code)))
    if rtype in ("MedicationRequest", "MedicationStatement"):
        if head.medicationReference is not None:
            return True
        concept = head.medicationCodeableConcept
        return (_typed_coded_in(knowledge, concept, MEDICATION_SETS)
                or _typed_named_in(knowledge, concept, MEDICATION_SETS))
    if rtype == "Procedure":
        return _typed_coded_in(knowledge, head.code, _SURGERY_SETS)
    if rtype == "ServiceRequest":
        return (_typed_coded_in(knowledge, head.code, _LAB_ORDER_SETS)
                or _typed_named_in(knowledge, head.code, _LAB_ORDER_SETS))
    return rtype in _ALWAYS_NEEDED
