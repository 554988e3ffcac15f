"""Hypothesis strategies for patients shaped the way EHR feeds send them (valid FHIR R4).

Not the project's tidy builders: concepts carry several codings (a local EHR code next to SNOMED
CT, ICD-10-CM, LOINC or RxNorm, in either order), ICD-10-CM sometimes without its dot, text-only
entries, every status, partial and missing dates, diet as an Observation code or as its value,
findings answered "No", medications inline, by text only, or by reference to a Medication.

Codes come from the service's own value sets (verified codes only) or from a synthetic local code
system; no clinical code is made up.  `patients()` draws a list of resources for one patient id;
every other resource refers to that patient.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from hypothesis import strategies as st

from cds_service.config import Settings
from cds_service.knowledge import ICD10CM, LOINC, RXNORM, SNOMED, Knowledge

KNOWLEDGE = Knowledge.load(Settings().valuesets_dir)
TODAY = date(2025, 6, 15)
LOCAL = "urn:oid:2.16.840.1.113883.3.7777.1"
"""A synthetic local (EHR-specific) code system; its codes mean nothing outside these tests."""
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

CONDITION_VALUESETS = ("neck-pain", "chronic-neck-pain", "neuropathic-features", "mechanical-causes",
                       "compressive-causes", "red-flags", "diabetes", "vegan-vegetarian-diet",
                       "malabsorption", "gastric-surgery", "alcohol-use-disorder", "b12-deficiency")
FINDING_VALUESETS = ("neuropathic-features", "vegan-vegetarian-diet", "red-flags")
MEDICATION_VALUESETS = ("metformin", "acid-suppressants", "b12-replacement")
UNRELATED = ("Essential hypertension", "Body weight", "Lisinopril 10 mg tablet", "Knee pain",
             "Atorvastatin 20 mg tablet", "Influenza vaccination", "Blood pressure")


def _codes(name: str, *, observation: bool = False) -> list[tuple[str, str, str]]:
    """(system, code, display) of a value set; ICD-10-CM is left out of Observations (a diagnosis
    classification, which EHRs put on Conditions, not on Observation.code or value)."""
    return [(s, c, d) for s, c, d in KNOWLEDGE.valuesets[name].codes if not (observation and s == ICD10CM)]


def day(days_ago: int) -> str:
    return (TODAY - timedelta(days=days_ago)).isoformat()


@st.composite
def dates(draw: st.DrawFn, low: int = 0, high: int = 3000) -> str:
    """A FHIR date or dateTime, sometimes partial (year-month)."""
    text = day(draw(st.integers(low, high)))
    shape = draw(st.sampled_from(["date", "date", "datetime", "month"]))
    return {"date": text, "datetime": f"{text}T09:30:00Z", "month": text[:7]}[shape]


def _local(display: str, draw: st.DrawFn) -> dict[str, Any]:
    return {"system": LOCAL, "code": f"L{draw(st.integers(1000, 99999))}", "display": display}


@st.composite
def coded(draw: st.DrawFn, name: str, *, observation: bool = False) -> dict[str, Any]:
    """A CodeableConcept for one concept of value set `name`, as an EHR might send it."""
    system, code, display = draw(st.sampled_from(_codes(name, observation=observation)))
    if system == ICD10CM and draw(st.booleans()):
        code = code.replace(".", "")  # some feeds send ICD-10-CM without the dot
    coding: dict[str, Any] = {"system": system, "code": code}
    if draw(st.booleans()):
        coding["display"] = display
    codings = [coding]
    if draw(st.booleans()):
        codings.insert(draw(st.integers(0, 1)), _local(display, draw))
    concept: dict[str, Any] = {"coding": codings}
    if draw(st.booleans()):
        concept["text"] = draw(st.sampled_from([display, display.lower(), display.split(" (")[0]]))
    return concept


@st.composite
def unrelated(draw: st.DrawFn) -> dict[str, Any]:
    """A concept no value set holds: a local code, or text only."""
    text = draw(st.sampled_from(UNRELATED))
    return draw(st.sampled_from([{"coding": [_local(text, draw)], "text": text}, {"text": text}]))


def _ref(pid: str) -> dict[str, str]:
    return {"reference": f"Patient/{pid}"}


@st.composite
def condition(draw: st.DrawFn, pid: str, rid: str, name: str | None = None) -> dict[str, Any]:
    name = name or draw(st.sampled_from(CONDITION_VALUESETS + ("unrelated",)))
    if name == "unrelated":
        code = draw(unrelated())
    elif draw(st.integers(0, 9)) == 0:  # text only (a free-text problem-list entry)
        code = {"text": KNOWLEDGE.valuesets[name].title}
    else:
        code = draw(coded(name))
    res: dict[str, Any] = {"resourceType": "Condition", "id": rid, "subject": _ref(pid), "code": code}
    verification = draw(st.sampled_from([None, None, "confirmed", "confirmed", "confirmed", "provisional",
                                         "differential", "unconfirmed", "refuted", "entered-in-error"]))
    if verification:
        res["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": verification}]}
    if verification != "entered-in-error":  # con-5: no clinicalStatus on an entry in error
        clinical = draw(st.sampled_from([None, "active", "active", "active", "active", "active",
                                         "recurrence", "relapse", "inactive", "resolved", "remission"]))
        if clinical:
            res["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": clinical}]}
            if clinical in ("resolved", "inactive", "remission") and draw(st.booleans()):
                res["abatementDateTime"] = draw(dates(0, 300))
    category = draw(st.sampled_from([None, "problem-list-item", "encounter-diagnosis"]))
    if category:
        res["category"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                        "code": category}]}]
    when = draw(st.sampled_from(["onsetDateTime", "onsetPeriod", "recordedDate", None]))
    if when == "onsetPeriod":
        res["onsetPeriod"] = {"start": draw(dates(0, 3000))}
    elif when:
        res[when] = draw(dates(0, 3000))
    return res


@st.composite
def lab_result(draw: st.DrawFn, pid: str, rid: str) -> dict[str, Any]:
    name = draw(st.sampled_from(["b12-lab", "b12-lab", "mma-lab"]))
    res: dict[str, Any] = {
        "resourceType": "Observation", "id": rid, "subject": _ref(pid), "code": draw(coded(name, observation=True)),
        "status": draw(st.sampled_from(["final", "final", "amended", "corrected", "preliminary", "registered",
                                        "cancelled", "entered-in-error"])),
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}],
    }
    if draw(st.integers(0, 5)):
        res[draw(st.sampled_from(["effectiveDateTime", "issued"]))] = f"{day(draw(st.integers(0, 900)))}T08:00:00Z"
    value: dict[str, Any]
    if name == "mma-lab":
        value = {"valueQuantity": {"value": draw(st.sampled_from([0.2, 0.36, 0.5, 0.9])), "unit": "umol/L",
                                   "system": UCUM, "code": "umol/L"}}
    else:
        unit = draw(st.sampled_from(["pg/mL", "ng/L", "pmol/L"]))
        number = draw(st.sampled_from([95, 150, 179, 180, 260, 350, 351, 420, 900]))
        shape = draw(st.sampled_from(["ucum", "ucum", "unit-text", "string", "censored"]))
        if shape == "ucum":
            value = {"valueQuantity": {"value": number, "unit": unit, "system": UCUM, "code": unit}}
        elif shape == "unit-text":
            value = {"valueQuantity": {"value": number, "unit": unit}}  # no UCUM code
        elif shape == "string":
            value = {"valueString": f"{number} {unit}"}
        else:
            value = {"valueString": draw(st.sampled_from(["<150", "< 150 pg/mL", ">2000"]))}
    if draw(st.integers(0, 4)) == 0:  # a panel: the result is a component under the panel's code
        panel = "Vitamin B12 and folate panel"
        res["component"] = [{"code": res["code"], **value},
                            {"code": {"coding": [_local("Folate", draw)], "text": "Folate"},
                             "valueQuantity": {"value": 7.5, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}}]
        res["code"] = {"coding": [_local(panel, draw)], "text": panel}
    else:
        res.update(value)
    return res


NEGATIVE_VALUES = ({"valueBoolean": False}, {"valueString": "No"}, {"valueCodeableConcept": {"text": "No"}})
POSITIVE_VALUES = ({"valueBoolean": True}, {"valueString": "Yes"}, {})


@st.composite
def finding(draw: st.DrawFn, pid: str, rid: str) -> dict[str, Any]:
    """A finding or diet Observation: the concept as its code (maybe answered yes/no), or as its
    value under a local question code."""
    name = draw(st.sampled_from(FINDING_VALUESETS))
    res: dict[str, Any] = {
        "resourceType": "Observation", "id": rid, "subject": _ref(pid),
        "status": draw(st.sampled_from(["final", "final", "final", "preliminary", "amended", "entered-in-error"])),
    }
    if draw(st.booleans()):
        res["code"] = draw(coded(name, observation=True))
        res.update(draw(st.sampled_from(POSITIVE_VALUES + NEGATIVE_VALUES)))
    else:
        question = "Diet" if name == "vegan-vegetarian-diet" else "Neurological examination"
        res["code"] = {"coding": [_local(question, draw)], "text": question}
        res["valueCodeableConcept"] = draw(coded(name, observation=True))
    if name == "vegan-vegetarian-diet" and draw(st.booleans()):
        res["category"] = [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "social-history"}]}]
    if draw(st.integers(0, 4)):
        res["effectiveDateTime"] = draw(dates(0, 2000))
    return res


@st.composite
def noise_observation(draw: st.DrawFn, pid: str, rid: str) -> dict[str, Any]:
    """Observations no rule reads (vitals, other labs), and text-only ones."""
    text = draw(st.sampled_from(["Body weight", "Blood pressure", "Haemoglobin", "Vegan", "Numbness"]))
    res = {"resourceType": "Observation", "id": rid, "subject": _ref(pid), "status": "final",
           "code": draw(st.sampled_from([{"coding": [_local(text, draw)], "text": text}, {"text": text}])),
           "effectiveDateTime": draw(dates(0, 400))}
    if draw(st.booleans()):
        res["valueQuantity"] = {"value": draw(st.integers(1, 200)), "unit": "kg", "system": UCUM, "code": "kg"}
    return res


@st.composite
def medication(draw: st.DrawFn, pid: str, rid: str) -> list[dict[str, Any]]:
    """A MedicationRequest or MedicationStatement, inline coded, text only, or by reference to a
    Medication (returned after it)."""
    name = draw(st.sampled_from(MEDICATION_VALUESETS + ("unrelated",)))
    if name == "unrelated":
        concept = draw(unrelated())
    elif draw(st.integers(0, 3)) == 0:  # text only: an ingredient or brand name in the product's text
        ingredient = draw(st.sampled_from(_names(name)))
        concept = {"text": f"{ingredient.capitalize()} {draw(st.sampled_from(['500 mg tablet', '20 mg capsule', '1 mg/mL injection']))}"}
    else:
        concept = draw(coded(name))
    rtype = draw(st.sampled_from(["MedicationRequest", "MedicationStatement"]))
    res: dict[str, Any] = {"resourceType": rtype, "id": rid, "subject": _ref(pid)}
    if rtype == "MedicationRequest":
        res["status"] = draw(st.sampled_from(["active", "active", "on-hold", "stopped", "completed", "cancelled"]))
        res["intent"] = draw(st.sampled_from(["order", "plan"]))
        res["authoredOn"] = draw(dates(0, 2000))
    else:
        res["status"] = draw(st.sampled_from(["active", "active", "on-hold", "stopped", "completed", "not-taken"]))
        if draw(st.booleans()):
            res["effectivePeriod"] = {"start": draw(dates(0, 2000))}
        else:
            res["dateAsserted"] = draw(dates(0, 600))
    out = [res]
    if draw(st.booleans()):
        med_id = f"{rid}-med"
        res["medicationReference"] = {"reference": f"Medication/{med_id}"}
        if draw(st.booleans()) and concept.get("text"):
            res["medicationReference"]["display"] = concept["text"]
        out.append({"resourceType": "Medication", "id": med_id, "code": concept})
    else:
        res["medicationCodeableConcept"] = concept
    return out


@st.composite
def procedure(draw: st.DrawFn, pid: str, rid: str) -> dict[str, Any]:
    concept = draw(coded("gastric-surgery")) if draw(st.integers(0, 3)) else draw(unrelated())
    res = {"resourceType": "Procedure", "id": rid, "subject": _ref(pid), "code": concept,
           "status": draw(st.sampled_from(["completed", "completed", "in-progress", "not-done", "entered-in-error"]))}
    if draw(st.booleans()):
        res["performedDateTime"] = draw(dates(30, 6000))
    return res


def _names(name: str) -> list[str]:
    """The names the text matcher knows for a value set (ingredients, brands, test names)."""
    vs = KNOWLEDGE.valuesets[name]
    return list(dict.fromkeys(vs.ingredient_names + getattr(vs, "synonyms", ())))


@st.composite
def service_request(draw: st.DrawFn, pid: str, rid: str) -> dict[str, Any]:
    name = draw(st.sampled_from(["b12-lab", "mma-lab"]))
    shape = draw(st.sampled_from(["coded", "coded", "local", "unrelated"]))
    if shape == "coded":
        concept = draw(coded(name, observation=True))
    elif shape == "local" and _names(name):  # the EHR's own orderable code, the test named in text
        text = draw(st.sampled_from(_names(name))).title()
        concept = {"coding": [_local(text, draw)], "text": text}
    else:
        concept = draw(unrelated())
    return {"resourceType": "ServiceRequest", "id": rid, "subject": _ref(pid), "code": concept,
            "status": draw(st.sampled_from(["active", "active", "on-hold", "completed", "revoked", "draft"])),
            "intent": draw(st.sampled_from(["order", "order", "plan"])),
            "authoredOn": draw(dates(0, 400))}


@st.composite
def patients(draw: st.DrawFn, pid: str) -> list[dict[str, Any]]:
    """All resources of one patient (the Patient first); resource ids are prefixed with `pid`."""
    counter = iter(range(1, 1000))

    def rid(kind: str) -> str:
        return f"{pid}-{kind}{next(counter)}"

    patient: dict[str, Any] = {"resourceType": "Patient", "id": pid,
                               "gender": draw(st.sampled_from(["female", "male", "other", "unknown"]))}
    if draw(st.integers(0, 9)):
        patient["birthDate"] = draw(st.sampled_from([
            day(365 * draw(st.integers(20, 95)) + draw(st.integers(0, 364))),
            str(TODAY.year - draw(st.integers(20, 95)))]))  # a year only, now and then
    out: list[dict[str, Any]] = [patient]
    # Most patients have neck pain (often recorded more than once), so the rules have work to do.
    for n in range(0 if draw(st.integers(0, 5)) == 5 else draw(st.integers(1, 3))):
        neck = draw(condition(pid, rid("c"), draw(st.sampled_from(["neck-pain", "neck-pain", "chronic-neck-pain"]))))
        if n == 0 and draw(st.integers(0, 3)) != 3:  # the first one mostly a plain active problem
            neck["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": "active"}]}
            neck["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": "confirmed"}]}
            neck.pop("abatementDateTime", None)
            if "coding" not in neck["code"]:
                neck["code"] = draw(coded("neck-pain"))
        out.append(neck)
    out += [draw(condition(pid, rid("c"))) for _ in range(draw(st.integers(0, 4)))]
    out += [draw(lab_result(pid, rid("lab"))) for _ in range(draw(st.integers(0, 2)))]
    out += [draw(finding(pid, rid("obs"))) for _ in range(draw(st.integers(0, 3)))]
    out += [draw(noise_observation(pid, rid("vital"))) for _ in range(draw(st.integers(0, 2)))]
    for _ in range(draw(st.integers(0, 3))):
        out += draw(medication(pid, rid("med")))
    out += [draw(procedure(pid, rid("proc"))) for _ in range(draw(st.integers(0, 1)))]
    out += [draw(service_request(pid, rid("order"))) for _ in range(draw(st.integers(0, 1)))]
    return out


def transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle storing `resources` under their ids (PUT)."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources]}


__all__ = ["LOINC", "RXNORM", "SNOMED", "TODAY", "patients", "transaction"]
