"""Cards: turn a `Decision` plus the `PatientFacts` into a CDS Hooks card.

All wording lives in `cards/*.json` (common.json + one file per card kind) so clinicians can
review it without reading code; this module only fills placeholders and orders the sections.

Speed: a card is assembled as the plain JSON the service answers (`RenderedCard.json`), not through
the pydantic models of `protocol` (their validation cost more than the rest of the card).  The
models stay the spec's judge: every part all cards of a kind share (source, links, override
reasons, the suggestion's fixed texts) is checked against `protocol.Card` once, when the builder
is made, so a broken card file fails the deployment; what varies per request (summary, detail,
indicator) is checked by `_check_card` with the model's own rules; and the tests validate cards of
every kind and decision against `protocol.Card` (`RenderedCard.model()`).

Safety of text: anything that came from the patient record (codings' display, `code.text`,
medication text) goes through `safe_text()`: HTML is stripped by nh3 and markdown control
characters are escaped, so a display like "[click](https://evil)" or "<img onerror=...>" is shown
as plain text and cannot become a link or markup.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import nh3
import orjson

from cds_service import protocol
from cds_service.config import Settings
from cds_service.facts import Evidence, LabResult, PatientFacts
from cds_service.fhir_validation import ValidationVerdicts, is_valid_r4b
from cds_service.knowledge import LOINC, Knowledge
from cds_service.lab_values import format_number, normalize_unit
from cds_service.rules import Decision, band_b12, cut_offs

log = logging.getLogger(__name__)

CARD_KINDS: tuple[str, ...] = ("low-b12", "mma-test", "b12-test")
MMA_LOINC = "13964-2"
ACTIVE_B12_VALUESET = "active-b12-lab"
ANALYTE_NAMES = {"b12": "B12", "active-b12": "Active B12", "mma": "MMA"}
MAX_SUMMARY = 139
MAX_RECORD_TEXT = 120
MAX_LIST_ITEMS = 5
REQUEST_INTENTS = frozenset({"proposal", "plan", "directive", "order", "original-order", "reflex-order",
                             "filler-order", "instance-order", "option"})
"""FHIR R4 ServiceRequest.intent codes (required binding; fhir.resources does not check it)."""

# Markdown control characters (CommonMark backslash-escapable punctuation that can start markup).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")
_URL_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{1,15}):(?=//)")
_WWW = re.compile(r"(?i)\bwww\.")
_CLEANER = nh3.Cleaner(tags=set())  # built once: nh3.clean() rebuilds its sanitizer per call


_SAFE_TEXT_CACHE: dict[str, str] = {}
_SAFE_TEXT_CACHE_LIMIT = 4096
"""Entries kept (then the memory starts over, like knowledge.py's caches).  Only the labels of
matched evidence reach safe_text, and they repeat from call to call (the same drugs, problems
and tests), while sanitising them is most of a card's text work.  Only text of at most
`_SAFE_TEXT_CACHED_LENGTH` characters is kept: about 3 MiB at most for Latin text, under 10 MiB
whatever the script."""
_SAFE_TEXT_CACHED_LENGTH = 256


def safe_text(value: Any, limit: int = MAX_RECORD_TEXT) -> str:
    """Record text made inert for markdown: one line, HTML removed, markup escaped, autolinks
    defanged ("https://x" -> "https\\[:\\]//x"), at most `limit` characters."""
    if type(value) is str and limit == MAX_RECORD_TEXT and len(value) <= _SAFE_TEXT_CACHED_LENGTH:
        text = _SAFE_TEXT_CACHE.get(value)
        if text is None:
            text = _sanitise(value, limit)
            if len(_SAFE_TEXT_CACHE) >= _SAFE_TEXT_CACHE_LIMIT:
                _SAFE_TEXT_CACHE.clear()
            _SAFE_TEXT_CACHE[value] = text
        return text
    return _sanitise(value, limit)


def _sanitise(value: Any, limit: int) -> str:
    """`safe_text` without the memory."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if "<" in text or "&" in text or ">" in text:
        text = _CLEANER.clean(text)  # strips tags, entity-escapes & < >
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _URL_SCHEME.sub(r"\1\\[:\\]", text)
    return _WWW.sub(r"www\\[.\\]", text)


@dataclass(frozen=True)
class CardTexts:
    """The card text files of `cards_dir`."""

    common: dict[str, Any]
    kinds: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, directory: str | Path) -> "CardTexts":
        folder = Path(directory)
        common = json.loads((folder / "common.json").read_text(encoding="utf-8"))
        kinds = {k: json.loads((folder / f"{k}.json").read_text(encoding="utf-8")) for k in CARD_KINDS}
        texts = cls(common, kinds)
        texts.check()
        return texts

    def check(self) -> None:
        """Fail at start-up, not mid-request, if a text file is incomplete."""
        from cds_service.record import PREFETCH_KEYS

        missing = [k for k in PREFETCH_KEYS if k not in self.common["unavailable_data"]]
        if missing:
            raise ValueError(f"cards/common.json unavailable_data lacks {missing}")
        for kind, spec in self.kinds.items():
            if spec.get("kind") != kind:
                raise ValueError(f"cards/{kind}.json: kind must be {kind!r}")
            for code in spec["override_reasons"]:
                if code not in self.common["override_reasons"]:
                    raise ValueError(f"cards/{kind}.json: unknown override reason {code!r}")


