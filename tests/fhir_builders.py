"""Small builders for FHIR R4 test fixtures (valid against fhir.resources R4B unless told otherwise).

Other test modules may import these.  Dates accept a `date` or a FHIR date string; `days_before(n)`
gives a date relative to `TODAY`, the fixed "now" used with `NOW` in clinical tests.
"""

from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta, timezone
from typing import Any

from cds_service.protocol import HookContext, HookRequest
from cds_service.record import PatientRecord

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
CLINICAL_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"

PATIENT_ID = "p1"
TODAY = date(2025, 6, 15)
NOW = datetime(2025, 6, 15, 10, 30, tzinfo=timezone.utc)

_ids = itertools.count(1)

Resource = dict[str, Any]


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def _iso(value: date | str | None) -> str | None:
    return value.isoformat() if isinstance(value, date) else value


def days_before(n: int, today: date = TODAY) -> date:
    return today - timedelta(days=n)


def years_before(years: int, today: date = TODAY) -> date:
    """Same month/day `years` earlier (Feb 29 -> Feb 28)."""
    try:
        return today.replace(year=today.year - years)
    except ValueError:
        return today.replace(year=today.year - years, day=28)


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def concept(system: str, code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [coding(system, code, display)]}
    if text:
        out["text"] = text
    return out


def patient(birth_date: date | str | None = None, *, id: str = PATIENT_ID, name: str | None = None,
            gender: str | None = None) -> Resource:
    res: Resource = {"resourceType": "Patient", "id": id}
    if name:
        family, _, given = name.partition(", ")
        res["name"] = [{"family": family, "given": [given] if given else []}] if given else [{"text": name}]
    if gender:
        res["gender"] = gender
    if birth_date is not None:
        res["birthDate"] = _iso(birth_date)
    return res


def condition(code: str, system: str = SNOMED, *, display: str | None = None, text: str | None = None,
              onset: date | str | None = None, onset_period_start: date | str | None = None,
              recorded: date | str | None = None, clinical: str | None = "active",
              verification: str | None = None, id: str | None = None,
              patient_id: str = PATIENT_ID) -> Resource:
    res: Resource = {"resourceType": "Condition", "id": id or _id("cond"),
                     "subject": {"reference": f"Patient/{patient_id}"},
                     "code": concept(system, code, display, text)}
    if clinical:
        res["clinicalStatus"] = concept(CLINICAL_STATUS, clinical)
    if verification:
        res["verificationStatus"] = concept(VERIFICATION_STATUS, verification)
    if onset is not None:
        res["onsetDateTime"] = _iso(onset)
    if onset_period_start is not None:
        res["onsetPeriod"] = {"start": _iso(onset_period_start)}
    if recorded is not None:
        res["recordedDate"] = _iso(recorded)
    return res


def observation(code: str | None = None, system: str = SNOMED, *, status: str = "final",
                effective: date | str | None = None, value_code: tuple[str, str] | None = None,
                value_quantity: dict[str, Any] | None = None, value_boolean: bool | None = None,
                value_string: str | None = None, code_text: str | None = None,
                id: str | None = None, patient_id: str = PATIENT_ID) -> Resource:
    res: Resource = {"resourceType": "Observation", "id": id or _id("obs"), "status": status,
                     "subject": {"reference": f"Patient/{patient_id}"},
                     "code": concept(system, code) if code else {"text": code_text or "Finding"}}
    if effective is not None:
        res["effectiveDateTime"] = _iso(effective)
    if value_code is not None:
        res["valueCodeableConcept"] = concept(*value_code)
    if value_quantity is not None:
        res["valueQuantity"] = value_quantity
    if value_boolean is not None:
        res["valueBoolean"] = value_boolean
    if value_string is not None:
        res["valueString"] = value_string
    return res


def b12_result(value: float | None, *, on: date | str, unit: str | None = "pg/mL", ucum: bool = True,
               loinc: str = "2132-9", status: str = "final", comparator: str | None = None,
               id: str | None = None) -> Resource:
    """A serum B12 Observation.  `unit` goes into valueQuantity.code (UCUM) when `ucum`, else only
    into the free-text `unit`; None leaves the unit out."""
    qty: dict[str, Any] = {}
    if value is not None:
        qty["value"] = value
    if comparator:
        qty["comparator"] = comparator
    if unit is not None:
        qty["unit"] = unit
        if ucum:
            qty["system"] = UCUM
            qty["code"] = unit
    return observation(loinc, LOINC, status=status, effective=on, value_quantity=qty or None, id=id)


