"""Demo patients: a valid transaction Bundle, dates relative to today, each catalog outcome holds."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from fhir.resources.R4B.bundle import Bundle

from cds_service.config import Settings
from cds_service.demo_data import anchor_date, demo_resources, load_catalog, load_demo_bundle
from cds_service.engine import ClinicalEngine
from cds_service.record import PatientRecord
from cds_service.rules import NO_CARD_REASONS
from tests.fhir_builders import hook_request

ENGINE = ClinicalEngine.load(Settings())
CATALOG = load_catalog()
# Today, a leap day and a date far from the anchor: outcomes must not depend on the run date.
TODAYS = [date.today(), date(2028, 2, 29), date(2041, 11, 3)]


def at_noon(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc)


def test_bundle_is_a_valid_r4_transaction_with_stable_put_ids() -> None:
    bundle = load_demo_bundle(date.today())
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        res = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
    urls = [e["request"]["url"] for e in bundle["entry"]]
    assert len(urls) == len(set(urls))


def test_catalog_lists_each_patient_once_and_every_patient_exists() -> None:
    ids = [p["patientId"] for p in CATALOG]
    assert len(ids) == len(set(ids))
    patients = {e["resource"]["id"] for e in load_demo_bundle(date.today())["entry"]
                if e["resource"]["resourceType"] == "Patient"}
    assert set(ids) == patients
    for p in CATALOG:
        assert p["name"] and p["description"] and "\n" not in p["description"]


def test_catalog_covers_every_card_kind_and_every_no_card_reason() -> None:
    expected = {p["expected"] for p in CATALOG}
    assert {"low-b12", "mma-test", "b12-test"} <= expected
    assert set(NO_CARD_REASONS) <= expected


@pytest.mark.parametrize("today", TODAYS, ids=str)
@pytest.mark.parametrize("entry", CATALOG, ids=lambda p: p["patientId"])
def test_each_demo_patient_gives_its_expected_outcome(entry: dict, today: date) -> None:
    resources = demo_resources(entry["patientId"], today)
    ev = ENGINE.evaluate(PatientRecord.from_resources(resources), hook_request(patient_id=entry["patientId"]),
                         at_noon(today))
    assert (ev.decision.kind or ev.decision.reason) == entry["expected"]
    assert ev.skipped_resources == 0
    if entry.get("shows"):
        assert entry["shows"] in ev.cards[0].summary
    if ev.decision.kind:
        sr_patient = f"Patient/{entry['patientId']}"
        for s in ev.cards[0].model().suggestions or ():
            assert s.actions[0].resource["subject"]["reference"] == sr_patient


def test_dates_keep_their_distance_from_today() -> None:
    anchor = anchor_date()
    raw = {r["id"]: r for r in demo_resources("demo-low-b12", anchor)}
    later = date(2030, 7, 1)
    moved = {r["id"]: r for r in demo_resources("demo-low-b12", later)}
    shift = later - anchor
    for rid, res in raw.items():
        for key in ("birthDate", "onsetDateTime", "effectiveDateTime"):
            if key in res:
                assert date.fromisoformat(moved[rid][key][:10]) - date.fromisoformat(res[key][:10]) == shift
    # loading for one day does not modify what another call sees
    assert demo_resources("demo-low-b12", anchor) == list(raw.values())


def test_demo_resources_belong_to_one_patient() -> None:
    resources = demo_resources("demo-metformin-chronic", date.today())
    assert resources[0]["resourceType"] == "Patient"
    assert all(r.get("subject", {}).get("reference") == "Patient/demo-metformin-chronic" for r in resources[1:])
    assert demo_resources("no-such-patient", date.today()) == []


def test_demo_covers_the_coding_variety_the_rules_must_handle() -> None:
    bundle = load_demo_bundle(date.today())
    systems = {c["system"] for e in bundle["entry"] for key in ("code", "medicationCodeableConcept")
               for c in e["resource"].get(key, {}).get("coding", [])}
    assert {"http://snomed.info/sct", "http://hl7.org/fhir/sid/icd-10-cm", "http://loinc.org",
            "http://www.nlm.nih.gov/research/umls/rxnorm"} <= systems
    text_only = [e for e in bundle["entry"] if "medicationCodeableConcept" in e["resource"]
                 and "coding" not in e["resource"]["medicationCodeableConcept"]]
    assert text_only
    units = {e["resource"].get("valueQuantity", {}).get("unit") for e in bundle["entry"]}
    assert {"pg/mL", "pmol/L"} <= units
