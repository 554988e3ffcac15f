"""`b12-cds audit`: a generated Bulk Data export through the hooks' engine.

The audit's answer for each patient must be what the real hook endpoint answers for that
patient (cards compared field by field, no-card patients get no card, a patient without a
Patient resource is a 412 for the hook and counted apart by the audit), whatever the partition
sizes; a local process pool and a Dask cluster (LocalCluster on 127.0.0.1) must give identical
reports and patient files; data quality counts must equal the faults the generator wrote.
"""

from __future__ import annotations

import copy
import csv
import json
from datetime import datetime, time, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.population import patient_resources, write_population
from cds_service.audit.inputs import Partition, ndjson_lines, plan_partitions, reference_id
from cds_service.audit.report import build_report
from cds_service.audit.runner import run_audit
from cds_service.cli import main
from cds_service.config import Settings

TODAY = datetime.now(timezone.utc).date()
NOW = datetime.combine(TODAY, time(12), tzinfo=timezone.utc)
PATIENTS = 400
KEYS = {"Condition": "conditions", "Observation": "labResults", "MedicationRequest": "medicationRequests",
        "MedicationStatement": "medicationStatements", "Procedure": "procedures", "ServiceRequest": "serviceRequests"}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory):
    # Dated relative to today: the hook endpoint evaluates at the current time.
    return write_population(tmp_path_factory.mktemp("export"), PATIENTS, seed=7, today=TODAY)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.from_env({"data_dir": str(tmp_path_factory.mktemp("data")), "log_level": "ERROR"})


@pytest.fixture(scope="module")
def pool_run(export, settings, tmp_path_factory):
    work = tmp_path_factory.mktemp("work-pool")
    # Small partitions: every type file is cut into several byte ranges read by different processes.
    run = run_audit([export.directory], work, settings, now=NOW, workers=2, patients_file=work / "patients.csv",
                    progress=False, partition_bytes=64 * 1024, n_shards=7)
    return run, build_report(run, settings, as_of=NOW, sources=[str(export.directory)])


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return {row["patient_id"]: row for row in csv.DictReader(f)}


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in report.items() if k not in ("run", "generated_at", "patients_file")})


# --- partitions and references ---------------------------------------------------------------

