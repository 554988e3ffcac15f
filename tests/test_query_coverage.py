"""The prefetch templates (and so the fallback queries) ask for everything the fact matcher reads.

Two checks, so that prefetch and FHIR fallback cannot drift apart:

- by the constants: every value-set constant of `cds_service.facts` is searched for by some
  prefetch key (`patient_data.SEARCHES`), so a set added to a constant reaches discovery and
  fallback, and a new constant with no search fails here;
- by behaviour: for every exact code of every value set, placed where the matcher could read it
  (Observation code and value, Condition, Procedure, ServiceRequest, medications), whenever the
  real matcher derives a fact from that one resource, some template must select it.  The
  templates are evaluated here by a small interpreter of the search subset they use (it refuses
  any parameter it does not know, so it cannot quietly pass a template).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest

from cds_service import facts
from cds_service.config import Settings
from cds_service.facts import derive_facts
from cds_service.knowledge import VALUESET_NAMES, Knowledge
from cds_service.patient_data import SEARCHES, build_prefetch_templates, render_template
from cds_service.record import PREFETCH_KEYS, PatientRecord
from tests.fhir_builders import NOW, PATIENT_ID, UCUM

SETTINGS = Settings()
LOCAL = "urn:oid:2.16.840.1.113883.3.7777.1"  # an EHR's own code system (synthetic)
MAX_QUERY_CHARS = 6000
"""Rendered templates stay well under the 8 KiB request line most servers accept."""


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    return Knowledge.load(SETTINGS.valuesets_dir)


@pytest.fixture(scope="module")
def templates(knowledge: Knowledge) -> dict[str, str]:
    return build_prefetch_templates(knowledge.valueset_codes)


# --- a tiny interpreter of the template subset ------------------------------------------------

def _unescape_split(value: str, sep: str) -> list[str]:
    parts, buf, escaped = [], [], False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def _codings(concept: Any) -> list[dict[str, Any]]:
    return [c for c in (concept or {}).get("coding", []) if isinstance(c, dict)]


def _token_matches(concept: Any, value: str) -> bool:
    wanted = []
    for item in _unescape_split(value, ","):
        system, _, code = item.partition("|") if "|" in item else ("", "", item)
        wanted.append((system, code))
    return any((c.get("system"), c.get("code")) == w or (not w[0] and c.get("code") == w[1])
               for c in _codings(concept) for w in wanted)


TOKEN_ELEMENTS = {
    ("Observation", "code"): "code", ("Observation", "value-concept"): "valueCodeableConcept",
    ("Condition", "code"): "code", ("Procedure", "code"): "code", ("ServiceRequest", "code"): "code",
    ("MedicationRequest", "code"): "medicationCodeableConcept",
    ("MedicationStatement", "code"): "medicationCodeableConcept",
}


def selects(template: str, resource: dict[str, Any]) -> bool:
    """Whether the search `template` (rendered for PATIENT_ID) returns `resource`."""
    path, _, query = render_template(template, {"context.patientId": PATIENT_ID}).partition("?")
    if path != resource["resourceType"]:
        return False
    for name, value in parse_qsl(query, keep_blank_values=True):
        value = unquote(value) if "%" in value else value
        if name == "patient":
            if resource.get("subject", {}).get("reference") != f"Patient/{value}":
                return False
        elif name in ("_count", "_sort"):
            continue
        elif name == "status":
            if resource.get("status") not in value.split(","):
                return False
        elif path == "Observation" and name in ("combo-code", "component-code"):
            concepts = [c.get("code") for c in resource.get("component", []) if isinstance(c, dict)]
            if name == "combo-code":
                concepts.append(resource.get("code"))
            if not any(_token_matches(c, value) for c in concepts):
                return False
        elif (path, name) in TOKEN_ELEMENTS:
            if not _token_matches(resource.get(TOKEN_ELEMENTS[(path, name)]), value):
                return False
        else:
            raise AssertionError(f"the interpreter does not know {path} search parameter {name!r}")
    return True


# --- resources placing one code where the matcher may read it -----------------------------------

SUBJECT = {"reference": f"Patient/{PATIENT_ID}"}
PATIENT = {"resourceType": "Patient", "id": PATIENT_ID, "birthDate": "1990-01-01"}


def placements(system: str | None, code: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, resource) for the code as each resource type the service gathers would carry it,
    alongside a local coding (EHRs send several codings per concept).  With `system` None, `code`
    is a name and the concept is the EHR's local code with that text (a text-only entry)."""
    if system is None:
        concept = {"coding": [{"system": LOCAL, "code": "L-2", "display": code}], "text": code}
    else:
        concept = {"coding": [{"system": LOCAL, "code": "L-1", "display": "local"},
                              {"system": system, "code": code}]}
    local_only = {"coding": [{"system": LOCAL, "code": "Q-1"}], "text": "question"}
    when = "2025-05-01"
    yield "Observation.code", {
        "resourceType": "Observation", "id": "o1", "status": "final", "code": concept,
        "subject": SUBJECT, "effectiveDateTime": when,
        "valueQuantity": {"value": 300, "unit": "pg/mL", "system": UCUM, "code": "pg/mL"}}
    yield "Observation.code (no value)", {
        "resourceType": "Observation", "id": "o2", "status": "final", "code": concept,
        "subject": SUBJECT, "effectiveDateTime": when}
    yield "Observation.component", {
        "resourceType": "Observation", "id": "o4", "status": "final", "code": local_only,
        "subject": SUBJECT, "effectiveDateTime": when,
        "component": [{"code": concept,
                       "valueQuantity": {"value": 300, "unit": "pg/mL", "system": UCUM, "code": "pg/mL"}}]}
    yield "Observation.value", {
        "resourceType": "Observation", "id": "o3", "status": "final", "code": local_only,
        "subject": SUBJECT, "effectiveDateTime": when, "valueCodeableConcept": concept}
    yield "Condition.code", {
        "resourceType": "Condition", "id": "c1", "code": concept, "subject": SUBJECT,
        "onsetDateTime": "2024-01-01",
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                       "code": "active"}]}}
    yield "Procedure.code", {"resourceType": "Procedure", "id": "p1", "status": "completed",
                             "code": concept, "subject": SUBJECT, "performedDateTime": "2020-01-01"}
    yield "ServiceRequest.code", {"resourceType": "ServiceRequest", "id": "s1", "status": "active",
                                  "intent": "order", "code": concept, "subject": SUBJECT,
                                  "authoredOn": when}
    yield "MedicationRequest.medication", {
        "resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
        "medicationCodeableConcept": concept, "subject": SUBJECT, "authoredOn": "2023-01-01"}
    yield "MedicationStatement.medication", {
        "resourceType": "MedicationStatement", "id": "m2", "status": "active",
        "medicationCodeableConcept": concept, "subject": SUBJECT, "effectiveDateTime": "2023-01-01"}


