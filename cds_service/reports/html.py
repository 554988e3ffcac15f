"""The feedback report and the audit report as self-contained HTML pages (charts inline as SVG).

Both render from the report JSON (what `/admin/feedback-report`, `b12-cds feedback-report --json`
and `b12-cds audit --json` give), so the page and the JSON never disagree.  Fields the page does
not know are tolerated; per-kind counts about withheld cards (suppressed, silent, locked out)
are charted whatever their exact names, so the page keeps up as the report grows.  Every chart
has its numbers in a table beside it.  Display texts (override reasons, risk factors) come from
the deployment's `cards/common.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

from cds_service.cards import CardTexts
from cds_service.config import Settings
from cds_service.reports import charts
from cds_service.reports.labels import kind_label, override_reason_label

_ENV = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
WITHHELD_WORDS = ("suppress", "silent", "locked", "lockout", "withheld")
_KNOWN_KIND_FIELDS = {"kind", "issued", "with_feedback", "accepted", "overridden", "acceptance_rate",
                      "suppressed_by_reason",
                      "override_reasons", "overridden_without_coded_reason", "overridden_with_comment_only"}

_PAGE = _ENV.from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #212529; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #dee2e6; }
.meta { color: #495057; }
.headline { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.headline div { background: #f1f3f5; border-radius: .5rem; padding: .7rem 1rem; min-width: 10rem; }
.headline strong { display: block; font-size: 1.5rem; }
figure.chart { margin: 1rem 0; } figure.chart svg { max-width: 100%; height: auto; }
figcaption { color: #495057; font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border-bottom: 1px solid #dee2e6; padding: .3rem .7rem; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff3bf; padding: .6rem 1rem; border-radius: .4rem; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">{{ subtitle }}</p>
{% if headline %}
<div class="headline">
{% for label, value in headline %}<div>{{ label }}<strong>{{ value }}</strong></div>{% endfor %}
</div>
{% endif %}
{% for section in sections %}
<section id="{{ section.id }}">
<h2>{{ section.title }}</h2>
{% if section.text %}<p>{{ section.text }}</p>{% endif %}
{% if section.chart %}<figure class="chart" data-chart="{{ section.id }}">{{ section.chart }}
{% if section.caption %}<figcaption>{{ section.caption }}</figcaption>{% endif %}</figure>{% endif %}
{% if section.rows %}
<table>
<thead><tr>{% for h in section.header %}<th{% if not loop.first %} class="n"{% endif %}>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in section.rows %}<tr>{% for cell in row %}<td{% if not loop.first %} class="n"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% endif %}
</section>
{% endfor %}
</body>
</html>
""")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _section(id_: str, title: str, *, chart: str | None = None, caption: str = "", text: str = "",
             header: tuple[str, ...] = (), rows: list[tuple[Any, ...]] | None = None) -> dict[str, Any]:
    return {"id": id_, "title": title, "chart": Markup(chart) if chart else None, "caption": caption,
            "text": text, "header": header, "rows": rows or []}


# --- the audit report ---------------------------------------------------------------------------

