"""End to end against a real FHIR server: the same cards whatever the EHR prefetched.

Starts `sekmet serve` (sekmet-fhir, a FHIR R4 server on SQLite) on 127.0.0.1 with a temporary
data directory, loads the demo patients with `b12-cds seed`, then for every demo patient and
hook compares the cards answered by the app's hook endpoint for:

- the full prefetch, obtained by running the discovery templates against that server as an EHR
  would;
- no prefetch (the service fetches everything through `fhirServer`);
- a prefetch holding every resource of each key's type (more than the templates ask for);
- every partial combination of prefetched keys (all 2^9 subsets for patient-view, spread over the
  patients; leave-one-out and only-one for every patient and hook), with missing keys sometimes
  absent and sometimes sent as an OperationOutcome.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any

import pytest
import requests
from flask import Flask

from cds_service import create_app
from cds_service.cli import main as cli_main
from cds_service.config import Settings
from cds_service.patient_data import SEARCHES, PatientDataGatherer, render_template
from cds_service.protocol import parse_hook_request
from cds_service.record import PREFETCH_KEYS
from tests.servers import hook_body, http_ok, sekmet_server

pytestmark = pytest.mark.integration

HOOKS = ("patient-view", "order-select", "order-sign")
OUTCOME = {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "timeout", "diagnostics": "prefetch failed"}]}


@pytest.fixture(scope="module")
def fhir_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A sekmet FHIR server on 127.0.0.1:<free port>, temporary database; stopped at the end."""
    server, base = sekmet_server(tmp_path_factory.mktemp("sekmet"))
    with server.start(http_ok(f"{base}/metadata"), timeout=60):
        yield base


@pytest.fixture(scope="module")
def patient_ids(fhir_base: str) -> list[str]:
    """Seed the demo patients with the `seed` command; its output is their ids."""
    out = io.StringIO()
    with redirect_stdout(out):
        status = cli_main(["seed", "--fhir-server", fhir_base])
    assert status == 0
    ids = out.getvalue().split()
    assert ids, "seed printed no patient ids"
    for pid in ids:  # really stored
        assert requests.get(f"{fhir_base}/Patient/{pid}", timeout=5).status_code == 200
    return ids