def decision_facts(knowledge: Knowledge, *resources: dict[str, Any]) -> dict[str, Any]:
    """The facts of a record (all fields the rules may read; not the skip counters)."""
    record = PatientRecord.from_resources([PATIENT, *resources])
    derived = derive_facts(record, SimpleNamespace(patient_id=PATIENT_ID), knowledge, SETTINGS, NOW)
    out = dataclasses.asdict(derived)
    for counter in ("skipped_resources", "skipped_references"):
        out.pop(counter, None)
    return out


# --- the checks ------------------------------------------------------------------------------

def valueset_constants() -> dict[str, frozenset[str]]:
    """facts' constants naming value sets: `*_SETS` / `*_SET`, or any set of value-set names."""
    found: dict[str, frozenset[str]] = {}
    for name, value in vars(facts).items():
        if not name.isupper() or name.startswith("_"):
            continue
        if isinstance(value, str) and (name.endswith("_SET") or name.endswith("_SETS")):
            found[name] = frozenset({value})
        elif isinstance(value, (frozenset, set)) and value and all(isinstance(v, str) for v in value) \
                and (name.endswith("_SETS") or name.endswith("_SET") or set(value) <= set(VALUESET_NAMES)):
            found[name] = frozenset(value)
    return found


def test_every_matcher_constant_is_searched_for() -> None:
    constants = valueset_constants()
    assert {"CONDITION_SETS", "FINDING_SETS", "LAB_SETS", "MEDICATION_SETS", "SURGERY_SET"} <= set(constants)
    for name, sets in constants.items():
        if not sets <= set(VALUESET_NAMES) and not sets & set(VALUESET_NAMES):
            continue  # a set of statuses or words, not of value sets
        covering = [key for key, spec in SEARCHES.items() if sets <= spec.valuesets]
        assert covering, f"facts.{name} ({', '.join(sorted(sets))}) has no prefetch template searching for it"


