"""The demo EHR page in a real browser (Debian's Chromium driven by Playwright).

The service runs as it does for users (`b12-cds serve --demo`, gunicorn, on 127.0.0.1 and a
free port); the page calls it the way an EHR does.  Each demo patient must get the card its
catalog entry promises (checked through the card kinds the service recorded) or no card; an
accepted suggestion and a dismissal with a reason must reach the feedback store; the page must
request nothing from any other host; hostile card text must stay text.

Chromium: `apt-get install chromium` (scripts/test.sh does it).  Never `playwright install`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from cds_service.demo_data import load_catalog
from tests.servers import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
PATIENT_VIEW = "b12-neck-pain-patient-view"
CARD_KINDS = {"low-b12", "mma-test", "b12-test"}
CATALOG = load_catalog()
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMEOUT_MS = 20_000


# ---------------------------------------------------------------------------------------------
# The service and the browser
# ---------------------------------------------------------------------------------------------


class Service:
    def __init__(self, base: str) -> None:
        self.base = base
        self.host = urlsplit(base).netloc

    def token(self, path: str) -> str:
        response = requests.post(f"{self.base}/demo/api/token", json={"path": path}, timeout=10)
        response.raise_for_status()
        return response.json()["token"]

    def report(self) -> dict[str, Any]:
        path = "/admin/feedback-report"
        response = requests.get(self.base + path, headers={"Authorization": f"Bearer {self.token(path)}"},
                                timeout=10)
        response.raise_for_status()
        return response.json()

    def kinds(self) -> dict[str, dict[str, Any]]:
        return {k["kind"]: k for k in self.report()["kinds"]}

    def issued(self) -> dict[str, int]:
        return {kind: k["issued"] for kind, k in self.kinds().items()}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`b12-cds serve --demo` on 127.0.0.1:<free port> with a private data directory."""
    tmp = tmp_path_factory.mktemp("demo-service")
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp / "data"), "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom"),
           "CDS_LOG_LEVEL": "WARNING"}
    for name in ("CDS_AUTH_DISABLED", "CDS_PUBLIC_BASE_URL", "CDS_DATABASE_URL", "CDS_BIND"):
        env.pop(name, None)
    server = ServerProcess([B12_CDS, "serve", "--demo", "--bind", f"127.0.0.1:{port}"], env=env,
                           log_path=tmp / "server.log")
    with server.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30):
        yield Service(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), \
        "Debian's chromium is required for the browser tests: apt-get install chromium (scripts/test.sh does it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser page on the demo, recording every request and every script error."""

    def __init__(self, browser: Any, service: Service) -> None:
        self.service = service
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.requests: list[Any] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))

    def open(self) -> "Page":
        self.page.goto(self.service.base + "/")
        self.page.wait_for_selector("body[data-ready=true]")
        return self

    def choose(self, patient_id: str) -> Any:
        """Open a patient's chart and wait for the patient-view answer; return the cards."""
        self.page.click(f"[data-patient-id='{patient_id}']")
        return self.wait_cards(patient_id, "patient-view")

    def wait_cards(self, patient_id: str, hook: str) -> Any:
        self.page.wait_for_selector(f"#cards[data-state=done][data-patient='{patient_id}'][data-hook='{hook}']",
                                    state="attached")
        return self.page.locator("#cards article.card")

    def hook_posts(self, service_id: str) -> list[dict[str, Any]]:
        return [json.loads(r.post_data) for r in self.requests
                if r.method == "POST" and urlsplit(r.url).path == f"/cds-services/{service_id}"]