@dataclass(frozen=True, slots=True)
class RenderedCard:
    """One card as the service answers it: `json` is the CDS Hooks card object, in the member
    order of `protocol.Card`, with optional members left out.  Read-only: its source and the
    objects in its links and override reasons are shared with every card of the same builder."""

    json: dict[str, Any]
    suggestion_uuids: tuple[str, ...] = ()

    @property
    def uuid(self) -> str:
        return self.json["uuid"]

    @property
    def summary(self) -> str:
        return self.json["summary"]

    @property
    def detail(self) -> str:
        return self.json["detail"]

    @property
    def indicator(self) -> str:
        return self.json["indicator"]

    def to_json(self) -> dict[str, Any]:
        """The card's JSON (the object itself, not a copy: do not change it)."""
        return self.json

    def model(self) -> protocol.Card:
        """The card as the protocol model, which checks it against the spec (tests and tools:
        it costs more than building the card)."""
        return protocol.Card.model_validate(self.json)


@dataclass(frozen=True, slots=True)
class _SuggestionTexts:
    """What every suggestion of one test shares: the code ordered and the fixed texts."""

    loinc: str
    display: str
    code_text: str
    label: str
    action: str


_NO_SUGGESTION = object()
"""Memo of "this test cannot be suggested" (e.g. no verified active-B12 code)."""


