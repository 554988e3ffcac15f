"""`b12-cds feedback-report [--since DATE] [--json] [--html FILE]`: acceptance of the cards issued, per card kind.

Reads the store configured by the `CDS_*` environment (`CDS_DATA_DIR` or `CDS_DATABASE_URL`).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from cds_service.config import Settings
from cds_service.store import Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=_date, metavar="YYYY-MM-DD",
                        help="only cards issued on or after this UTC date")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write the report as an HTML page with charts")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    store = Store.open(settings)
    try:
        report = store.feedback_report(args.since)
    finally:
        store.close()
    if args.html:
        from cds_service.reports.html import render_feedback_html

        args.html.write_text(render_feedback_html(report, settings), encoding="utf-8")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(report, sys.stdout)
    return 0


def print_table(report: dict[str, Any], out: TextIO) -> None:
    """Write the report as a fixed-width table followed by the override reasons per kind."""
    headers = ("card kind", "issued", "feedback", "accepted", "overridden", "acceptance")
    rows = [(k["kind"], k["issued"], k["with_feedback"], k["accepted"], k["overridden"],
             _rate(k["acceptance_rate"])) for k in report["kinds"]]
    t = report["totals"]
    rows.append(("TOTAL", t["issued"], t["with_feedback"], t["accepted"], t["overridden"],
                 _rate(t["acceptance_rate"])))
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: tuple[Any, ...]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = (str(c).rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join((first, *rest))

    scope = f"cards issued since {report['since']}" if report["since"] else "all cards"
    out.write(f"Feedback report ({scope}; generated {report['generated_at']})\n\n")
    out.write(line(headers) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in rows[:-1]:
        out.write(line(row) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(line(rows[-1]) + "\n")

    for kind in report["kinds"]:
        if not kind["overridden"]:
            continue
        out.write(f"\nOverride reasons for {kind['kind']}:\n")
        for reason in kind["override_reasons"]:
            label = reason.get("display") or f"{reason['system']}|{reason['code']}"
            out.write(f"  {reason['count']:>6}  {label}\n")
        if kind["overridden_with_comment_only"]:
            out.write(f"  {kind['overridden_with_comment_only']:>6}  (comment only)\n")
        no_reason = kind["overridden_without_coded_reason"] - kind["overridden_with_comment_only"]
        if no_reason:
            out.write(f"  {no_reason:>6}  (no reason given)\n")
    withheld = report.get("withheld") or {}
    if any(withheld.values()):
        out.write("\nCards the rules chose but the alert policy withheld (README: Suppression and silent mode):\n")
        for kind in report["kinds"]:
            if kind["silent"] or kind["suppressed"] or kind["locked_out"]:
                out.write(f"  {kind['kind']}: {kind['silent']} silent (would have been shown), "
                          f"{kind['suppressed']} suppressed, {kind['locked_out']} locked out\n")
                for reason in kind["suppressed_by_reason"]:
                    label = reason.get("display") or reason.get("code") or "no coded reason"
                    out.write(f"  {reason['count']:>6}  suppressed after {reason['outcome']}: {label}\n")
    suppressions = report.get("suppressions") or {}
    if suppressions.get("created"):
        out.write(f"\nSuppressions from feedback: {suppressions['created']} created, "
                  f"{suppressions['active']} active now\n")
        for item in suppressions["by_reason"]:
            label = item.get("display") or item.get("code") or "no coded reason"
            out.write(f"  {item['created']:>6} created, {item['active']:>6} active  "
                      f"{item['kind']} {item['outcome']}: {label}\n")
    unknown = report["unknown_card_feedback"]
    if unknown["entries"]:
        out.write(f"\nFeedback for cards this service never issued: {unknown['entries']} entries "
                  f"on {unknown['cards']} cards\n")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
