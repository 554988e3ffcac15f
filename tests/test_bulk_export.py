"""`$export` against a stub of the Bulk Data protocol on 127.0.0.1 (pytest-httpserver).

The stub behaves as the IG says: kick-off needs `Prefer: respond-async` and answers 202 with a
Content-Location; the status URL answers 202 with Retry-After (and X-Progress) until done, then
the manifest; output files are NDJSON.  The client must wait what Retry-After says, send the
token only to the allowlisted server (to output files only when the manifest requires it),
report server errors with their OperationOutcome text, and refuse URLs off the allowlist.
"""

from __future__ import annotations

import json
from datetime import datetime, time, timezone
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from bench.population import write_population
from cds_service.audit.bulk_export import BulkExporter, BulkExportError
from cds_service.audit.report import build_report
from cds_service.audit.runner import run_audit
from cds_service.cli import main
from cds_service.config import Settings

TOKEN = "bulk-secret-token"
NOW = datetime.combine(datetime.now(timezone.utc).date(), time(12), tzinfo=timezone.utc)


def outcome(text: str) -> str:
    return json.dumps({"resourceType": "OperationOutcome",
                       "issue": [{"severity": "error", "code": "processing", "diagnostics": text}]})


class BulkStub:
    """Kick-off -> `pending` status polls (202 + Retry-After) -> manifest -> NDJSON files."""

    def __init__(self, server: HTTPServer, export_dir: Path, *, pending: int = 2, requires_token: bool = True) -> None:
        self.server, self.pending, self.requires_token = server, pending, requires_token
        self.files = sorted(export_dir.glob("*.ndjson"))
        self.polls = 0
        server.expect_request("/fhir/Patient/$export").respond_with_handler(self.kick_off)
        server.expect_request("/fhir/status/job-1").respond_with_handler(self.status)
        for f in self.files:
            server.expect_request(f"/files/{f.name}").respond_with_handler(self.file_handler(f))

    def kick_off(self, request: Request) -> Response:
        if request.headers.get("Prefer") != "respond-async":
            return Response(outcome("Prefer: respond-async is required"), 400, content_type="application/fhir+json")
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return Response(outcome("unauthorized"), 401, content_type="application/fhir+json")
        return Response("", 202, headers={"Content-Location": self.server.url_for("/fhir/status/job-1")})

    def status(self, request: Request) -> Response:
        self.polls += 1
        if self.polls <= self.pending:
            return Response("", 202, headers={"Retry-After": str(self.polls), "X-Progress": f"{self.polls * 30}%"})
        manifest = {"transactionTime": "2026-01-01T00:00:00Z", "request": "...",
                    "requiresAccessToken": self.requires_token,
                    "output": [{"type": f.name.split(".")[0], "url": self.server.url_for(f"/files/{f.name}")}
                               for f in self.files],
                    "error": []}
        return Response(json.dumps(manifest), 200, content_type="application/json")

    def file_handler(self, path: Path):
        def handler(request: Request) -> Response:
            if self.requires_token and request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return Response(outcome("unauthorized"), 401)
            return Response(path.read_bytes(), 200, content_type="application/fhir+ndjson")
        return handler


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_population(tmp_path_factory.mktemp("export"), 120, seed=3,
                            today=NOW.date()).directory


def settings_for(server: HTTPServer, tmp_path: Path) -> Settings:
    return Settings.from_env({"fhir_allowlist": server.url_for("/fhir"), "data_dir": str(tmp_path / "data")})


def test_export_polls_with_retry_after_downloads_and_audits_like_local_files(
        httpserver: HTTPServer, export_dir: Path, tmp_path: Path) -> None:
    stub = BulkStub(httpserver, export_dir, pending=2)
    settings = Settings.from_env({"fhir_allowlist": f"{httpserver.url_for('/fhir')},{httpserver.url_for('/files')}",
                                  "data_dir": str(tmp_path / "data")})
    waits: list[float] = []
    result = BulkExporter(httpserver.url_for("/fhir"), settings, token=TOKEN, sleep=waits.append).run(tmp_path / "dl")
    assert waits == [1.0, 2.0]  # Retry-After of each 202
    assert stub.polls == 3
    assert sorted(p.read_bytes() for p in result.files) == sorted(p.read_bytes() for p in stub.files)
    kick = next(req for req, _ in httpserver.log if req.path.endswith("$export"))
    assert set(kick.args["_type"].split(",")) >= {"Patient", "Condition", "Observation", "MedicationRequest"}
    assert kick.headers["Accept"] == "application/fhir+json"

    downloaded = run_audit(result.files, tmp_path / "w1", settings, now=NOW, workers=1, progress=False)
    local = run_audit([export_dir], tmp_path / "w2", settings, now=NOW, workers=1, progress=False)
    a, b = (build_report(r, settings, as_of=NOW, sources=[]) for r in (downloaded, local))
    for r in (a, b):
        r.pop("run"), r.pop("generated_at")
    assert a == b and a["patients_evaluated"] > 100


