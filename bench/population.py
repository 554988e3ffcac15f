"""A synthetic population as a FHIR Bulk Data export (NDJSON per resource type), generated fast.

Seeded and deterministic for a given (size, seed, today).  Unlike `bench/patients.py` (one shape,
always the same card) patients vary so every rule is exercised: neck pain in about a third,
acute or chronic, with or without neuropathic features, compressive or mechanical causes, red
flags; risk factors (metformin, PPI, diabetes, coeliac disease, gastrectomy, alcohol use
disorder, age); B12 results low, indeterminate or normal, recent or old, in pg/mL or pmol/L;
MMA results, pending orders, known deficiency.  Filler labs and conditions reuse the shapes of
`bench/patients.py` (codes in no rules value set).

`faults=True` adds what real exports contain and the audit must count: a resource that fails
R4B validation, a unit that cannot be read, resources without a patient reference, a line that
is not JSON, resources of a patient whose Patient resource is missing, and resource types the
rules do not read (Encounter).

Each patient's resources are spread over the type files, and the order of patients differs per
file, as in a real export: grouping by patient is the audit's job.

Clinical codes: only codes of the shipped value sets (verified, see valuesets/) and the bench's
filler (marked there as unverified synthetic load, in no value set).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson

from bench.patients import FILLER_CONDITIONS, FILLER_LABS, ICD10, LOINC, RXNORM, SNOMED, UCUM

REFERENCE_DATE = date(2026, 1, 1)
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
TYPES = ("Patient", "Condition", "Observation", "MedicationRequest", "Procedure", "ServiceRequest", "Encounter")


@dataclass
class Population:
    """Where the export went and what went into it (counts of the faults written)."""

    directory: Path
    patients: int
    resources: int
    faults: dict[str, int] = field(default_factory=dict)


class _Writer:
    def __init__(self, today: date, rng: random.Random) -> None:
        self.today = today
        self.rng = rng
        self.seq = 0

    def day(self, days_before: int) -> str:
        return (self.today - timedelta(days=days_before)).isoformat()

    def rid(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    def condition(self, pid: str, system: str, code: str, display: str, onset_days: int,
                  status: str = "active") -> dict[str, Any]:
        return {"resourceType": "Condition", "id": self.rid("c"),
                "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": status}]},
                "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
                "subject": {"reference": f"Patient/{pid}"}, "onsetDateTime": self.day(onset_days)}

    def lab(self, pid: str, loinc: str, display: str, value: float | None, unit: str | None,
            days_before: int) -> dict[str, Any]:
        res: dict[str, Any] = {"resourceType": "Observation", "id": self.rid("o"), "status": "final",
                               "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
                               "subject": {"reference": f"Patient/{pid}"},
                               "effectiveDateTime": self.day(days_before)}
        if value is not None:
            qty: dict[str, Any] = {"value": value}
            if unit:
                qty.update(unit=unit, system=UCUM, code=unit)
            res["valueQuantity"] = qty
        return res

    def med(self, pid: str, code: str, display: str, days_before: int) -> dict[str, Any]:
        return {"resourceType": "MedicationRequest", "id": self.rid("m"), "status": "active", "intent": "order",
                "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code, "display": display}],
                                              "text": display},
                "subject": {"reference": f"Patient/{pid}"}, "authoredOn": self.day(days_before)}


def _patient_resources(w: _Writer, pid: str, faults: bool, fault_counts: dict[str, int]
                       ) -> Iterator[dict[str, Any]]:
    """One patient's resources (Patient first)."""
    r = w.rng.random
    age_days = w.rng.randint(20 * 365, 92 * 365)
    yield {"resourceType": "Patient", "id": pid, "gender": w.rng.choice(("female", "male")),
           "birthDate": w.day(age_days)}
    if r() < 0.36:
        onset = w.rng.choice((20, 60, 120, 400, 1500))
        if r() < 0.5:
            yield w.condition(pid, ICD10, "M54.2", "Cervicalgia", onset)
        else:
            yield w.condition(pid, SNOMED, "81680005", "Neck pain", onset)
        if r() < 0.05:
            yield w.condition(pid, SNOMED, "1121000119107", "Chronic neck pain", onset)
        if r() < 0.15:
            yield w.condition(pid, SNOMED, "54404000", "Cervical radiculopathy", onset)
        if r() < 0.08:
            yield w.condition(pid, SNOMED, "387800004", "Cervical spondylosis", 900)
        if r() < 0.10:
            yield w.condition(pid, SNOMED, "209557005", "Neck sprain", onset)
        if r() < 0.02:
            yield w.condition(pid, SNOMED, "202664003", "Cervical myelopathy", 30)
    if r() < 0.18:
        yield w.condition(pid, SNOMED, "44054006", "Diabetes mellitus type 2", 2000)
        if r() < 0.7:
            yield w.med(pid, "860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet", 300)
    if r() < 0.12:
        yield w.med(pid, "7646", "omeprazole", 200)
    if r() < 0.02:
        yield w.condition(pid, SNOMED, "396331005", "Celiac disease", 3000)
    if r() < 0.03:
        yield w.condition(pid, SNOMED, "7200002", "Alcoholism", 3000)
    if r() < 0.01:
        yield {"resourceType": "Procedure", "id": w.rid("p"), "status": "completed",
               "code": {"coding": [{"system": SNOMED, "code": "53442002", "display": "Gastrectomy"}]},
               "subject": {"reference": f"Patient/{pid}"}, "performedDateTime": w.day(3000)}
    if r() < 0.02:
        yield w.condition(pid, SNOMED, "190634004", "Cobalamin deficiency", 700)
    if r() < 0.35:
        value = w.rng.choice((120, 150, 240, 300, 420, 650))
        unit = "pg/mL"
        if r() < 0.25:
            unit, value = "pmol/L", round(value / 1.355)
        if faults and r() < 0.04:
            unit = "mg"  # not a B12 unit: cannot be read, so not banded
            fault_counts["unreadable_units"] += 1
        yield w.lab(pid, "2132-9", "Cobalamin [Mass/volume] in Serum or Plasma", value, unit,
                    w.rng.choice((20, 100, 250, 500)))
        if r() < 0.2:
            yield w.lab(pid, "13964-2", "Methylmalonate", 0.3, "umol/L", w.rng.choice((10, 400)))
    if r() < 0.03:
        yield {"resourceType": "ServiceRequest", "id": w.rid("s"), "status": "active", "intent": "order",
               "code": {"coding": [{"system": LOINC, "code": "2132-9"}]},
               "subject": {"reference": f"Patient/{pid}"}, "authoredOn": w.day(5)}
    for _ in range(w.rng.randint(1, 4)):
        loinc, display, unit, lo, hi, dec = w.rng.choice(FILLER_LABS)
        yield w.lab(pid, loinc, display, round(w.rng.uniform(lo, hi), dec), unit, w.rng.randint(1, 2000))
    if r() < 0.5:
        sct, _icd, display = w.rng.choice(FILLER_CONDITIONS)
        yield w.condition(pid, SNOMED, sct, display, w.rng.randint(30, 3000))
    yield {"resourceType": "Encounter", "id": w.rid("e"), "status": "finished",
           "class": {"code": "AMB"}, "subject": {"reference": f"Patient/{pid}"}}
    if faults and r() < 0.01:
        # Matches the diabetes value set but is not valid R4B (month 13).
        bad = w.condition(pid, SNOMED, "44054006", "Diabetes mellitus type 2", 100)
        bad["recordedDate"] = "2024-13-45"
        fault_counts["invalid_resources"] += 1
        yield bad
    if faults and r() < 0.005:
        fault_counts["without_patient_reference"] += 1
        yield {"resourceType": "Observation", "id": w.rid("o"), "status": "final",
               "code": {"coding": [{"system": LOINC, "code": "2132-9"}]}, "valueQuantity": {"value": 100}}


