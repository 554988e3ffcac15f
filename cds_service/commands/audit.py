"""`b12-cds audit`: a population dry run over a FHIR Bulk Data export, before go-live.

Every patient goes through the hooks' engine (`ClinicalEngine.evaluate`, as a `patient-view`
call would), on all local cores or on a Dask cluster (`--scheduler`).  Prints a summary, writes
the report as JSON (`--json FILE`) and HTML (`--html FILE`), and the patients who would get a
card to `--patients FILE` (CSV: this file holds patient ids; keep it where patient data belongs).

    b12-cds audit EXPORT_DIR_OR_FILES... [--html report.html] [--json report.json]
    b12-cds audit --fhir-server URL [--group ID] [--token T] --download-dir DIR ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any, TextIO

from cds_service.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="NDJSON files (one resource per line, as $export writes them), Bundle JSON files, "
                             "or directories of them")
    src = parser.add_argument_group("start the export from a FHIR server ($export)")
    src.add_argument("--fhir-server", metavar="URL", help="FHIR base URL that supports $export (must be on "
                                                          "CDS_FHIR_ALLOWLIST)")
    src.add_argument("--group", metavar="ID", help="export Group/ID instead of all patients")
    src.add_argument("--token", metavar="T", help="bearer token for the FHIR server (never logged)")
    src.add_argument("--download-dir", type=Path, metavar="DIR",
                     help="where the export's files go (default: a temporary directory, removed after)")
    src.add_argument("--export-timeout", type=float, default=3600.0, metavar="S",
                     help="give up waiting for the export after S seconds (default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, metavar="N", help="local processes (default: every usable core)")
    run.add_argument("--scheduler", metavar="ADDRESS",
                     help="Dask scheduler (tcp://host:8786); inputs and --work-dir must be on storage every "
                          "worker sees at the same path")
    run.add_argument("--work-dir", type=Path, metavar="DIR",
                     help="shards are written here (default: a temporary directory)")
    run.add_argument("--as-of", type=_day, metavar="YYYY-MM-DD",
                     help="evaluate as on this date (default: now), e.g. to compare runs")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    out.add_argument("--html", type=Path, metavar="FILE", help="write the report as an HTML page with charts")
    out.add_argument("--patients", type=Path, metavar="FILE",
                     help="CSV of the patients who would get a card (id, card kind, indicator, reason, summary)")


def run(args: argparse.Namespace) -> int:
    from cds_service.audit.bulk_export import BulkExporter, BulkExportError
    from cds_service.audit.report import build_report
    from cds_service.audit.runner import run_audit

    if bool(args.inputs) == bool(args.fhir_server):
        print("b12-cds audit: give export files/directories, or --fhir-server (not both)", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    as_of = (datetime.combine(args.as_of, time(12), tzinfo=timezone.utc) if args.as_of
             else datetime.now(timezone.utc))
    with tempfile.TemporaryDirectory(prefix="b12-cds-audit-") as tmp:
        inputs: list[str] = list(args.inputs)
        sources = list(args.inputs)
        if args.fhir_server:
            try:
                exporter = BulkExporter(args.fhir_server, settings, token=args.token,
                                        timeout_seconds=args.export_timeout)
                result = exporter.run(args.download_dir or Path(tmp) / "export", group=args.group)
            except BulkExportError as err:
                print(f"b12-cds audit: {err}", file=sys.stderr)
                return 1
            inputs = [str(p) for p in result.files]
            sources = [args.fhir_server.rstrip("/") + (f"/Group/{args.group}" if args.group else "/Patient") + "/$export"]
            if result.errors:
                print(f"the server reported errors for the export ({len(result.errors)} file(s))", file=sys.stderr)
        try:
            audit = run_audit(inputs, args.work_dir or Path(tmp) / "work", settings, now=as_of,
                              workers=args.workers, scheduler=args.scheduler, patients_file=args.patients,
                              progress=not args.no_progress)
        except FileNotFoundError as err:
            print(f"b12-cds audit: {err}", file=sys.stderr)
            return 2
    report = build_report(audit, settings, as_of=as_of, sources=sources)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.html:
        from cds_service.reports.html import render_audit_html

        args.html.write_text(render_audit_html(report, settings), encoding="utf-8")
    print_summary(report, sys.stdout)
    return 0


def print_summary(report: dict[str, Any], out: TextIO) -> None:
    n = report["patients_evaluated"]
    out.write(f"Audit of {n} patients (as of {report['as_of'][:10]}, patient-view)\n\n")
    out.write(f"{'card':<24}{'patients':>10}{'per 1,000':>12}\n")
    for card in report["cards"]:
        out.write(f"{card['label']:<24}{card['patients']:>10}{_num(card['per_1000']):>12}\n")
    out.write(f"{'any card':<24}{report['patients_with_card']:>10}{_num(report['per_1000_with_card']):>12}\n\n")
    out.write("No card, because:\n")
    for reason in report["no_card_reasons"]:
        if reason["patients"]:
            out.write(f"  {reason['patients']:>8}  {reason['label']}\n")
    dq = report["data_quality"]
    out.write("\nData quality: "
              f"{dq['resources_skipped_invalid']} resources skipped as invalid, "
              f"{dq['b12_results_unit_not_readable']} B12 results with a unit not readable, "
              f"{dq['resources_without_patient_reference']} resources without a patient reference, "
              f"{dq['lines_not_readable']} lines not readable, "
              f"{dq['patients_without_patient_resource']} patients without a Patient resource\n")
    if report.get("patients_file"):
        out.write(f"Patients who would get a card: {report['patients_file']}\n")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
