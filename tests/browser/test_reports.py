"""The report pages in a real browser (Debian's Chromium driven by Playwright).

- `/admin/feedback-report` opened by a browser (Accept: text/html) on `b12-cds serve --demo`
  answers the HTML page: its charts render (SVG with a real size), the override reasons are
  labelled with their display text from cards/common.json (not the codes), cards per kind over
  time spans the days cards were issued on; the page loads nothing from anywhere.
- `b12-cds audit --html` on a generated export: the firing-rate, no-card-reason and risk-factor
  charts render, labelled with display texts, and agree with the JSON report.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.population import write_population
from cds_service.cards import CardTexts
from cds_service.cli import main
from cds_service.config import Settings
from cds_service.store import SQLITE_FILENAME, IssuedCard, Store
from tests.servers import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.browser

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/test.sh installs it); never `playwright install`
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 20_000
SERVICE = "b12-neck-pain-patient-view"
COMMON = CardTexts.load(Settings().cards_dir).common


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.requests = []  # type: ignore[attr-defined]
    page.on("request", lambda r: page.requests.append(r.url))  # type: ignore[attr-defined]
    yield page
    context.close()


def seed_feedback(data_dir: Path) -> None:
    """Cards issued over three days, some accepted, some overridden with our coded reasons."""
    store = Store.open(Settings.from_env({"data_dir": str(data_dir)}))
    system = COMMON["override_reason_system"]
    entries = []
    try:
        for i in range(9):
            kind = ("b12-test", "b12-test", "mma-test")[i % 3]
            store.record_issued_cards(SERVICE, f"hi-{i}", f"patient-{i}", [IssuedCard(f"card-{i}", kind, (f"s-{i}",))])
            if i < 3:
                entries.append({"card": f"card-{i}", "outcome": "accepted", "acceptedSuggestions": [{"id": f"s-{i}"}],
                                "outcomeTimestamp": "2026-01-02T10:00:00.000000Z"})
            elif i < 7:
                code = "mechanical-cause" if i < 6 else "patient-declined"
                entries.append({"card": f"card-{i}", "outcome": "overridden",
                                "overrideReason": {"reason": {"system": system, "code": code}},
                                "outcomeTimestamp": "2026-01-02T10:00:00.000000Z"})
        store.save_feedback(SERVICE, entries)
    finally:
        store.close()
    with sqlite3.connect(data_dir / SQLITE_FILENAME) as db:  # spread the cards over three days
        for i in range(9):
            db.execute("UPDATE issued_cards SET issued_at = ? WHERE card_uuid = ?",
                       (f"2026-01-0{1 + i % 3}T09:00:00.000000Z", f"card-{i}"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("report-service")
    seed_feedback(tmp / "data")
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp / "data"), "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
           "CDS_LOG_LEVEL": "WARNING"}
    for name in ("CDS_AUTH_DISABLED", "CDS_PUBLIC_BASE_URL", "CDS_DATABASE_URL", "CDS_BIND"):
        env.pop(name, None)
    server = ServerProcess([B12_CDS, "serve", "--demo", "--bind", f"127.0.0.1:{port}"], env=env,
                           log_path=tmp / "server.log")
    with server.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30):
        yield f"http://127.0.0.1:{port}"


def token(base: str, path: str) -> str:
    response = requests.post(f"{base}/demo/api/token", json={"path": path}, timeout=10)
    response.raise_for_status()
    return response.json()["token"]


def chart_texts(page: Any, chart: str) -> list[str]:
    figure = page.locator(f"figure[data-chart='{chart}'] svg")
    box = figure.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 100, f"chart {chart} did not render"
    return [t.strip() for t in figure.locator("text").all_text_contents()]


def test_feedback_report_page_in_the_browser(page: Any, service: str) -> None:
    path = "/admin/feedback-report"
    page.set_extra_http_headers({"Authorization": f"Bearer {token(service, path)}"})
    response = page.goto(service + path)
    assert response.status == 200 and response.headers["content-type"].startswith("text/html")
    assert page.title() == "B12 neck-pain CDS: feedback report"

    reasons = " ".join(chart_texts(page, "override-reasons"))
    assert COMMON["override_reasons"]["mechanical-cause"] in reasons
    assert COMMON["override_reasons"]["patient-declined"] in reasons
    assert "mechanical-cause" not in reasons  # the display text, not the code
    over_time = chart_texts(page, "over-time")
    assert {"2026-01-01", "2026-01-02", "2026-01-03"} <= set(over_time)
    assert {"B12 test suggested", "MMA test suggested"} <= set(over_time)
    acceptance = chart_texts(page, "acceptance")
    assert "accepted" in acceptance and "overridden" in acceptance
    table = page.locator("section#acceptance table").inner_text()
    assert "All cards\t9\t7\t3\t4\t42.9%" in table
    assert all(url.startswith(service) for url in page.requests)  # nothing from elsewhere

    # Without Accept: text/html the same endpoint still answers JSON.
    api = requests.get(service + path, headers={"Authorization": f"Bearer {token(service, path)}"}, timeout=10)
    assert api.headers["content-type"].startswith("application/json") and api.json()["totals"]["issued"] == 9


def test_audit_report_page_in_the_browser(page: Any, tmp_path: Path, monkeypatch) -> None:
    export = write_population(tmp_path / "export", 300, seed=5)
    monkeypatch.setenv("CDS_DATA_DIR", str(tmp_path / "data"))
    assert main(["audit", str(export.directory), "--as-of", "2026-01-01", "--workers", "1", "--no-progress",
                 "--html", str(tmp_path / "audit.html"), "--json", str(tmp_path / "audit.json")]) == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    page.goto((tmp_path / "audit.html").as_uri())
    assert page.title() == "B12 neck-pain CDS: audit report"

    firing = chart_texts(page, "firing-rate")
    for card in report["cards"]:
        assert card["label"] in firing
    b12 = next(c for c in report["cards"] if c["kind"] == "b12-test")
    assert f"{b12['per_1000']:,.1f}" in firing
    reasons = chart_texts(page, "no-card-reasons")
    assert "No neck pain documented" in reasons and "No B12 risk factor" in reasons
    risks = chart_texts(page, "risk-factors")
    labels = {rf["label"] for c in report["cards"] for rf in c["risk_factors"]}
    assert "age 75 or over" in labels and labels <= set(risks)
    headline = page.locator(".headline").inner_text()
    assert f"{report['patients_evaluated']:,}" in headline
    assert page.locator("section#data-quality").inner_text().count("\n") >= 5
    assert all(url.startswith("file://") for url in page.requests)