class CardBuilder:
    """Builds the card for one decision (stateless apart from the loaded texts and memos of
    what depends only on them and the settings)."""

    def __init__(self, texts: CardTexts, knowledge: Knowledge, settings: Settings,
                 verdicts: ValidationVerdicts | None = None) -> None:
        self.texts = texts
        self.knowledge = knowledge
        self.settings = settings
        self.verdicts = verdicts
        # The parts every card of a kind shares are built through the card model once, at
        # start-up, and kept as JSON: a broken card file fails the deployment, not a request.
        common = texts.common
        source = protocol.Source(label=common["source"]["label"], url=common["source"]["url"],
                                 topic=protocol.Coding(**common["source"]["topic"]))
        self._source: dict[str, Any] = source.to_json()
        self._links: list[dict[str, Any]] = [protocol.Link(**link).to_json() for link in common["links"]]
        self._override_reasons: dict[str, list[dict[str, Any]]] = {
            kind: [protocol.OverrideReason(system=common["override_reason_system"], code=code,
                                           display=common["override_reasons"][code]).to_json()
                   for code in spec["override_reasons"]]
            for kind, spec in texts.kinds.items()}
        # With a neurological red flag "a mechanical cause explains the symptoms" is not offered:
        # a compressive cause does not rule out B12-related myelopathy (subacute combined
        # degeneration), and that dismissal would hide the card for its whole suppression period.
        self._override_reasons_red_flags = {
            kind: [r for r in reasons if r["code"] != "mechanical-cause"]
            for kind, reasons in self._override_reasons.items()}
        self._suggestion_texts: dict[str, Any] = {}
        self._advice: dict[str, str] = {}
        self._band_texts: dict[tuple[str, str], str] = {}
        self._sections: dict[tuple[str | None, str], str] = {}
        self._unavailable: dict[frozenset[str], str] = {}
        self._fixed_labels: dict[str, str] = {
            key: label for key, label in common["risk_factor_labels"].items()
            if type(label) is str and "{" not in label and "}" not in label}
        self._check_shared_parts()

    # -- public -------------------------------------------------------------------------------
    def build(self, decision: Decision, facts: PatientFacts, context: Any) -> RenderedCard | None:
        """The card for `decision` (None when the decision is "no card")."""
        if decision.kind is None:
            return None
        spec = self.texts.kinds[decision.kind]
        labels = self.risk_labels(facts)
        card_uuid, suggestion_uuid = uuid4_pair()
        suggestion = None
        if decision.kind in ("b12-test", "mma-test"):
            suggestion = self._suggestion(decision, spec, facts, context, suggestion_uuid)
        card = self._assemble(  # (summary, detail, indicator, suggestion, reasons, uuid)
            self._summary(decision, spec, facts, labels), self._detail(decision, spec, facts, labels),
            decision.indicator or "info", suggestion, self._offered_reasons(decision.kind, facts), card_uuid)
        return RenderedCard(card, (suggestion_uuid,) if suggestion else ())

    def _assemble(self, summary: str, detail: str, indicator: str, suggestion: dict[str, Any] | None,
                  reasons: list[dict[str, Any]], uuid: str) -> dict[str, Any]:
        """The card's JSON, members in `protocol.Card` order (what its model_dump gives).
        (Positional parameters: the hot path passes them by position, keywords cost more.)"""
        _check_card(summary, detail, indicator)
        card: dict[str, Any] = {"uuid": uuid, "summary": summary, "detail": detail,
                                "indicator": indicator, "source": self._source}
        if suggestion is not None:
            card["suggestions"] = [suggestion]
            card["selectionBehavior"] = "at-most-one"
        card["overrideReasons"] = list(reasons)
        card["links"] = list(self._links)
        return card

    def _offered_reasons(self, kind: str, facts: PatientFacts) -> list[dict[str, Any]]:
        """The override reasons of a card kind (without "mechanical-cause" after a neurological
        red flag, see __init__)."""
        if facts.neurological_red_flags:
            return self._override_reasons_red_flags[kind]
        return self._override_reasons[kind]

    def _check_shared_parts(self) -> None:
        """Every combination of shared parts, assembled as on the hot path, must validate as a
        `protocol.Card` and serialise to exactly the model's JSON (start-up, not per request)."""
        resource = {"resourceType": "ServiceRequest", "status": "draft", "intent": "order",
                    "code": {"text": "check"}, "subject": {"reference": "Patient/check"}}
        for kind, spec in self.texts.kinds.items():
            tests = [None]
            if kind == "mma-test":
                tests.append("mma")
            elif kind == "b12-test":
                tests += ["b12"] + (["active-b12"] if "suggestion_active" in spec else [])
            for test in tests:
                texts = self._texts_for(test, spec) if test else None
                suggestion = None
                if isinstance(texts, _SuggestionTexts):
                    suggestion = self._suggestion_json(texts, True, dict(resource), uuid4())
                for reasons in (self._override_reasons[kind], self._override_reasons_red_flags[kind]):
                    card = self._assemble(summary="check", detail="check", indicator="info",
                                          suggestion=suggestion, reasons=reasons, uuid=uuid4())
                    model = protocol.Card.model_validate(card)
                    if orjson.dumps(model.to_json()) != orjson.dumps(card):
                        raise ValueError(f"cards/{kind}.json: the card differs from the protocol model")

    # -- summary ------------------------------------------------------------------------------
    def risk_labels(self, facts: PatientFacts) -> list[str]:
        labels = self.texts.common["risk_factor_labels"]
        fixed = self._fixed_labels
        out = []
        for r in facts.risk_factors:
            label = fixed.get(r.key)  # a label without a placeholder is itself (no format call)
            out.append(label if label is not None else labels[r.key].format(age=facts.age_years))
        return out

    def _summary(self, decision: Decision, spec: dict[str, Any], facts: PatientFacts,
                 labels: list[str]) -> str:
        r = decision.b12_result
        if decision.kind == "low-b12":
            variant = "red_flags" if facts.red_flags and "red_flags" in spec["summary"] else "result"
            if r.analyte == "active-b12":
                variant += "_active"
            return spec["summary"][variant].format(value=self.reported(r), date=_day(r.on))[:MAX_SUMMARY]
        summaries = spec["summary"]
        if decision.suggest == "active-b12":  # pregnancy: active B12 is the test (NICE NG239)
            summaries = spec["summary_pregnancy"]
            if decision.reason in ("low-total-b12-in-pregnancy", "indeterminate-total-b12-in-pregnancy") and r:
                key = "low_total" if decision.reason == "low-total-b12-in-pregnancy" else "indeterminate_total"
                if facts.red_flags:
                    key += "_red_flags"
                return summaries[key].format(value=self.reported(r), date=_day(r.on))[:MAX_SUMMARY]
        # Red flags lead the summary too: it is the line a busy clinician reads.  Without a listed
        # symptom (decision not recommended) the summary asks about symptoms instead of advising.
        if facts.red_flags:
            variant = "red_flags"
        elif facts.suspected_deficiency:
            variant = "suspected"
        else:
            variant = "neuropathic" if decision.recommended else "chronic"
        template = summaries[variant]
        # Name as many top risk factors as fit; the rest become "+N more".
        # The result behind an MMA card is named with its value as reported ("indeterminate B12
        # 245 pg/mL"); "active B12" is said in full so a pmol/L value is never read as total B12.
        # (The value is written out only when the template names it: most do not.)
        fields = {"value": self.reported(r) if r and "{value" in template else "", "date": _day(r.on) if r else "",
                  "test": "active B12" if r and r.analyte == "active-b12" else "B12"}
        for n in range(len(labels), 0, -1):
            shown = ", ".join(labels[:n]) + (f", +{len(labels) - n} more" if n < len(labels) else "")
            text = template.format(risks=shown, **fields)
            if len(text) <= MAX_SUMMARY:
                return text
        return template.format(risks=f"{len(labels)}", **fields)[:MAX_SUMMARY]

    # -- detail -------------------------------------------------------------------------------
    def _detail(self, decision: Decision, spec: dict[str, Any], facts: PatientFacts,
                labels: list[str]) -> str:
        c = self.texts.common
        h = c["headings"]
        parts: list[str] = []
        if facts.red_flags:  # red flags first: urgent assessment takes priority
            # With a low B12 already known, B12 is not "checked alongside": the advice is to treat.
            low = decision.kind == "low-b12"
            heading = h["red_flags_low"] if low else h["red_flags"]
            advice = c["red_flags_advice_low"] if low else c["red_flags_advice"]
            parts.append(f"**{heading}**\n\n{_bullets(facts.red_flags)}\n\n{advice}\n\n"
                         f"{self._pain_timing(facts)} {self._compressive(facts)}")
        if facts.pregnancy:  # it changes how every B12 result below is read (NICE NG239)
            parts.append(f"**{h['pregnancy']}**\n\n{_bullets(facts.pregnancy)}\n\n{c['pregnancy_advice']}")
        if facts.suspected_deficiency:
            parts.append(f"**{h['suspected']}**\n\n{_bullets(facts.suspected_deficiency)}\n\n{c['suspected_note']}")
        # "Mechanical causes first" holds unless a red flag is documented: then the red flag comes first.
        after = "_after_red_flags" if facts.red_flags else ""
        mechanical_heading = h["mechanical" + after]
        if facts.mechanical:
            parts.append(f"**{mechanical_heading}**\n\n{c['mechanical_documented' + after]}\n\n"
                         f"{_bullets(facts.mechanical)}")
        else:
            parts.append(self._fixed_section("mechanical" + after, "mechanical_reminder" + after))
        if facts.risk_factors:
            lines = []
            notes = c.get("risk_factor_notes", {})
            for label, risk in zip(labels, facts.risk_factors):
                evidence = risk.evidence
                ev = (_evidence(evidence[0]) if len(evidence) == 1
                      else "; ".join([_evidence(e) for e in evidence[:MAX_LIST_ITEMS]]))
                note = f" ({notes[risk.note]})" if risk.note in notes else ""
                lines.append(f"- {safe_text(label)}: {ev}{note}")
            parts.append(f"**{h['risk_factors']}**\n\n" + "\n".join(lines))
        if facts.neuropathic:
            neuro = _bullets(facts.neuropathic)
            if facts.compressive:
                neuro += f"\n\n{c['neuropathic_explained']}"
            parts.append(f"**{h['neuropathic']}**\n\n{neuro}")
        elif facts.neurological_red_flags:
            # A myelopathy, cord-compression sign or gait disturbance is itself a neurological sign
            # B12 deficiency can cause (NICE NG239; subacute combined degeneration): "none
            # documented" under it would contradict the red-flag section and falsely reassure.
            parts.append(self._fixed_section("neuropathic", "neuropathic_see_red_flags"))
        else:
            parts.append(self._fixed_section("neuropathic", "neuropathic_none"))
        parts.append(f"**{h['results']}**\n\n{self._results(facts)}")
        advice = spec["advice"]
        if decision.reason in ("low-total-b12-in-pregnancy", "indeterminate-total-b12-in-pregnancy"):
            advice = spec["advice_pregnancy_result"]
        elif decision.suggest == "active-b12":
            advice = spec["advice_pregnancy"]
        elif decision.kind == "low-b12" and decision.b12_result and decision.b12_result.analyte == "active-b12":
            advice = spec["advice_active"]
        if isinstance(advice, dict):  # wording that depends on whether a NICE-listed symptom is documented
            if facts.suspected_deficiency and "suspected" in advice:
                advice = advice["suspected"]
            else:
                advice = advice["with_neuropathic" if decision.recommended else "without_neuropathic"]
        parts.append(self._filled_advice(advice))
        if facts.unavailable:
            parts.append(self._unavailable_section(facts.unavailable))
        parts.append(self._fixed_section(None, "evidence_note"))
        return "\n\n".join(parts)

    def _fixed_section(self, heading: str | None, text: str) -> str:
        """A detail section made only of card-file texts: `**heading**` and the common text
        `text`, or (no heading) that text in italics.  Memoised: it depends only on the files."""
        key = (heading, text)
        section = self._sections.get(key)
        if section is None:
            c = self.texts.common
            section = f"**{c['headings'][heading]}**\n\n{c[text]}" if heading else f"_{c[text]}_"
            self._sections[key] = section
        return section

    def _unavailable_section(self, unavailable: frozenset[str]) -> str:
        """What could not be checked (memoised per frozen set of prefetch keys: a handful)."""
        memo = type(unavailable) is frozenset
        section = self._unavailable.get(unavailable) if memo else None
        if section is None:
            c = self.texts.common
            wording = c["unavailable_data"]
            missing = [wording.get(k, safe_text(k)) for k in sorted(unavailable)]
            section = f"**{c['headings']['unavailable']}**\n\n{c['unavailable_intro']} " + ", ".join(missing) + "."
            if memo:
                if len(self._unavailable) >= 256:  # bounded whatever the keys
                    self._unavailable.clear()
                self._unavailable[unavailable] = section
        return section

    def _filled_advice(self, template: str) -> str:
        """An advice text with the settings' cut-offs filled in (memoised: it depends only on
        the card file and the settings)."""
        text = self._advice.get(template)
        if text is None:
            s = self.settings
            text = template.format(low=_num(s.b12_low_below_ng_l), high=_num(s.b12_normal_above_ng_l),
                                   active_low=_num(s.active_b12_low_below_pmol_l),
                                   active_high=_num(s.active_b12_normal_above_pmol_l),
                                   recent_days=s.recent_test_days)
            self._advice[template] = text
        return text

    def _pain_timing(self, facts: PatientFacts) -> str:
        """Acute or chronic, as the rules saw it (shown with red flags, which apply either way)."""
        t = self.texts.common["pain_timing"]
        onset = facts.neck_pain_onset
        if facts.chronic:
            return t["chronic"].format(onset=_day(onset)) if onset else t["chronic_coded"]
        return t["acute"].format(onset=_day(onset)) if onset else t["unknown"]

    def _compressive(self, facts: PatientFacts) -> str:
        c = self.texts.common
        if not facts.compressive:
            return c["compressive_none"]
        names = list(dict.fromkeys(safe_text(e.label) for e in facts.compressive))
        shown = "; ".join(names[:MAX_LIST_ITEMS]) + (f"; and {len(names) - MAX_LIST_ITEMS} more"
                                                      if len(names) > MAX_LIST_ITEMS else "")
        return c["compressive_documented"].format(causes=shown)

    def _results(self, facts: PatientFacts) -> str:
        lines = [f"- {self._result_line(group[0], facts)}"
                 for group in (facts.b12_results, facts.active_b12_results, facts.mma_results) if group]
        lines += [f"- {self._result_line(r, facts)}" for r in facts.pending_results[:MAX_LIST_ITEMS]]
        return "\n".join(lines) if lines else self.texts.common["no_results"]

    def reported(self, r: LabResult) -> str:
        """The value as the laboratory reported it: comparator, number as written, its unit; then
        the equivalent in the unit the rules use, in brackets, when that unit differs
        ("<100 pmol/L (<136 ng/L)", "245 pg/mL", "0.36 umol/L (360 nmol/L)")."""
        if r.value is None:
            return self.texts.common["value_not_readable"]
        comparator = r.comparator if r.comparator in ("<", "<=", ">", ">=") else ""
        number = r.value_text if r.value_text and _NUMBER.match(r.value_text) else _num(r.value)
        text = f"{comparator}{number}"
        unit = _unit_text(r.unit) if r.unit else ""
        if unit:
            text += f" {unit}"
        equivalent = r.canonical if r.canonical is not None else (r.value_ng_l if r.analyte == "b12" else None)
        canonical_unit = r.canonical_unit or ("ng/L" if r.analyte == "b12" else None)
        if (equivalent is not None and canonical_unit and unit
                and not _same_number(normalize_unit(r.unit), normalize_unit(canonical_unit), r.value, equivalent)):
            text += f" ({comparator}{format_number(Decimal(str(equivalent)))} {canonical_unit})"
        return text

    def _result_line(self, r: LabResult, facts: PatientFacts) -> str:
        c = self.texts.common
        name = ANALYTE_NAMES.get(r.analyte, r.analyte)
        head = f"{name} {self.reported(r)} on {_day(r.on)}"
        if r.pending:
            return f"{head}: {c['pending_result']}"
        if r.implausible:
            return f"{head}: {c['implausible_result']}"
        if r.analyte == "mma":
            return head
        s = self.settings
        band = band_b12(r, s)
        key = band or "unbanded"
        if band == "indeterminate" and r.comparator in ("<", "<="):
            key = "low_or_indeterminate"
        if key == "low_or_indeterminate":
            v = r.canonical if r.canonical is not None else r.value_ng_l
            bound = f"{format_number(Decimal(str(v)))} {r.canonical_unit or 'ng/L'}"
            banded = self._band_text(r, key, bound)
        else:  # the card file and the analyte's cut-offs (rules.cut_offs) decide it: filled once
            banded = self._band_texts.get((r.analyte, key))
            if banded is None:
                banded = self._band_texts[(r.analyte, key)] = self._band_text(r, key, "")
        text = f"{head}: {banded}"
        if facts.pregnancy and r.analyte == "b12":
            text += f"; {c['pregnancy_total_note']}"
        return text

    def _band_text(self, r: LabResult, key: str, bound: str) -> str:
        """The band label `key` ("low", "normal"...) with the cut-offs of `r`'s analyte filled in."""
        labels = self.texts.common["band_labels_active" if r.analyte == "active-b12" else "band_labels"]
        low, high = cut_offs(r, self.settings)
        return labels[key].format(low=_num(low), high=_num(high), bound=bound)

    # -- suggestion ---------------------------------------------------------------------------
    def _suggestion(self, decision: Decision, spec: dict[str, Any], facts: PatientFacts,
                    context: Any, uuid: str) -> dict[str, Any] | None:
        if decision.kind == "mma-test":
            test = "mma"
        elif decision.suggest == "active-b12":  # pregnancy: active B12 is the test (NICE NG239)
            test = "active-b12"
        else:
            test = "b12"
        texts = self._texts_for(test, spec)
        if not isinstance(texts, _SuggestionTexts):
            return None
        resource = _service_request(texts.loinc, texts.display, texts.code_text, facts, context,
                                    self.settings.order_intent, self.verdicts)
        if resource is None:
            return None
        return self._suggestion_json(texts, decision.recommended, resource, uuid)

    def _texts_for(self, test: str, spec: dict[str, Any]) -> _SuggestionTexts | object:
        """The fixed parts of the suggestion of `test` ("b12", "active-b12", "mma") on a card of
        `spec`'s kind, or _NO_SUGGESTION (memoised: they depend only on the files and settings)."""
        key = f"{spec['kind']}/{test}"
        found = self._suggestion_texts.get(key)
        if found is not None:
            return found
        texts = spec["suggestion"]
        if test == "mma":
            loinc, vs = MMA_LOINC, "mma-lab"
        elif test == "active-b12":
            # The verified holotranscobalamin code (valuesets/active-b12-lab.json).
            codes = self.knowledge.valueset_codes(ACTIVE_B12_VALUESET)
            if not codes:
                self._suggestion_texts[key] = _NO_SUGGESTION
                return _NO_SUGGESTION
            loinc, vs, texts = codes[0][1], ACTIVE_B12_VALUESET, spec["suggestion_active"]
        else:
            loinc, vs = self.settings.b12_order_loinc, "b12-lab"
        display = self.knowledge.display(vs, LOINC, loinc) or texts["code_text"]
        found = _SuggestionTexts(loinc=loinc, display=display, code_text=texts["code_text"], label=texts["label"],
                                 action=texts["action"])
        self._suggestion_texts[key] = found
        return found

    @staticmethod
    def _suggestion_json(texts: _SuggestionTexts, recommended: bool | None,
                         resource: dict[str, Any], uuid: str) -> dict[str, Any]:
        """A suggestion's JSON, members in `protocol.Suggestion` order, with its fresh `uuid`."""
        suggestion: dict[str, Any] = {"label": texts.label, "uuid": uuid}
        if recommended is not None:
            suggestion["isRecommended"] = recommended
        suggestion["actions"] = [{"type": "create", "description": texts.action, "resource": resource}]
        return suggestion