def test_token_goes_to_output_files_only_when_the_manifest_requires_it(
        httpserver: HTTPServer, export_dir: Path, tmp_path: Path) -> None:
    BulkStub(httpserver, export_dir, pending=0, requires_token=False)
    settings = Settings.from_env({"fhir_allowlist": httpserver.url_for("/"), "data_dir": str(tmp_path)})
    BulkExporter(httpserver.url_for("/fhir"), settings, token=TOKEN, sleep=lambda s: None).run(tmp_path / "dl")
    for req, _ in httpserver.log:
        assert ("Authorization" in req.headers) == req.path.startswith("/fhir"), req.path


def test_kick_off_error_is_reported_with_the_servers_diagnostics(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        outcome("_type Foo is not supported"), status=400, content_type="application/fhir+json")
    with pytest.raises(BulkExportError, match=r"kick-off refused: HTTP 400: _type Foo is not supported"):
        BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), sleep=lambda s: None).kick_off()


def test_a_failed_export_stops_polling(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_ordered_request("/fhir/Patient/$export").respond_with_data(
        "", status=202, headers={"Content-Location": httpserver.url_for("/fhir/status/9")})
    httpserver.expect_ordered_request("/fhir/status/9").respond_with_data("", status=202, headers={"Retry-After": "5"})
    httpserver.expect_ordered_request("/fhir/status/9").respond_with_data(
        outcome("export job crashed"), status=500, content_type="application/fhir+json")
    waits: list[float] = []
    with pytest.raises(BulkExportError, match="export failed: HTTP 500: export job crashed"):
        BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), sleep=waits.append).run(tmp_path)
    assert waits == [5.0]


def test_export_that_never_finishes_times_out(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        "", status=202, headers={"Content-Location": "/fhir/status/slow"})  # relative: resolved
    httpserver.expect_request("/fhir/status/slow").respond_with_data("", status=202, headers={"Retry-After": "120"})
    exporter = BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), sleep=lambda s: None,
                            timeout_seconds=60)
    with pytest.raises(BulkExportError, match="not complete after 60 s"):
        exporter.run(tmp_path)


def test_urls_off_the_allowlist_are_refused_before_any_request(httpserver: HTTPServer, tmp_path: Path) -> None:
    with pytest.raises(BulkExportError, match="CDS_FHIR_ALLOWLIST"):
        BulkExporter(httpserver.url_for("/fhir"), Settings.from_env({"fhir_allowlist": ""}))
    # A status URL or an output file elsewhere: refused, and the token is not sent there.
    httpserver.expect_request("/fhir/Patient/$export").respond_with_data(
        "", status=202, headers={"Content-Location": "http://127.0.0.2:9/elsewhere"})
    with pytest.raises(BulkExportError, match="not on CDS_FHIR_ALLOWLIST"):
        BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), token=TOKEN).kick_off()
    exporter = BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), token=TOKEN)
    with pytest.raises(BulkExportError, match="not on CDS_FHIR_ALLOWLIST"):
        exporter.download({"output": [{"type": "Patient", "url": httpserver.url_for("/files/Patient.ndjson")}]},
                          tmp_path)
    assert not any(req.path.startswith("/files") for req, _ in httpserver.log)


@pytest.mark.parametrize("path", ["/fhir/../files/Patient.ndjson", "/fhir/%2e%2e/files/Patient.ndjson",
                                  "/fhir/..%2ffiles/Patient.ndjson", "/fhir/..;/files/Patient.ndjson",
                                  "/fhir/\n/../../files/Patient.ndjson"])
def test_output_urls_escaping_the_allowlisted_path_get_no_token(httpserver: HTTPServer, tmp_path: Path,
                                                                 path: str) -> None:
    exporter = BulkExporter(httpserver.url_for("/fhir"), settings_for(httpserver, tmp_path), token=TOKEN)
    with pytest.raises(BulkExportError):
        exporter.download({"output": [{"type": "Patient", "url": httpserver.url_for("/") + path.lstrip("/")}]},
                          tmp_path)
    assert not any(req.path.startswith("/files") for req, _ in httpserver.log)


def test_cli_runs_the_export_then_the_audit(httpserver: HTTPServer, export_dir: Path, tmp_path: Path,
                                             monkeypatch, capsys) -> None:
    BulkStub(httpserver, export_dir, pending=0)
    monkeypatch.setenv("CDS_FHIR_ALLOWLIST", httpserver.url_for("/"))
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    code = main(["audit", "--fhir-server", httpserver.url_for("/fhir"), "--token", TOKEN, "--workers", "1",
                 "--no-progress", "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["patients_evaluated"] > 100 and report["sources"][0].endswith("/Patient/$export")
    assert TOKEN not in capsys.readouterr().err
