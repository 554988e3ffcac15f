"""Deterministic synthetic patients for the benchmark (seeded; no clock, no network).

Every patient has the same clinical core, so every size yields the same card:
chronic neck pain (ICD-10-CM M54.2, onset two years before the reference date), type 2
diabetes and metformin (risk factors), no compressive cause, and an old normal B12 result (more
than a year before the reference date, so it neither blocks nor bands).  Around that core the
generator adds filler that is NOT in any value set the rules use: years of routine labs (HbA1c,
lipids, renal panel, blood counts, vital signs), unrelated problems (some resolved), common
non-risk medications, procedures and completed lab orders.

Dates are relative to a fixed `REFERENCE_DATE`, so the bytes of a patient never change and the
expected card stays the same for years (the oldest "recent" window the rules use is 365 days).

The prefetch models an EHR that ignores the code filters of the templates (allowed: filters
are a hint, the service matches codes itself): `labResults` carries every laboratory
Observation, `findings` the vital signs and the neuropathic findings, `serviceRequests` every
order.  That is the expensive case for the service.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import orjson

REFERENCE_DATE = date(2026, 1, 1)

SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
LOCAL_LAB = "urn:oid:2.16.840.1.113883.3.9999.1"

# (size name, target resource count, seed)
SIZES: tuple[tuple[str, int, int], ...] = (("small", 20, 11), ("typical", 300, 22), ("large", 3000, 33))

# Filler codes below are synthetic load for the benchmark only: they never reach a clinician,
# are not clinical knowledge, and were not verified against a terminology server (the shipped
# value sets and demo patients use only the verified codes of ../shared/clinical-codes.json).
# Filler problems: (SNOMED, ICD-10-CM, display).  None of these is in a rules value set.
FILLER_CONDITIONS = (
    ("38341003", "I10", "Essential hypertension"),
    ("55822004", "E78.5", "Hyperlipidemia"),
    ("239873007", "M17.11", "Osteoarthritis of right knee"),
    ("195967001", "J45.909", "Asthma"),
    ("414916001", "E66.9", "Obesity"),
    ("61582004", "J30.9", "Allergic rhinitis"),
    ("35489007", "F32.9", "Depressive disorder"),
    ("197480006", "F41.9", "Anxiety disorder"),
    ("40930008", "E03.9", "Hypothyroidism"),
    ("68566005", "N39.0", "Urinary tract infection"),
    ("444814009", "J06.9", "Viral upper respiratory tract infection"),
    ("271737000", "D64.9", "Anemia"),
    ("49436004", "I48.91", "Atrial fibrillation"),
    ("57054005", "I21.9", "Acute myocardial infarction"),
    ("279039007", "M54.50", "Low back pain"),
    ("24700007", "G35", "Multiple sclerosis"),
    ("431855005", "N18.1", "Chronic kidney disease stage 1"),
    ("84229001", "R53.83", "Fatigue"),
    ("267036007", "R06.00", "Dyspnea"),
    ("25064002", "R51.9", "Headache"),
)
# Filler labs: (LOINC, display, unit, low, high, decimals)
FILLER_LABS = (
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 5.6, 9.5, 1),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 220, 0),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.6, 1.6, 2),
    ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 7, 30, 0),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 133, 146, 0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.4, 5.3, 1),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 140, 280, 0),
    ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL", 60, 190, 0),
    ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 30, 80, 0),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 60, 400, 0),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 10.5, 16.5, 1),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.5, 11, 1),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 140, 420, 0),
    ("787-2", "MCV [Entitled volume] by Automated count", "fL", 80, 100, 0),
    ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 7, 60, 0),
    ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", 0.4, 5.0, 2),
)
# Filler vital signs: (LOINC, display, unit, low, high)
FILLER_VITALS = (
    ("29463-7", "Body weight", "kg", 70, 110),
    ("8867-4", "Heart rate", "/min", 55, 100),
    ("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", 24, 36),
)
# Filler medications: (RxNorm, display).  No acid suppressant, metformin or B12.
FILLER_MEDS = (
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("617312", "atorvastatin 10 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("310798", "hydrochlorothiazide 25 MG Oral Tablet"),
    ("966222", "levothyroxine sodium 0.05 MG Oral Tablet"),
    ("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
    ("312961", "simvastatin 20 MG Oral Tablet"),
    ("197517", "clarithromycin 500 MG Oral Tablet"),
    ("308136", "amoxicillin 500 MG Oral Capsule"),
    ("198211", "sertraline 50 MG Oral Tablet"),
)
FILLER_PROCEDURES = (
    ("73761001", "Colonoscopy"),
    ("168731009", "Standard chest X-ray"),
    ("29303009", "Electrocardiographic procedure"),
    ("252416005", "Histopathology test"),
    ("80146002", "Appendectomy"),
)


@dataclass(frozen=True)
class Patient:
    """A synthetic patient as the EHR would prefetch it.

    The prefetch is kept as JSON bytes: bytes are not tracked by the cyclic garbage collector,
    so the benchmark process does not carry ~200,000 extra live objects that a service worker
    would not have (they would make every GC pass, in the service and the baseline, slower).
    """

    size: str
    patient_id: str
    prefetch_json: bytes
    resource_count: int

    @property
    def prefetch(self) -> dict[str, Any]:
        """A fresh parsed copy of the prefetch."""
        return orjson.loads(self.prefetch_json)


def _day(days_before: int) -> str:
    return (REFERENCE_DATE - timedelta(days=days_before)).isoformat()


def _instant(days_before: int, minute: int) -> str:
    return f"{_day(days_before)}T{8 + minute // 60 % 10:02d}:{minute % 60:02d}:00Z"


class _Gen:
    def __init__(self, patient_id: str, seed: int) -> None:
        self.pid = patient_id
        self.rng = random.Random(seed)
        self.n = 0

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.pid}-{self.n:05d}"

    def _meta(self, days_before: int) -> dict[str, Any]:
        return {"versionId": "1", "lastUpdated": _instant(days_before, self.n % 600)}

    def _subject(self) -> dict[str, Any]:
        return {"reference": f"Patient/{self.pid}"}

    def patient(self) -> dict[str, Any]:
        return {
            "resourceType": "Patient", "id": self.pid, "meta": self._meta(30),
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9999.2", "value": f"MRN-{self.pid}"}],
            "active": True,
            "name": [{"use": "official", "family": "Benchmark", "given": ["Pat", self.pid]}],
            "gender": "female", "birthDate": "1966-04-12",
            "address": [{"line": ["1 Example Street"], "city": "Springfield", "postalCode": "01101",
                         "country": "US"}],
        }

    def condition(self, snomed: str, icd: str, display: str, onset_days: int, *,
                  active: bool = True) -> dict[str, Any]:
        status = "active" if active else "resolved"
        res: dict[str, Any] = {
            "resourceType": "Condition", "id": self._id("cond"), "meta": self._meta(onset_days),
            "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": status}]},
            "verificationStatus": {"coding": [{"system": COND_VERIFICATION, "code": "confirmed"}]},
            "category": [{"coding": [{"system": COND_CATEGORY, "code": "problem-list-item",
                                      "display": "Problem List Item"}]}],
            "code": {"coding": [{"system": SNOMED, "code": snomed, "display": display},
                                {"system": ICD10, "code": icd, "display": display}],
                     "text": display},
            "subject": self._subject(),
            "onsetDateTime": _day(onset_days),
            "recordedDate": _day(onset_days),
        }
        if not active:
            res["abatementDateTime"] = _day(max(0, onset_days - self.rng.randint(10, 200)))
        return res

    def lab(self, loinc: str, display: str, unit: str, value: float, days_before: int,
            *, category: str = "laboratory", ref: tuple[float, float] | None = None) -> dict[str, Any]:
        res: dict[str, Any] = {
            "resourceType": "Observation", "id": self._id("obs"), "meta": self._meta(days_before),
            "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
            "code": {"coding": [{"system": LOINC, "code": loinc, "display": display},
                                {"system": LOCAL_LAB, "code": f"L{loinc.replace('-', '')}"}],
                     "text": display},
            "subject": self._subject(),
            "effectiveDateTime": _instant(days_before, self.n % 600),
            "issued": _instant(days_before, (self.n + 90) % 600),
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }
        if ref:
            res["referenceRange"] = [{"low": {"value": ref[0], "unit": unit, "system": UCUM, "code": unit},
                                      "high": {"value": ref[1], "unit": unit, "system": UCUM, "code": unit}}]
            flag = "H" if value > ref[1] else "L" if value < ref[0] else "N"
            res["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]
        return res

    def med(self, rxnorm: str, display: str, days_before: int, *, active: bool = True) -> dict[str, Any]:
        return {
            "resourceType": "MedicationRequest", "id": self._id("medrx"), "meta": self._meta(days_before),
            "status": "active" if active else "completed", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": rxnorm, "display": display}],
                                          "text": display},
            "subject": self._subject(),
            "authoredOn": _day(days_before),
            "requester": {"reference": "Practitioner/bench-gp"},
            "dosageInstruction": [{"text": "1 tablet by mouth daily",
                                   "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}}],
        }

    def procedure(self, snomed: str, display: str, days_before: int) -> dict[str, Any]:
        return {
            "resourceType": "Procedure", "id": self._id("proc"), "meta": self._meta(days_before),
            "status": "completed",
            "code": {"coding": [{"system": SNOMED, "code": snomed, "display": display}], "text": display},
            "subject": self._subject(),
            "performedDateTime": _day(days_before),
        }

    def order(self, loinc: str, display: str, days_before: int) -> dict[str, Any]:
        return {
            "resourceType": "ServiceRequest", "id": self._id("sr"), "meta": self._meta(days_before),
            "status": "completed", "intent": "order",
            "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
            "subject": self._subject(),
            "authoredOn": _day(days_before),
            "requester": {"reference": "Practitioner/bench-gp"},
        }


def make_patient(size: str, target: int, seed: int) -> Patient:
    """A patient with about `target` resources (exactly `target` for the sizes in `SIZES`)."""
    g = _Gen(f"bench-{size}", seed)
    rng = g.rng
    conditions = [
        g.condition("81680005", "M54.2", "Cervicalgia", 730),      # chronic neck pain
        g.condition("44054006", "E11.9", "Type 2 diabetes mellitus without complications", 2200),
    ]
    meds = [g.med("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet", 400)]
    labs = [g.lab("2132-9", "Cobalamin (Vitamin B12) [Mass/volume] in Serum or Plasma", "pg/mL", 512,
                  1100, ref=(200, 900))]
    vitals: list[dict[str, Any]] = []
    procedures: list[dict[str, Any]] = []
    orders: list[dict[str, Any]] = []

    core = 1 + len(conditions) + len(meds) + len(labs)  # + the Patient
    budget = max(0, target - core)
    # Shares of the filler by kind (labs dominate a real chart).
    n_cond = round(budget * 0.08)
    n_med = round(budget * 0.08)
    n_proc = round(budget * 0.03)
    n_order = round(budget * 0.03)
    n_vital = round(budget * 0.15)
    n_lab = budget - n_cond - n_med - n_proc - n_order - n_vital
    span = 365 * 10  # ten years of history

    for _ in range(n_cond):
        sct, icd, disp = rng.choice(FILLER_CONDITIONS)
        conditions.append(g.condition(sct, icd, disp, rng.randint(30, span), active=rng.random() < 0.6))
    for _ in range(n_med):
        code, disp = rng.choice(FILLER_MEDS)
        meds.append(g.med(code, disp, rng.randint(10, span), active=rng.random() < 0.4))
    for _ in range(n_proc):
        code, disp = rng.choice(FILLER_PROCEDURES)
        procedures.append(g.procedure(code, disp, rng.randint(30, span)))
    for _ in range(n_order):
        loinc, disp, *_rest = rng.choice(FILLER_LABS)
        orders.append(g.order(loinc, disp, rng.randint(10, span)))
    for _ in range(n_vital):
        loinc, disp, unit, lo, hi = rng.choice(FILLER_VITALS)
        vitals.append(g.lab(loinc, disp, unit, round(rng.uniform(lo, hi), 1), rng.randint(1, span),
                            category="vital-signs"))
    for _ in range(n_lab):
        loinc, disp, unit, lo, hi, dec = rng.choice(FILLER_LABS)
        value = round(rng.uniform(lo, hi), dec)
        labs.append(g.lab(loinc, disp, unit, value if dec else int(value), rng.randint(1, span),
                          ref=(round(lo * 1.05, dec), round(hi * 0.9, dec))))

    def bundle(resources: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not resources:
            return None  # "the EHR has no data for this key"
        return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                "entry": [{"fullUrl": f"https://ehr.example.org/fhir/{r['resourceType']}/{r['id']}",
                           "resource": r, "search": {"mode": "match"}} for r in resources]}

    prefetch = {
        "patient": g.patient(),
        "conditions": bundle(conditions),
        "labResults": bundle(labs),
        "findings": bundle(vitals),
        "findingValues": None,
        "medicationRequests": bundle(meds),
        "medicationStatements": None,
        "procedures": bundle(procedures),
        "serviceRequests": bundle(orders),
    }
    count = 1 + len(conditions) + len(labs) + len(vitals) + len(meds) + len(procedures) + len(orders)
    return Patient(size=size, patient_id=g.pid, prefetch_json=orjson.dumps(prefetch), resource_count=count)


def hook_body(patient: Patient, *, hook_instance: str = "bench-0000", with_prefetch: bool = True,
              fhir_server: str | None = None) -> bytes:
    """A `patient-view` request body for `patient` (full prefetch, or none when `with_prefetch`
    is off), as JSON bytes."""
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": hook_instance,
        "context": {"userId": "Practitioner/bench-gp", "patientId": patient.patient_id},
    }
    if fhir_server:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {"access_token": "bench-token", "token_type": "Bearer", "expires_in": 3600,
                                     "scope": "patient/*.read", "subject": "b12-neck-cds"}
    raw = orjson.dumps(body)
    if with_prefetch:
        raw = raw[:-1] + b',"prefetch":' + patient.prefetch_json + b"}"
    return raw


def all_patients() -> list[Patient]:
    return [make_patient(name, target, seed) for name, target, seed in SIZES]