def render_audit_html(report: Mapping[str, Any], settings: Settings | None = None) -> str:
    """The audit report page: firing rate, no-card reasons, risk factors and facts, data quality."""
    n = report.get("patients_evaluated", 0)
    cards = [c for c in report.get("cards", [])]
    sections = []
    labels = [c["label"] for c in cards]
    sections.append(_section(
        "firing-rate", "Firing rate per 1,000 patients",
        chart=charts.bar_chart("Cards per 1,000 patients", labels, [c.get("per_1000") or 0 for c in cards],
                               xlabel="patients per 1,000 who would get the card"),
        caption="What the patient-view hook would show, for every patient in the export.",
        header=("card", "patients", "per 1,000", "info", "warning"),
        rows=[(c["label"], _num(c["patients"]), _num(c.get("per_1000")),
               _num(c.get("indicators", {}).get("info", 0)), _num(c.get("indicators", {}).get("warning", 0)))
              for c in cards]))
    reasons = [r for r in report.get("no_card_reasons", []) if r.get("patients")]
    sections.append(_section(
        "no-card-reasons", "Why no card",
        chart=charts.bar_chart("Patients without a card, by reason", [r["label"] for r in reasons],
                               [r["patients"] for r in reasons], xlabel="patients", color=charts.PALETTE[5])
        if reasons else None,
        header=("reason", "patients", "per 1,000"),
        rows=[(r["label"], _num(r["patients"]), _num(r.get("per_1000"))) for r in reasons]))
    risk_labels: list[str] = []
    for c in cards:
        for rf in c.get("risk_factors", []):
            if rf["label"] not in risk_labels:
                risk_labels.append(rf["label"])
    series = {c["label"]: [next((rf["patients"] for rf in c.get("risk_factors", []) if rf["label"] == lab), 0)
                           for lab in risk_labels] for c in cards if c.get("patients")}
    sections.append(_section(
        "risk-factors", "Risk factors behind the cards",
        chart=charts.stacked_bar_chart("Risk factors of the patients with a card", risk_labels, series,
                                       xlabel="patients") if risk_labels and series else None,
        caption="A patient with several risk factors counts once for each.",
        header=("risk factor", *series.keys()),
        rows=[(lab, *(_num(v[i]) for v in series.values())) for i, lab in enumerate(risk_labels)]))
    fact_labels: list[str] = []
    for c in cards:
        for f in c.get("facts", []):
            if f["label"] not in fact_labels:
                fact_labels.append(f["label"])
    fact_rows = [(lab, *(_num(next((f["patients"] for f in c.get("facts", []) if f["label"] == lab), 0))
                         for c in cards if c.get("patients"))) for lab in fact_labels]
    sections.append(_section("facts", "Facts behind the cards",
                             header=("fact", *(c["label"] for c in cards if c.get("patients"))), rows=fact_rows))
    dq = report.get("data_quality", {})
    dq_rows = [("Resources skipped as invalid (not valid FHIR R4)", _num(dq.get("resources_skipped_invalid"))),
               ("B12 results whose unit could not be read", _num(dq.get("b12_results_unit_not_readable"))),
               ("Resources without a patient reference", _num(dq.get("resources_without_patient_reference"))),
               ("Lines that are not a FHIR resource", _num(dq.get("lines_not_readable"))),
               ("Patients referenced but without a Patient resource", _num(dq.get("patients_without_patient_resource")))]
    dq_rows += [(f"{t} resources read", _num(c)) for t, c in dq.get("resources_read", {}).items()]
    dq_rows += [(f"{t} resources (not used by the rules)", _num(c))
                for t, c in dq.get("resource_types_not_used", {}).items()]
    sections.append(_section("data-quality", "Data quality", header=("", "count"), rows=dq_rows))
    run = report.get("run", {})
    subtitle = (f"Population dry run of the patient-view hook as of {str(report.get('as_of', ''))[:10]}; "
                f"generated {report.get('generated_at', '')}; {run.get('executor', '')}, "
                f"{run.get('workers', '')} workers, {run.get('seconds', '')} s.")
    headline = [("Patients evaluated", _num(n)), ("Would get a card", _num(report.get("patients_with_card"))),
                ("Per 1,000 patients", _num(report.get("per_1000_with_card")))]
    if report.get("patients_file"):
        sections.append(_section("patients", "Patients who would get a card",
                                 text=f"Listed by id in {report['patients_file']} (patient data: keep it where "
                                      "patient data belongs)."))
    return _PAGE.render(title="B12 neck-pain CDS: audit report", subtitle=subtitle, headline=headline,
                        sections=sections)


# --- the feedback report ------------------------------------------------------------------------

def _withheld_counts(kind: Mapping[str, Any]) -> dict[str, float]:
    """Per-kind counts about cards not shown (suppressed, silent, locked out), whatever the
    report calls them: numbers whose name says so, or a dict of them (e.g. per delivery)."""
    found: dict[str, float] = {}
    for key, value in kind.items():
        if key in _KNOWN_KIND_FIELDS:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if any(w in key.lower() for w in WITHHELD_WORDS):
                found[key] = value
        elif isinstance(value, Mapping):
            for sub, count in value.items():
                if isinstance(count, (int, float)) and not isinstance(count, bool) and \
                        any(w in f"{key} {sub}".lower() for w in WITHHELD_WORDS):
                    found[sub if any(w in str(sub).lower() for w in WITHHELD_WORDS) else f"{key} {sub}"] = count
    return found


def _field_label(name: str) -> str:
    return name.replace("_", " ").replace("-", " ").strip().capitalize()