def write_population(directory: str | Path, patients: int, *, seed: int = 1, today: date = REFERENCE_DATE,
                     faults: bool = True, prefix: str = "p") -> Population:
    """Write `patients` patients as `<Type>.ndjson` files under `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    w = _Writer(today, rng)
    fault_counts = {"unreadable_units": 0, "invalid_resources": 0, "without_patient_reference": 0,
                    "not_json_lines": 0, "patients_without_patient_resource": 0}
    # Each type file gets its patients in a different order: three interleaved buckets, written
    # to their own files as they are generated (memory stays flat) and concatenated at the end.
    buckets = {(t, b): open(out / f".{t}.{b}.part", "wb") for t in TYPES for b in range(3)}
    dumps = orjson.dumps
    total = 0
    try:
        for i in range(patients):
            pid = f"{prefix}{i:07d}"
            drop_patient = faults and rng.random() < 0.003
            for res in _patient_resources(w, pid, faults, fault_counts):
                rtype = res["resourceType"]
                if rtype == "Patient" and drop_patient:
                    fault_counts["patients_without_patient_resource"] += 1
                    continue
                f = buckets[(rtype, (i + TYPES.index(rtype)) % 3)]
                f.write(dumps(res))
                f.write(b"\n")
                total += 1
        if faults:
            buckets[("Observation", 0)].write(b'{"resourceType": "Observation", "id": "truncated-\n')
            fault_counts["not_json_lines"] += 1
    finally:
        for f in buckets.values():
            f.close()
    for rtype in TYPES:
        with open(out / f"{rtype}.ndjson", "wb") as target:
            for b in range(3):
                part = out / f".{rtype}.{b}.part"
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, target, 1 << 20)
                part.unlink()
    return Population(directory=out, patients=patients, resources=total, faults=fault_counts)


def patient_resources(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Patient id -> its resources from an export written here (for tests; reads it all)."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("*.ndjson")):
        for line in path.read_bytes().splitlines():
            try:
                res = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if res.get("resourceType") == "Patient":
                pid = res["id"]
            else:
                ref = (res.get("subject") or {}).get("reference", "")
                if not ref.startswith("Patient/"):
                    continue
                pid = ref[8:]
            by_patient.setdefault(pid, []).append(res)
    return by_patient
