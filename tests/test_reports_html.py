"""The feedback report page renders whatever the report JSON carries.

Counts the page does not know by name but that are about withheld cards (suppressed, silent,
locked out: added to the report by the alert-policy work) get their own chart; other unknown
fields are ignored; the endpoint answers HTML only to a client that prefers it.
"""

from __future__ import annotations

from cds_service.config import Settings
from cds_service.reports.html import render_feedback_html

KIND = {"kind": "b12-test", "issued": 10, "with_feedback": 4, "accepted": 1, "overridden": 3, "acceptance_rate": 0.25,
        "override_reasons": [{"system": "urn:other-ehr", "code": "x1", "display": "Cost <too high>", "count": 2}],
        "overridden_without_coded_reason": 1, "overridden_with_comment_only": 1}


def report(**kind_extra):
    return {"since": None, "generated_at": "2026-01-01T00:00:00Z", "kinds": [{**KIND, **kind_extra}],
            "totals": {"issued": 10, "with_feedback": 4, "accepted": 1, "overridden": 3, "acceptance_rate": 0.25},
            "unknown_card_feedback": {"entries": 0, "cards": 0}, "some_future_field": {"a": [1, 2]}}


def test_withheld_counts_get_a_chart_whatever_their_names() -> None:
    html = render_feedback_html(report(suppressed=4, deliveries={"shown": 10, "silent": 6}, new_thing=3), Settings())
    section = html[html.index('<section id="suppressions">'):]
    section = section[:section.index("</section>")]
    assert "<svg" in section and ">Suppressed<" in section and ">Silent<" in section
    assert "Shown" not in section and "New thing" not in section
    # An EHR's own reason keeps the display it sent, escaped; comment-only and no-reason are named.
    assert "Cost &lt;too high&gt;" in html and "Cost <too high>" not in html
    assert "Comment only, no coded reason" in html  # the one uncoded override had a comment
    assert "No reason given" not in html


def test_without_withheld_counts_the_page_says_so() -> None:
    html = render_feedback_html(report(), Settings())
    assert "The report carries no suppressed or silent cards." in html
    assert html.count("<svg") == 2  # acceptance and override reasons (no cards over time in this report)


def test_endpoint_answers_html_only_when_asked(client) -> None:
    as_json = client.get("/admin/feedback-report")
    assert as_json.mimetype == "application/json" and "totals" in as_json.get_json()
    browser = client.get("/admin/feedback-report",
                         headers={"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"})
    assert browser.mimetype == "text/html" and b"feedback report" in browser.data
    bad = client.get("/admin/feedback-report?since=yesterday", headers={"Accept": "text/html"})
    assert bad.status_code == 400 and bad.get_json()["resourceType"] == "OperationOutcome"


def test_suppressions_by_reason_use_the_display_texts() -> None:
    from cds_service.cards import CardTexts

    common = CardTexts.load(Settings().cards_dir).common
    data = report(suppressed=2, silent=1, locked_out=0)
    data["suppressions"] = {"created": 3, "active": 2, "by_reason": [
        {"kind": "b12-test", "outcome": "overridden", "system": common["override_reason_system"],
         "code": "tested-elsewhere", "display": None, "created": 2, "active": 1},
        {"kind": "b12-test", "outcome": "accepted", "system": None, "code": None, "display": None,
         "created": 1, "active": 1}]}
    html = render_feedback_html(data, Settings())
    section = html[html.index('<section id="suppressions-by-reason">'):]
    section = section[:section.index("</section>")]
    assert "<svg" in section
    assert f">{common['override_reasons']['tested-elsewhere']}<" in section
    assert ">Suggestion accepted<" in section and "tested-elsewhere" not in section
    withheld = html[html.index('<section id="suppressions">'):]
    assert ">Locked out<" in withheld[:withheld.index("</section>")]