@pytest.fixture(scope="module")
def app(fhir_base: str, tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return create_app({"auth_disabled": True, "fhir_allowlist": fhir_base, "log_level": "ERROR",
                       "data_dir": str(tmp_path_factory.mktemp("cds-data")), "fhir_deadline": 10.0})


@pytest.fixture(scope="module")
def templates(app: Flask) -> dict[str, dict[str, str]]:
    """hook -> prefetch templates, from discovery."""
    services = app.test_client().get("/cds-services").get_json()["services"]
    return {s["hook"]: s["prefetch"] for s in services}


def ehr_prefetch(fhir_base: str, templates: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    """What an EHR that satisfies every template sends: each template run against the server."""
    tokens = parse_hook_request(body, body["hook"]).context.token_values()
    prefetch: dict[str, Any] = {}
    for key, template in templates.items():
        resp = requests.get(f"{fhir_base}/{render_template(template, tokens)}",
                            headers={"Accept": "application/fhir+json"}, timeout=10)
        if resp.status_code == 404 and "?" not in template:
            prefetch[key] = None  # no data for a read
        else:
            assert resp.status_code == 200, (key, resp.status_code)
            prefetch[key] = resp.json()
    return prefetch


def without_uuids(value: Any) -> Any:
    """Cards with their random uuids removed (everything else must be identical)."""
    if isinstance(value, dict):
        return {k: without_uuids(v) for k, v in value.items() if k != "uuid"}
    if isinstance(value, list):
        return [without_uuids(v) for v in value]
    return value


def cards_for(app: Flask, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = app.test_client().post(f"/cds-services/b12-neck-pain-{body['hook']}", json=body)
    assert resp.status_code == 200, resp.get_json()
    return without_uuids(resp.get_json()["cards"])


def partial(full: dict[str, Any], keep: tuple[str, ...], missing_as_outcome: bool) -> dict[str, Any]:
    prefetch = {k: full[k] for k in keep}
    if missing_as_outcome:
        prefetch.update({k: OUTCOME for k in PREFETCH_KEYS if k not in keep})
    return prefetch


def request_body(hook: str, pid: str, fhir_base: str, prefetch: dict[str, Any] | None = None) -> dict[str, Any]:
    return hook_body(hook=hook, patient_id=pid, fhir_server=fhir_base, token="integration-token",
                     prefetch=prefetch)


def test_demo_patients_get_cards(app: Flask, fhir_base: str, patient_ids: list[str]) -> None:
    """The comparisons below are not vacuous: some demo patients get cards, some do not."""
    counts = [len(cards_for(app, request_body("patient-view", pid, fhir_base))) for pid in patient_ids]
    assert any(counts), "no demo patient got a card"
    assert not all(counts) or len(patient_ids) == 1


def test_gathered_record_is_the_same_with_and_without_prefetch(
        fhir_base: str, patient_ids: list[str], templates: dict[str, dict[str, str]]) -> None:
    gatherer = PatientDataGatherer(Settings.from_env({"fhir_allowlist": fhir_base}, environ={}))
    for pid in patient_ids:
        body = request_body("patient-view", pid, fhir_base)
        full = ehr_prefetch(fhir_base, templates["patient-view"], body)
        fetched = gatherer.gather(parse_hook_request(body, "patient-view"), templates["patient-view"])
        body["prefetch"] = full
        given = gatherer.gather(parse_hook_request(body, "patient-view"), templates["patient-view"])
        assert fetched.record == given.record, pid
        assert set(fetched.fetched_keys) == set(PREFETCH_KEYS) and fetched.failed_keys == ()
        # Referenced Medications are read in both modes (the template subset has no _include).
        reads = 1 if given.record.medications else 0
        assert given.fhir_calls == reads and given.failed_keys == ()


def everything_prefetch(fhir_base: str, pid: str) -> dict[str, Any]:
    """A prefetch holding every resource of each key's type for the patient, not only what the
    templates ask for (an EHR may send more); Medications are sent with the requests."""
    def search(*types: str) -> dict[str, Any]:
        entries = []
        for rtype in types:
            query = f"patient={pid}&_count=1000" if rtype != "Medication" else "_count=1000"
            resp = requests.get(f"{fhir_base}/{rtype}?{query}", headers={"Accept": "application/fhir+json"},
                                timeout=10)
            assert resp.status_code == 200, (rtype, resp.status_code)
            entries += resp.json().get("entry", [])
        return {"resourceType": "Bundle", "type": "searchset", "entry": entries}

    patient = requests.get(f"{fhir_base}/Patient/{pid}", headers={"Accept": "application/fhir+json"}, timeout=10)
    prefetch: dict[str, Any] = {"patient": patient.json()}
    for key, spec in SEARCHES.items():
        extra = ("Medication",) if spec.resource_type.startswith("Medication") else ()
        prefetch[key] = search(spec.resource_type, *extra)
    return prefetch


@pytest.mark.parametrize("hook", HOOKS)
def test_same_cards_when_the_ehr_sends_more_than_asked(app: Flask, fhir_base: str, patient_ids: list[str],
                                                       templates: dict[str, dict[str, str]], hook: str) -> None:
    """A prefetch of all the patient's resources gives the cards of the template prefetch: the
    searches ask for everything the rules read (an Observation-coded diet included)."""
    for pid in patient_ids:
        full = ehr_prefetch(fhir_base, templates[hook], request_body(hook, pid, fhir_base))
        expected = cards_for(app, request_body(hook, pid, fhir_base, full))
        got = cards_for(app, request_body(hook, pid, fhir_base, everything_prefetch(fhir_base, pid)))
        assert got == expected, f"{pid} {hook}: the EHR's extra resources change the cards"


@pytest.mark.parametrize("hook", HOOKS)
def test_same_cards_whatever_was_prefetched(app: Flask, fhir_base: str, patient_ids: list[str],
                                            templates: dict[str, dict[str, str]], hook: str) -> None:
    started, calls = time.monotonic(), 0
    subsets = [s for n in range(len(PREFETCH_KEYS) + 1) for s in itertools.combinations(PREFETCH_KEYS, n)]
    for index, pid in enumerate(patient_ids):
        full = ehr_prefetch(fhir_base, templates[hook], request_body(hook, pid, fhir_base))
        expected = cards_for(app, request_body(hook, pid, fhir_base, full))
        combos: list[tuple[str, ...]] = [()]
        combos += [tuple(k for k in PREFETCH_KEYS if k != left_out) for left_out in PREFETCH_KEYS]
        combos += [(only,) for only in PREFETCH_KEYS]
        if hook == "patient-view":  # every subset, each checked on one of the patients
            combos += subsets[index::len(patient_ids)]
        for n, keep in enumerate(combos):
            got = cards_for(app, request_body(hook, pid, fhir_base, partial(full, keep, n % 2 == 1)))
            calls += 1
            assert got == expected, f"{pid} {hook}: prefetched {keep or 'nothing'} gives different cards"
    print(f"\n{hook}: {calls} hook calls over {len(patient_ids)} patients in {time.monotonic() - started:.1f}s")


def test_evaluate_command_prints_the_same_cards(app: Flask, fhir_base: str, patient_ids: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    for pid in patient_ids[:3]:
        assert cli_main(["evaluate", "--fhir-server", fhir_base, "--patient", pid, "--json",
                         "--user", "Practitioner/u1"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert without_uuids(printed["cards"]) == cards_for(app, request_body("patient-view", pid, fhir_base))
        assert cli_main(["evaluate", "--fhir-server", fhir_base, "--patient", pid]) == 0
        text = capsys.readouterr().out
        assert text.strip()
        for card in printed["cards"]:
            assert card["summary"] in text


def test_evaluate_unknown_patient_says_so(fhir_base: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["evaluate", "--fhir-server", fhir_base, "--patient", "no-such-patient"]) == 1
    err = capsys.readouterr().err
    assert "no Patient with id 'no-such-patient'" in err and "--patient" in err