@pytest.fixture
def demo(browser: Any, service: Service) -> Iterator[Page]:
    page = Page(browser, service)
    yield page
    page.context.close()
    assert page.errors == [], f"script errors on the demo page: {page.errors}"


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ---------------------------------------------------------------------------------------------
# Every demo patient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CATALOG, ids=[e["patientId"] for e in CATALOG])
def test_each_demo_patient_shows_its_chart_and_expected_card(demo: Page, service: Service,
                                                             entry: dict[str, str]) -> None:
    demo.open()
    button = demo.page.locator(f"[data-patient-id='{entry['patientId']}']")
    assert entry["description"] in button.inner_text()

    before = service.issued()
    cards = demo.choose(entry["patientId"])
    after = service.issued()
    new = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in after if after.get(kind, 0) != before.get(kind, 0)}

    assert demo.page.locator("#patient-name").inner_text() == entry["name"]
    assert demo.page.locator("#problems li").count() >= 1
    assert button.get_attribute("aria-current") == "true"

    if entry["expected"] in CARD_KINDS:
        assert cards.count() == 1, demo.page.locator("#cards-status").inner_text()
        assert new == {entry["expected"]: 1}, "the card shown is not of the kind the catalog expects"
        card = cards.first
        assert card.get_attribute("data-indicator") in ("info", "warning", "critical")
        assert card.locator(".indicator-badge").inner_text().lower() == card.get_attribute("data-indicator")
        assert card.locator(".card-summary").inner_text().strip()
        assert card.locator(".card-source").inner_text().startswith("Source: ")
        assert card.locator(".card-detail").inner_text().strip()
        assert card.locator(".dismiss-toggle").is_visible()
        if entry.get("shows"):  # e.g. the value as the laboratory reported it, or the test suggested
            assert entry["shows"] in card.locator(".card-summary").inner_text()
    else:
        assert cards.count() == 0
        assert new == {}
        assert demo.page.locator("#cards-status").inner_text().startswith("No cards")

    # The hook was called as an EHR calls it.
    (body,) = demo.hook_posts(PATIENT_VIEW)
    assert body["hook"] == "patient-view" and UUID.match(body["hookInstance"])
    assert body["context"] == {"userId": "Practitioner/demo-clinician", "patientId": entry["patientId"]}
    assert body["prefetch"]["patient"]["id"] == entry["patientId"]
    assert body["prefetch"]["conditions"]["type"] == "searchset"


# ---------------------------------------------------------------------------------------------
# Feedback
# ---------------------------------------------------------------------------------------------


def test_accept_and_dismiss_send_feedback_that_is_stored_and_reported(demo: Page, service: Service) -> None:
    demo.open()
    before = service.kinds()

    # Accept the suggestion of a B12 test card.
    card = demo.choose("demo-metformin-chronic").first
    suggestion = card.locator("button.suggestion").first
    suggestion_uuid = suggestion.get_attribute("data-suggestion-uuid")
    card_uuid = card.get_attribute("data-card-uuid")
    assert UUID.match(suggestion_uuid) and UUID.match(card_uuid)
    suggestion.click()
    demo.page.wait_for_selector(f"article[data-card-uuid='{card_uuid}'][data-feedback=accepted]")
    assert "Feedback sent" in card.locator(".card-outcome").inner_text()
    assert suggestion.is_disabled()

    # Dismiss the low-B12 card with one of its override reasons and a comment, by keyboard.
    card = demo.choose("demo-low-b12").first
    card_uuid = card.get_attribute("data-card-uuid")
    toggle = card.locator(".dismiss-toggle")
    toggle.focus()
    demo.page.keyboard.press("Enter")
    assert toggle.get_attribute("aria-expanded") == "true"
    reasons = card.locator(".dismiss-form input[type=radio]")
    assert reasons.count() >= 1
    chosen_code = reasons.nth(1).get_attribute("data-code") if reasons.count() > 1 else reasons.first.get_attribute("data-code")
    card.locator(f".dismiss-form input[data-code='{chosen_code}']").check()
    card.get_by_label("Comment (optional)").fill("Checked at the outside lab last week")
    card.locator(".dismiss-submit").focus()
    demo.page.keyboard.press("Enter")
    demo.page.wait_for_selector(f"article[data-card-uuid='{card_uuid}'][data-feedback=overridden]")

    # Both feedback posts were well-formed CDS Hooks feedback.
    posts = [json.loads(r.post_data)["feedback"][0] for r in demo.requests
             if r.method == "POST" and r.url.endswith(f"/cds-services/{PATIENT_VIEW}/feedback")]
    accepted, overridden = posts
    assert accepted["outcome"] == "accepted" and accepted["acceptedSuggestions"] == [{"id": suggestion_uuid}]
    assert overridden["outcome"] == "overridden" and overridden["card"] == card_uuid
    assert overridden["overrideReason"]["reason"]["code"] == chosen_code
    assert overridden["overrideReason"]["userComment"] == "Checked at the outside lab last week"
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$", overridden["outcomeTimestamp"])

    # The service stored them: its report counts them ...
    after = service.kinds()
    assert after["b12-test"]["accepted"] == before.get("b12-test", {}).get("accepted", 0) + 1
    assert after["low-b12"]["overridden"] == before.get("low-b12", {}).get("overridden", 0) + 1
    reasons_after = {r["code"]: r["count"] for r in after["low-b12"]["override_reasons"]}
    reasons_before = {r["code"]: r["count"] for r in before.get("low-b12", {}).get("override_reasons", [])}
    assert reasons_after[chosen_code] == reasons_before.get(chosen_code, 0) + 1

    # ... and the page shows the same report.
    demo.page.wait_for_function(
        "n => document.querySelector(\"#report-table tr[data-kind='low-b12'] td[data-field=overridden]\")"
        "?.textContent === String(n)", arg=after["low-b12"]["overridden"])
    row = demo.page.locator("#report-table tr[data-kind='b12-test'] td[data-field=accepted]")
    assert row.inner_text() == str(after["b12-test"]["accepted"])
    screenshot(demo.page, "demo-page-feedback.png")