def render_feedback_html(report: Mapping[str, Any], settings: Settings) -> str:
    """The feedback report page: cards over time, acceptance, override reasons, withheld cards."""
    common = CardTexts.load(settings.cards_dir).common
    kinds = list(report.get("kinds", []))
    totals = report.get("totals", {})
    sections = []

    per_day = report.get("issued_per_day") or []
    days = sorted({d["day"] for d in per_day})
    kind_names = sorted({d["kind"] for d in per_day})
    counts = {(d["day"], d["kind"]): d["issued"] for d in per_day}
    series = {kind_label(k): [counts.get((day, k), 0) for day in days] for k in kind_names}
    sections.append(_section(
        "over-time", "Cards per kind over time",
        chart=charts.line_chart("Cards issued per day", days, series, ylabel="cards") if days else None,
        text="" if days else "No cards issued in this period.",
        header=("day", *series.keys()) if days else (),
        rows=[(day, *(_num(v[i]) for v in series.values())) for i, day in enumerate(days)]))

    labels = [kind_label(k["kind"]) for k in kinds]
    sections.append(_section(
        "acceptance", "Acceptance",
        chart=charts.stacked_bar_chart(
            "Feedback per card kind", labels,
            {"accepted": [k.get("accepted", 0) for k in kinds], "overridden": [k.get("overridden", 0) for k in kinds]},
            xlabel="cards with feedback", colors=(charts.PALETTE[2], charts.PALETTE[3])) if kinds else None,
        header=("card", "issued", "with feedback", "accepted", "overridden", "acceptance"),
        rows=[(kind_label(k["kind"]), _num(k.get("issued")), _num(k.get("with_feedback")), _num(k.get("accepted")),
               _num(k.get("overridden")), _pct(k.get("acceptance_rate"))) for k in kinds]
        + [("All cards", _num(totals.get("issued")), _num(totals.get("with_feedback")), _num(totals.get("accepted")),
            _num(totals.get("overridden")), _pct(totals.get("acceptance_rate")))]))

    reason_counts: dict[str, float] = {}
    reason_rows = []
    for k in kinds:
        for r in k.get("override_reasons", []):
            label = override_reason_label(r, common)
            reason_counts[label] = reason_counts.get(label, 0) + r.get("count", 0)
            reason_rows.append((label, kind_label(k["kind"]), _num(r.get("count"))))
        comment_only = k.get("overridden_with_comment_only", 0)
        no_reason = k.get("overridden_without_coded_reason", 0) - comment_only
        for label, count in (("Comment only, no coded reason", comment_only), ("No reason given", no_reason)):
            if count:
                reason_counts[label] = reason_counts.get(label, 0) + count
                reason_rows.append((label, kind_label(k["kind"]), _num(count)))
    ranked = sorted(reason_counts.items(), key=lambda kv: -kv[1])
    sections.append(_section(
        "override-reasons", "Override reasons",
        chart=charts.bar_chart("Why clinicians dismissed the card", [r for r, _ in ranked], [c for _, c in ranked],
                               xlabel="cards overridden", color=charts.PALETTE[3]) if ranked else None,
        text="" if ranked else "No card was overridden in this period.",
        header=("reason", "card", "cards"), rows=reason_rows))

    withheld = {kind_label(k["kind"]): _withheld_counts(k) for k in kinds}
    names = sorted({name for counts_ in withheld.values() for name in counts_})
    if names:
        series_w = {_field_label(name): [withheld[lab].get(name, 0) for lab in labels] for name in names}
        sections.append(_section(
            "suppressions", "Suppressed and silent cards",
            chart=charts.stacked_bar_chart("Cards not shown, per card kind", labels, series_w, xlabel="cards"),
            caption="Evaluated and recorded, but not shown to the clinician.",
            header=("card", *series_w.keys()),
            rows=[(lab, *(_num(v[i]) for v in series_w.values())) for i, lab in enumerate(labels)]))
    elif kinds:
        sections.append(_section("suppressions", "Suppressed and silent cards",
                                 text="The report carries no suppressed or silent cards."))

    suppressions = report.get("suppressions")
    by_reason = suppressions.get("by_reason") if isinstance(suppressions, Mapping) else None
    if isinstance(by_reason, list) and by_reason:
        totals_by_label: dict[str, float] = {}
        rows = []
        for r in by_reason:
            if not isinstance(r, Mapping):
                continue
            label = (override_reason_label(r, common) if r.get("code") else
                     "Suggestion accepted" if r.get("outcome") == "accepted" else "Overridden without a coded reason")
            created = r.get("created", 0) if isinstance(r.get("created"), (int, float)) else 0
            totals_by_label[label] = totals_by_label.get(label, 0) + created
            rows.append((label, kind_label(str(r.get("kind", ""))), _num(created), _num(r.get("active"))))
        ranked_s = sorted(totals_by_label.items(), key=lambda kv: -kv[1])
        sections.append(_section(
            "suppressions-by-reason", "Suppressions, by the feedback that caused them",
            chart=charts.bar_chart("Suppressions created, by reason", [r for r, _ in ranked_s],
                                   [c for _, c in ranked_s], xlabel="suppressions", color=charts.PALETTE[4]),
            caption=f"{_num(suppressions.get('created'))} created in this period, {_num(suppressions.get('active'))} "
                    "still running.",
            header=("reason", "card", "created", "still running"), rows=rows))

    per_1000 = report.get("per_1000_patients") or report.get("firing_rate_per_1000")
    if isinstance(per_1000, Mapping) and per_1000:
        items = [(kind_label(k), v) for k, v in per_1000.items() if isinstance(v, (int, float))]
        sections.append(_section(
            "firing-rate", "Firing rate per 1,000 patients",
            chart=charts.bar_chart("Cards per 1,000 patients", [i[0] for i in items], [i[1] for i in items],
                                   xlabel="per 1,000 patients"),
            header=("card", "per 1,000"), rows=[(i[0], _num(i[1])) for i in items]))

    unknown = report.get("unknown_card_feedback", {})
    if unknown.get("entries"):
        sections.append(_section("unknown", "Feedback for cards this service never issued",
                                 text=f"{unknown['entries']} entries on {unknown.get('cards', 0)} cards."))
    scope = f"cards issued since {report['since']}" if report.get("since") else "all cards"
    headline = [("Cards issued", _num(totals.get("issued"))), ("With feedback", _num(totals.get("with_feedback"))),
                ("Acceptance", _pct(totals.get("acceptance_rate")))]
    return _PAGE.render(title="B12 neck-pain CDS: feedback report",
                        subtitle=f"{scope.capitalize()}; generated {report.get('generated_at', '')}.",
                        headline=headline, sections=sections)