def mma_result(value: float, *, on: date | str, status: str = "final") -> Resource:
    return observation("13964-2", LOINC, status=status, effective=on,
                       value_quantity={"value": value, "unit": "nmol/L", "system": UCUM, "code": "nmol/L"})


def medication_request(code: str | None = None, system: str = RXNORM, *, display: str | None = None,
                       text: str | None = None, status: str = "active", intent: str = "order",
                       authored: date | str | None = None, reference_display: str | None = None,
                       id: str | None = None, patient_id: str = PATIENT_ID) -> Resource:
    res: Resource = {"resourceType": "MedicationRequest", "id": id or _id("medrx"), "status": status,
                     "intent": intent, "subject": {"reference": f"Patient/{patient_id}"}}
    if reference_display is not None:
        res["medicationReference"] = {"reference": "Medication/m1", "display": reference_display}
    else:
        med: dict[str, Any] = {}
        if code:
            med["coding"] = [coding(system, code, display)]
        if text:
            med["text"] = text
        res["medicationCodeableConcept"] = med
    if authored is not None:
        res["authoredOn"] = _iso(authored)
    return res


def medication_statement(code: str | None = None, system: str = RXNORM, *, display: str | None = None,
                         text: str | None = None, status: str = "active", id: str | None = None,
                         patient_id: str = PATIENT_ID) -> Resource:
    med: dict[str, Any] = {}
    if code:
        med["coding"] = [coding(system, code, display)]
    if text:
        med["text"] = text
    return {"resourceType": "MedicationStatement", "id": id or _id("medst"), "status": status,
            "subject": {"reference": f"Patient/{patient_id}"}, "medicationCodeableConcept": med}


def procedure(code: str, system: str = SNOMED, *, status: str = "completed",
              performed: date | str | None = None, id: str | None = None,
              patient_id: str = PATIENT_ID) -> Resource:
    res: Resource = {"resourceType": "Procedure", "id": id or _id("proc"), "status": status,
                     "subject": {"reference": f"Patient/{patient_id}"}, "code": concept(system, code)}
    if performed is not None:
        res["performedDateTime"] = _iso(performed)
    return res


def service_request(loinc: str = "2132-9", *, status: str = "active", intent: str = "order",
                    id: str | None = None, patient_id: str = PATIENT_ID) -> Resource:
    return {"resourceType": "ServiceRequest", "id": id or _id("sr"), "status": status, "intent": intent,
            "subject": {"reference": f"Patient/{patient_id}"}, "code": concept(LOINC, loinc)}


def record(*resources: Resource, draft_orders: tuple[Resource, ...] | list[Resource] = (),
           unavailable: frozenset[str] | set[str] = frozenset()) -> PatientRecord:
    return PatientRecord.from_resources(list(resources), draft_orders=list(draft_orders),
                                        unavailable=frozenset(unavailable))


def context(*, patient_id: str = PATIENT_ID, user_id: str = "Practitioner/doc1",
            encounter_id: str | None = None) -> HookContext:
    return HookContext(user_id=user_id, patient_id=patient_id, encounter_id=encounter_id)


def hook_request(hook: str = "patient-view", *, patient_id: str = PATIENT_ID,
                 user_id: str = "Practitioner/doc1", encounter_id: str | None = None,
                 draft_orders: list[Resource] | None = None) -> HookRequest:
    bundle = None
    if draft_orders is not None:
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"resource": r} for r in draft_orders]}
    return HookRequest(hook=hook, hook_instance="d1e5b7a2-0000-4000-8000-000000000001",
                       context=HookContext(user_id=user_id, patient_id=patient_id,
                                           encounter_id=encounter_id, draft_orders=bundle))


# Common clinical fixtures ----------------------------------------------------------------------

def neck_pain(*, onset_days: int = 120, system: str = SNOMED, **kw: Any) -> Resource:
    code = "81680005" if system == SNOMED else "M54.2"
    return condition(code, system, onset=days_before(onset_days), **kw)


def metformin(**kw: Any) -> Resource:
    return medication_request("6809", display="metformin", **kw)