# ---------------------------------------------------------------------------------------------
# Order view
# ---------------------------------------------------------------------------------------------


def test_order_view_fires_order_select_with_a_draft_order(demo: Page) -> None:
    demo.open()
    demo.choose("demo-metformin-chronic")
    demo.page.click("#view-order")
    assert demo.page.locator("#view-order").get_attribute("aria-pressed") == "true"

    demo.page.select_option("#order-choice", "naproxen")
    demo.page.click("#order-select")
    cards = demo.wait_cards("demo-metformin-chronic", "order-select")
    assert cards.count() == 1  # a medication order does not change the B12 advice

    demo.page.select_option("#order-choice", "b12-test")
    demo.page.click("#order-select")
    demo.page.wait_for_function("() => document.querySelector('#cards').dataset.state === 'done'"
                                " && document.querySelector('#cards-status').textContent.startsWith('No cards')")
    assert cards.count() == 0  # a B12 test among the draft orders counts as ordered

    medication, b12 = demo.hook_posts("b12-neck-pain-order-select")
    for body in (medication, b12):
        assert body["hook"] == "order-select"
        (entry,) = body["context"]["draftOrders"]["entry"]
        draft = entry["resource"]
        assert draft["status"] == "draft"
        assert body["context"]["selections"] == [f"{draft['resourceType']}/{draft['id']}"]
    assert medication["context"]["draftOrders"]["entry"][0]["resource"]["resourceType"] == "MedicationRequest"
    assert b12["context"]["draftOrders"]["entry"][0]["resource"]["code"]["coding"][0]["code"] == "2132-9"

    # The developer panel shows the last exchange, request and response.
    latest = demo.page.locator("#exchanges > li").first
    assert "order-select: POST /cds-services/b12-neck-pain-order-select" in latest.locator("summary").inner_text()
    panel = latest.inner_text()
    assert '"draftOrders"' in panel and '"cards": []' in panel and "urn:b12-neck-cds:demo-ehr" in panel


def test_a_draft_b12_order_with_the_ehrs_own_code_counts_as_ordered(demo: Page) -> None:
    demo.open()
    cards = demo.choose("demo-brand-metformin-reference")
    assert cards.count() == 1  # Janumet by reference + pins and needles: the B12 card
    demo.page.click("#view-order")
    demo.page.select_option("#order-choice", "b12-local")
    demo.page.click("#order-select")
    demo.page.wait_for_function("() => document.querySelector('#cards').dataset.state === 'done'"
                                " && document.querySelector('#cards-status').textContent.startsWith('No cards')")
    assert cards.count() == 0  # recognised by its name: the card does not suggest the test being ordered
    (body,) = demo.hook_posts("b12-neck-pain-order-select")
    coding = body["context"]["draftOrders"]["entry"][0]["resource"]["code"]["coding"]
    assert [c["system"] for c in coding] == ["https://ehr.example.org/fhir/CodeSystem/orderables"]