def build_service_request(*, loinc: str, display: str, text: str, facts: PatientFacts, context: Any,
                          intent: str, verdicts: ValidationVerdicts | None = None) -> dict[str, Any] | None:
    """A draft ServiceRequest for a lab test, validated with fhir.resources R4B (None if invalid,
    e.g. a misconfigured intent: the card is then shown without a suggestion)."""
    return _service_request(loinc, display, text, facts, context, intent, verdicts)


def _service_request(loinc: str, display: str, text: str, facts: PatientFacts, context: Any, intent: str,
                     verdicts: ValidationVerdicts | None) -> dict[str, Any] | None:
    """`build_service_request` with positional parameters (the card builder's call)."""
    if intent not in REQUEST_INTENTS:
        log.warning("invalid ServiceRequest intent", extra={"event": "invalid_suggestion"})
        return None
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": intent,
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": text},
        "subject": {"reference": f"Patient/{facts.patient_id}"},
    }
    encounter_id = getattr(context, "encounter_id", None)
    if encounter_id:
        resource["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    user_id = getattr(context, "user_id", "") or ""
    user_type, _, user_rest = user_id.partition("/")
    if user_type in ("Practitioner", "PractitionerRole") and user_rest:
        resource["requester"] = {"reference": user_id}
    neck_pain = facts.neck_pain
    if len(neck_pain) == 1:  # the common case: one neck-pain entry, no duplicates to drop
        only = neck_pain[0].reference
        refs = [only] if only else []
    else:
        refs = [ref for ref in dict.fromkeys(e.reference for e in neck_pain) if ref]
    if refs:
        resource["reasonReference"] = [{"reference": ref} for ref in refs]
    else:
        resource["reasonCode"] = [{"text": "Neck pain"}]
    if not is_valid_r4b(resource, "ServiceRequest", verdicts):
        log.warning("invalid ServiceRequest suggestion", extra={"event": "invalid_suggestion"})
        return None
    return resource


# --- formatting helpers -----------------------------------------------------------------------

_random_bytes = ssl.RAND_bytes
"""Cryptographically strong random bytes from OpenSSL's DRBG (seeded from the kernel, reseeded
after a fork): the same strength as `os.urandom` without a system call per card, which on a
virtual machine with costly system calls (each one a page-table switch) was ~20 µs of a call."""


def uuid4() -> str:
    """`str(uuid.uuid4())` in a third of the time: 16 cryptographically strong random bytes,
    version 4 and the RFC 4122 variant set the same way, the same text."""
    b = bytearray(_random_bytes(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_VARIANT_DIGIT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
"""The first hex digit of byte 8 with the RFC 4122 variant set (top two bits 10, the other two kept)."""


def uuid4_pair() -> tuple[str, str]:
    """Two `uuid4()`s (a card's and its suggestion's) from one read of 32 random bytes: each is
    16 of the bytes with the version digit written as
    "4" and the variant set as `uuid4` sets them, so 122 random bits each, as `uuid.uuid4()`."""
    h = _random_bytes(32).hex()
    v = _VARIANT_DIGIT
    return (f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{v[h[16]]}{h[17:20]}-{h[20:32]}",
            f"{h[32:40]}-{h[40:44]}-4{h[45:48]}-{v[h[48]]}{h[49:52]}-{h[52:]}")


INDICATORS = frozenset({"info", "warning", "critical"})


def _check_card(summary: str, detail: str, indicator: str) -> None:
    """The rules of `protocol.Card` for the members that vary per request (the shared ones are
    checked against the model at start-up): no blank text, a summary of at most 139 characters,
    a known indicator.  A card that breaks them is an error, never an answer."""
    # (`not text or text.isspace()` is `not text.strip()` without copying the text)
    if (not summary or summary.isspace() or len(summary) > MAX_SUMMARY or not detail or detail.isspace()
            or indicator not in INDICATORS):
        raise ValueError(f"card breaks the CDS Hooks card rules (summary {len(summary)} characters, "
                         f"indicator {indicator!r})")


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


_NUMBER = re.compile(r"^[+-]?[0-9]*[.,]?[0-9]+$")
_UNIT_UNSAFE = re.compile(r"[^A-Za-z0-9/%. µμ]")


def _unit_text(unit: str) -> str:
    """A unit from the record made safe for both plain-text summaries and markdown details: only
    letters, digits, "/", "%", ".", spaces and micro signs are kept (every unit of these analytes
    fits), at most 20 characters.  Memoised for short units (a result's unit is shown twice per
    card, and laboratories use a handful)."""
    text = _UNIT_TEXTS.get(unit)
    if text is None:
        text = " ".join(_UNIT_UNSAFE.sub("", unit).split())[:20]
        if len(unit) <= 32:
            if len(_UNIT_TEXTS) >= 1024:
                _UNIT_TEXTS.clear()
            _UNIT_TEXTS[unit] = text
    return text


_UNIT_TEXTS: dict[str, str] = {}


def _same_number(unit: str, canonical: str, value: float, equivalent: float) -> bool:
    """Whether the reported unit shows the same number as the canonical one (pg/mL = ng/L)."""
    return unit == canonical or abs(value - equivalent) < 1e-9


def _day(on: date | None) -> str:
    return on.isoformat() if on else "unknown date"


def _evidence(e: Evidence) -> str:
    on = e.on
    return f"{safe_text(e.label)} ({on.isoformat()})" if on else safe_text(e.label)


def _bullets(items: tuple[Evidence, ...]) -> str:
    seen: dict[str, None] = {}
    for e in items:
        seen.setdefault(_evidence(e))
    lines = [f"- {x}" for x in list(seen)[:MAX_LIST_ITEMS]]
    if len(seen) > MAX_LIST_ITEMS:
        lines.append(f"- and {len(seen) - MAX_LIST_ITEMS} more")
    return "\n".join(lines)