def test_byte_range_partitions_read_every_line_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "Observation.ndjson"
    lines = [orjson.dumps({"resourceType": "Observation", "id": f"o{i}", "note": "x" * (i % 37)}) for i in range(500)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    for size in (1, 7, 100, 4096, 10**9):
        parts = plan_partitions([path], size)
        read = [line for p in parts for line in ndjson_lines(p)]
        assert read == lines, size
    whole = Partition(0, str(path), 0, path.stat().st_size, "ndjson")
    assert list(ndjson_lines(whole)) == lines


def test_reference_forms() -> None:
    assert reference_id("Patient/p1") == "p1"
    assert reference_id("https://ehr.example.org/fhir/Patient/p1") == "p1"
    assert reference_id("Patient/p1/_history/3") == "p1"
    assert reference_id("urn:uuid:1234", {"urn:uuid:1234": "p9"}) == "p9"
    assert reference_id("urn:uuid:1234") is None
    assert reference_id("Group/g1") is None
    assert reference_id({"reference": "Patient/p1"}) is None


# --- the audit equals the hook ---------------------------------------------------------------

def prefetch_for(resources: list[dict[str, Any]]) -> dict[str, Any]:
    prefetch: dict[str, Any] = {key: None for key in KEYS.values()}
    prefetch["findings"] = prefetch["findingValues"] = None
    prefetch["patient"] = next((r for r in resources if r["resourceType"] == "Patient"), None)
    for res in resources:
        key = KEYS.get(res["resourceType"])
        if key:
            if prefetch[key] is None:
                prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
            prefetch[key]["entry"].append({"resource": res})
    return prefetch


def test_audit_equals_the_hook_for_every_patient(export, pool_run, make_app) -> None:
    run, report = pool_run
    rows = read_rows(run.patients_file)
    client = make_app(log_level="ERROR").test_client()
    by_patient = patient_resources(export.directory)
    hook_kinds: dict[str, int] = {}
    missing_patient = 0
    for pid, resources in sorted(by_patient.items()):
        body = {"hook": "patient-view", "hookInstance": f"eq-{pid}",
                "context": {"userId": "Practitioner/x", "patientId": pid}, "prefetch": prefetch_for(resources)}
        resp = client.post("/cds-services/b12-neck-pain-patient-view", json=body)
        if not any(r["resourceType"] == "Patient" for r in resources):
            assert resp.status_code == 412
            assert pid not in rows
            missing_patient += 1
            continue
        assert resp.status_code == 200, resp.get_json()
        cards = resp.get_json()["cards"]
        if pid not in rows:
            assert cards == [], pid
            continue
        (card,) = cards
        row = rows[pid]
        assert (card["summary"], card["indicator"]) == (row["summary"], row["indicator"]), pid
        hook_kinds[row["card_kind"]] = hook_kinds.get(row["card_kind"], 0) + 1
    assert len(rows) == sum(hook_kinds.values())
    # The population exercises every card kind and most no-card reasons.
    assert {c["kind"]: c["patients"] for c in report["cards"]} == hook_kinds
    assert set(hook_kinds) == {"b12-test", "mma-test", "low-b12"}
    assert sum(1 for r in report["no_card_reasons"] if r["patients"]) >= 6
    evaluated = len(by_patient) - missing_patient
    assert report["patients_evaluated"] == evaluated
    assert sum(r["patients"] for r in report["no_card_reasons"]) + report["patients_with_card"] == evaluated
    b12 = next(c for c in report["cards"] if c["kind"] == "b12-test")
    assert b12["per_1000"] == round(b12["patients"] * 1000 / evaluated, 2)
    assert b12["risk_factors"] and all(rf["patients"] > 0 for rf in b12["risk_factors"])


def test_data_quality_counts_the_faults_in_the_export(export, pool_run) -> None:
    _, report = pool_run
    dq, faults = report["data_quality"], export.faults
    assert faults["invalid_resources"] and faults["unreadable_units"] and faults["without_patient_reference"]
    assert dq["resources_skipped_invalid"] == faults["invalid_resources"]
    assert dq["b12_results_unit_not_readable"] == faults["unreadable_units"]
    assert dq["resources_without_patient_reference"] == faults["without_patient_reference"]
    assert dq["lines_not_readable"] == faults["not_json_lines"]
    assert dq["patients_without_patient_resource"] == faults["patients_without_patient_resource"]
    assert dq["resource_types_not_used"]["Encounter"] > 0
    assert sum(dq["resources_read"].values()) + dq["resources_without_patient_reference"] + sum(
        dq["resource_types_not_used"].values()) == export.resources


def test_partition_and_shard_counts_do_not_change_the_result(export, settings, pool_run, tmp_path) -> None:
    run, report = pool_run
    other = run_audit([export.directory], tmp_path, settings, now=NOW, workers=1, patients_file=tmp_path / "p.csv",
                      progress=False, n_shards=1)
    assert comparable(build_report(other, settings, as_of=NOW, sources=[str(export.directory)])) == comparable(report)
    assert (tmp_path / "p.csv").read_bytes() == run.patients_file.read_bytes()
    assert not (tmp_path / "shards").exists()  # the work files are removed after the run


def test_a_directory_of_bundles_gives_the_same_answer(export, settings, pool_run, tmp_path) -> None:
    """Synthea-style: one transaction Bundle per patient, references as Bundle-local urn:uuid."""
    _, report = pool_run
    folder = tmp_path / "bundles"
    folder.mkdir()
    for pid, resources in patient_resources(export.directory).items():
        patient_url = f"urn:uuid:{pid}-0000"
        entries = []
        for res in resources:
            res = dict(res)
            if res["resourceType"] == "Patient":
                entries.append({"fullUrl": patient_url, "resource": res})
                continue
            res["subject"] = {"reference": patient_url}
            entries.append({"fullUrl": f"urn:uuid:{res['id']}", "resource": res})
        (folder / f"{pid}.json").write_bytes(orjson.dumps(
            {"resourceType": "Bundle", "type": "transaction", "entry": entries}))
    run = run_audit([folder], tmp_path / "work", settings, now=NOW, workers=2, progress=False)
    bundled = build_report(run, settings, as_of=NOW, sources=[str(export.directory)])
    expected = comparable(report)
    got = comparable(bundled)
    # Patients without a Patient resource have no fullUrl to resolve to: their resources are
    # "without a patient reference" here, so only those counts differ.
    for dq in (expected["data_quality"], got["data_quality"]):
        for key in ("resources_read", "resources_without_patient_reference", "lines_not_readable",
                    "patients_without_patient_resource"):
            dq.pop(key)
    assert got == expected


def test_local_pool_and_dask_cluster_give_identical_results(export, settings, pool_run, tmp_path) -> None:
    import distributed
    run, report = pool_run
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, memory_limit="1GiB", silence_logs=40) as cluster:
        dask_run = run_audit([export.directory], tmp_path, settings, now=NOW, scheduler=cluster.scheduler_address,
                             patients_file=tmp_path / "patients.csv", progress=False,
                             partition_bytes=64 * 1024, n_shards=7)
    assert dask_run.executor.startswith("dask")
    dask_report = build_report(dask_run, settings, as_of=NOW, sources=[str(export.directory)])
    assert comparable(dask_report) == comparable(report)
    assert (tmp_path / "patients.csv").read_bytes() == run.patients_file.read_bytes()


def test_cli_writes_json_html_and_patients(export, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    code = main(["audit", str(export.directory), "--as-of", TODAY.isoformat(), "--workers", "1", "--no-progress",
                 "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"),
                 "--patients", str(tmp_path / "p.csv")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    out = capsys.readouterr().out
    assert f"Audit of {report['patients_evaluated']} patients" in out
    with_card = report["patients_with_card"]
    assert any(line.startswith("any card") and line.split()[2] == str(with_card) for line in out.splitlines())
    assert len(read_rows(tmp_path / "p.csv")) == with_card
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") >= 3 and "No neck pain documented" in html


def test_cli_refuses_a_server_off_the_allowlist(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CDS_FHIR_ALLOWLIST", "https://fhir.example.org/")
    assert main(["audit", "--fhir-server", "https://other.example.org/fhir", "--no-progress"]) == 1
    assert "CDS_FHIR_ALLOWLIST" in capsys.readouterr().err
    assert main(["audit", "--no-progress"]) == 2