def test_red_flags_lead_and_unsupported_orders_are_not_preselected(demo: Page) -> None:
    demo.open()
    card = demo.choose("demo-myelopathy-acute").first
    assert card.get_attribute("data-indicator") == "warning"
    assert card.locator(".card-summary").inner_text().startswith("Red flags: assess urgently and check B12 alongside")
    assert "Neck pain: acute" in card.locator(".card-detail").inner_text()
    assert card.locator("button.suggestion .recommended").count() == 1
    # chronic neck pain + metformin, no symptom: the card asks, and the order is offered unselected
    card = demo.choose("demo-no-symptom-documented").first
    assert "ask about neurological symptoms" in card.locator(".card-summary").inner_text()
    assert card.locator("button.suggestion").count() == 1
    assert card.locator("button.suggestion .recommended").count() == 0


# ---------------------------------------------------------------------------------------------
# Nothing but the service
# ---------------------------------------------------------------------------------------------


def test_page_requests_nothing_from_any_other_host(demo: Page, service: Service) -> None:
    demo.open()
    card = demo.choose("demo-low-b12").first
    card.locator(".dismiss-toggle").click()
    card.locator(".dismiss-submit").click()
    demo.page.wait_for_selector("article[data-feedback=overridden]")
    demo.choose("demo-metformin-chronic").first.locator("button.suggestion").first.click()
    demo.page.wait_for_selector("article[data-feedback=accepted]")
    demo.page.click("#view-order")
    demo.page.click("#order-select")
    demo.wait_cards("demo-metformin-chronic", "order-select")
    demo.page.click("#report-refresh")
    demo.page.wait_for_load_state("networkidle")

    urls = [r.url for r in demo.requests]
    assert len(urls) >= 10
    elsewhere = [u for u in urls if urlsplit(u).scheme != "http" or urlsplit(u).netloc != service.host]
    assert elsewhere == []
    paths = {urlsplit(u).path for u in urls}
    assert {"/", "/demo/static/demo.js", "/demo/static/demo.css", "/cds-services",
            f"/cds-services/{PATIENT_VIEW}", f"/cds-services/{PATIENT_VIEW}/feedback",
            "/admin/feedback-report"} <= paths
    # Every call to the CDS service carried its own bearer token.
    for request in demo.requests:
        path = urlsplit(request.url).path
        if path.startswith("/cds-services") or path.startswith("/admin/"):
            assert request.headers.get("authorization", "").startswith("Bearer ey"), path
    screenshot(demo.page, "demo-page.png")


# ---------------------------------------------------------------------------------------------
# Hostile card text stays text
# ---------------------------------------------------------------------------------------------


HOSTILE_CARD = {
    "uuid": "3b1d5a52-1f0e-4c56-9d1b-7f3a8b1c2d3e",
    "summary": "<img src=x onerror=\"window.__pwned=1\"> summary",
    "indicator": "critical\" onmouseover=\"window.__pwned=2",
    "source": {"label": "<b>Lab</b>", "url": "javascript:window.__pwned=3"},
    "detail": ("**Bold** and *italic* with `code`\n\n<script>window.__pwned=4</script>\n"
               "- [a safe link](https://example.org/guide)\n- [a bad link](javascript:window.__pwned=5)\n"
               "- <iframe src=\"https://example.org\"></iframe>"),
    "links": [{"label": "bad", "url": "javascript:window.__pwned=6", "type": "absolute"}],
    "overrideReasons": [{"system": "urn:x", "code": "<i>x</i>", "display": "<img src=y onerror=\"window.__pwned=7\">"}],
}