def test_searches_cover_every_record_key_and_say_why_unfiltered() -> None:
    assert ("patient", *SEARCHES) == PREFETCH_KEYS
    for key, spec in SEARCHES.items():
        assert spec.param or spec.unfiltered_because, f"{key}: an unfiltered search must say why"


def test_rendered_templates_stay_short(templates: dict[str, str]) -> None:
    for key, template in templates.items():
        rendered = render_template(template, {"context.patientId": "a" * 64})
        assert len(rendered) < MAX_QUERY_CHARS, f"{key}: {len(rendered)} characters"


def concepts_of(knowledge: Knowledge) -> Iterator[tuple[str, str | None, str]]:
    """(value set, system, code) for every exact code of every loaded value set, and (value set,
    None, name) for every name the text matcher knows (ingredients, brand names, test names)."""
    for name, vs in knowledge.valuesets.items():
        for system, code in knowledge.valueset_codes(name):
            yield name, system, code
        for text in dict.fromkeys(vs.ingredient_names + getattr(vs, "synonyms", ())):
            yield name, None, text


def test_every_code_the_matcher_reads_is_asked_for(knowledge: Knowledge, templates: dict[str, str]) -> None:
    """Codes, and text-only entries: whatever the matcher reads from one resource, some
    template returns that resource."""
    baseline = decision_facts(knowledge)
    read = missed = 0
    for name, system, code in concepts_of(knowledge):
            for where, res in placements(system, code):
                if decision_facts(knowledge, res) == baseline:
                    continue  # the matcher does not read this code there
                read += 1
                if not any(selects(t, res) for k, t in templates.items() if k != "patient"):
                    missed += 1
                    what = f"{system}|{code}" if system else f"the text {code!r}"
                    pytest.fail(f"the matcher reads {what} ({name}) from {where}, "
                                "but no prefetch template asks for it")
    assert read > 100 and missed == 0  # not vacuous: most codes are read somewhere


def test_observation_coded_diet_is_asked_for(knowledge: Knowledge, templates: dict[str, str]) -> None:
    """The reported gap: a diet recorded as the Observation's code (not its value)."""
    (system, code), *_ = knowledge.valueset_codes("vegan-vegetarian-diet")
    res = next(r for w, r in placements(system, code) if w == "Observation.code (no value)")
    assert decision_facts(knowledge, res)["risk_factors"], "the matcher reads a coded diet"
    assert selects(templates["findings"], res)


def test_interpreter_is_not_vacuous(templates: dict[str, str]) -> None:
    res = {"resourceType": "Observation", "status": "final", "subject": SUBJECT,
           "code": {"coding": [{"system": LOCAL, "code": "X"}]}}
    assert not any(selects(t, res) for k, t in templates.items() if k != "patient")
    with pytest.raises(AssertionError):
        selects("Observation?patient={{context.patientId}}&category=laboratory", res)