def test_hostile_card_text_is_shown_as_text(demo: Page) -> None:
    demo.page.route(f"**/cds-services/{PATIENT_VIEW}", lambda route: route.fulfill(
        status=200, content_type="application/json", body=json.dumps({"cards": [HOSTILE_CARD]})))
    demo.open()
    card = demo.choose("demo-metformin-chronic").first
    card.locator(".dismiss-toggle").click()

    cards = demo.page.locator("#cards")
    assert cards.locator("img, script, iframe, b, i").count() == 0
    assert card.locator(".card-summary").inner_text() == HOSTILE_CARD["summary"]
    assert card.get_attribute("data-indicator") == "info"  # unknown indicator: shown as info
    assert "<b>Lab</b>" in card.locator(".card-source").inner_text()
    assert card.locator(".card-source a").count() == 0
    detail = card.locator(".card-detail")
    assert detail.locator("strong").inner_text() == "Bold"
    assert detail.locator("em").inner_text() == "italic"
    assert detail.locator("code").inner_text() == "code"
    assert "<script>window.__pwned=4</script>" in detail.inner_text()
    hrefs = [a.get_attribute("href") for a in cards.locator("a").all()]
    assert hrefs == ["https://example.org/guide"]
    assert cards.locator("a").first.get_attribute("rel") == "noopener noreferrer"
    assert "<img src=y" in card.locator(".dismiss-form").inner_text()
    card.locator(".card-summary").hover()
    assert demo.page.evaluate("() => window.__pwned") is None


# ---------------------------------------------------------------------------------------------
# The README's screenshot
# ---------------------------------------------------------------------------------------------


def test_screenshot_of_a_card(demo: Page) -> None:
    """Saves test-artifacts/demo-card.png; with B12_UPDATE_DOCS_SCREENSHOT=1 also docs/demo-screenshot.png."""
    demo.page.set_viewport_size({"width": 1400, "height": 1300})
    demo.open()
    card = demo.choose("demo-icd-ppi-paraesthesia").first
    demo.page.evaluate("() => { document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); }")
    box = card.bounding_box()
    assert box and box["y"] + box["height"] < 1300, "the card should be visible without scrolling"
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "demo-card.png"
    demo.page.screenshot(path=str(path))
    assert path.stat().st_size > 20_000
    if os.environ.get("B12_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO / "docs" / "demo-screenshot.png")


# ---------------------------------------------------------------------------------------------
# Why this card / why no card
# ---------------------------------------------------------------------------------------------


def test_why_this_card_and_why_no_card(demo: Page) -> None:
    """Under each card, and in place of a card, the service's explanation: the decision and its
    reason code, each fact with the record entry behind it, what was not found."""
    demo.open()
    for entry in CATALOG:  # one page, every patient: the panel matches the catalog's outcome
        cards = demo.choose(entry["patientId"])
        why = demo.page.locator("#cards details.why")
        assert why.count() == 1, entry["patientId"]
        if entry["expected"] in CARD_KINDS:
            assert cards.first.locator("details.why").count() == 1
            assert why.get_attribute("data-why") == "card"
            assert why.locator("summary").inner_text() == "Why this card"
        else:
            assert cards.count() == 0 and why.get_attribute("data-why") == "no-card"
            assert why.locator("summary").inner_text() == "Why no card"
            assert why.get_attribute("data-reason") == entry["expected"], entry["patientId"]

    demo.choose("demo-metformin-chronic")
    why = demo.page.locator("#cards article.card details.why")
    why.locator("summary").click()
    text = why.inner_text()
    assert "Card b12-test: reason risk-and-symptoms (rule 8" in text
    neck = why.locator("li[data-fact=neck_pain]").inner_text()
    assert "Condition/demo-metformin-chronic-condition-1" in neck and "code 81680005 (http://snomed.info/sct)" in neck
    assert "MedicationRequest/" in why.locator("li[data-fact=risk_factors]").inner_text()
    assert why.locator(".why-not-found li[data-fact=b12_results]").count() == 1
    assert "Skipped as invalid FHIR R4: nothing" in text

    demo.choose("demo-recent-normal")
    why = demo.page.locator("#cards details.why[data-why=no-card]")
    why.locator("summary").click()
    assert "No card: reason recent-normal (rule 7b" in why.inner_text()
    assert "Latest B12 result used: Observation/" in why.inner_text()
