"""Alert policy: after the rules have chosen a card and before it is built, decide from the store
and the settings whether it is shown.

Rules stay pure functions of facts (rules.py); what a clinician said about an earlier card, and
what was already shown in this encounter, is decided here:

1. **Suppression after feedback.**  A card kind a clinician overrode (or whose suggestion they
   accepted) is not shown again for that patient for the days set in `cards/suppression.json`
   (per override reason; a local policy choice, see docs/rules.md).
2. **Encounter lockout.**  order-select / order-sign do not repeat a card kind already shown in
   the same encounter within `CDS_ENCOUNTER_LOCKOUT_HOURS`.
3. **Silent mode.**  A service or card kind listed in `CDS_SILENT_SERVICES` /
   `CDS_SILENT_CARD_KINDS` is evaluated and recorded as usual but returns no card (a pilot).

A changed situation breaks 1 and 2: a new B12 result, new red-flag evidence, or a warning where
the card was info.  To compare without keeping record data, each card is recorded with a
`Situation`: keyed hashes (store.keyed_digest) of the newest B12 result and of each red-flag
record, and the card's indicator.  The cost on the hook path is one indexed read
(`Store.policy_records`), made only when the rules chose a card (with SQLite, the suppression
part is remembered per process until any process changes a suppression).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson

from cds_service.config import Settings
from cds_service.facts import PatientFacts
from cds_service.frozen import fast_init
from cds_service.rules import Decision
from cds_service.store import PolicyRecords, Store

Delivery = Literal["shown", "silent", "suppressed", "locked-out"]
ORDER_HOOKS = frozenset({"order-select", "order-sign"})
SUPPRESSION_FILE = "suppression.json"

# What changed since the feedback or the earlier card (the reason a suppression was broken).
NEW_B12_RESULT = "new-b12-result"
NEW_RED_FLAGS = "new-red-flags"
MORE_SERIOUS = "more-serious"


@fast_init
@dataclass(frozen=True)
class Situation:
    """What a card was based on, as keyed hashes: enough to tell that it changed, nothing more."""

    indicator: str | None
    b12: str | None
    """Fingerprint of the newest B12 result (id, date, value, unit), None without one."""
    red_flags: frozenset[str] = frozenset()
    """Fingerprints of the red-flag records."""

    def to_json(self) -> str:
        """Compact JSON (orjson: the same text as `json.dumps` with compact separators for
        these ASCII values, a tenth of the time; written on every hook call with a card)."""
        return orjson.dumps({"indicator": self.indicator, "b12": self.b12,
                             "red_flags": sorted(self.red_flags)}).decode()

    @classmethod
    def from_json(cls, text: str | None) -> "Situation | None":
        if not text:
            return None
        raw = json.loads(text)
        return cls(raw.get("indicator"), raw.get("b12"), frozenset(raw.get("red_flags") or ()))

    def changed_since(self, earlier: "Situation | None") -> str | None:
        """What is new compared with `earlier` (None: nothing that matters).

        An earlier card recorded without a situation is taken as unchanged."""
        if earlier is None:
            return None
        if self.red_flags - earlier.red_flags:
            return NEW_RED_FLAGS
        if self.b12 != earlier.b12:
            return NEW_B12_RESULT
        if self.indicator == "warning" and earlier.indicator != "warning":
            return MORE_SERIOUS
        return None


@dataclass(frozen=True)
class Cause:
    """What withheld a card: a clinician's feedback (suppression), an earlier card in the same
    encounter (lockout), or a silent-mode setting."""

    source: Literal["feedback", "encounter", "setting"]
    outcome: str | None = None
    """Feedback outcome: accepted or overridden."""
    reason_system: str | None = None
    reason_code: str | None = None
    reason_display: str | None = None
    since: str | None = None
    """When the feedback was given / the earlier card shown (store timestamp text)."""
    until: str | None = None
    service: str | None = None
    """The service whose card got the feedback / was shown."""
    setting: str | None = None

    def withheld_by(self) -> dict[str, Any]:
        """What the store records with the withheld card (grouped in the report: no dates)."""
        if self.source == "feedback":
            return {"outcome": self.outcome, "system": self.reason_system,
                    "code": self.reason_code, "display": self.reason_display}
        if self.source == "encounter":
            return {"service": self.service}
        return {"setting": self.setting}

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@fast_init
@dataclass(frozen=True)
class PolicyOutcome:
    """The policy's verdict on the card the rules chose."""

    delivery: Delivery
    situation: Situation
    cause: Cause | None = None
    broken: tuple[str, ...] = ()
    """Suppressions or lockouts that did not apply because the situation changed, as
    "suppression:new-b12-result" / "lockout:new-red-flags"."""

    @property
    def shown(self) -> bool:
        return self.delivery == "shown"

    @property
    def reason(self) -> str | None:
        """The no-card reason when withheld ("suppressed", "locked-out", "silent"), else None."""
        return None if self.shown else self.delivery

    def log_detail(self) -> str | None:
        """One line for the hook log: the cause's reason code and date, never patient data."""
        if self.cause is None:
            return ";".join(self.broken) or None
        c = self.cause
        if c.source == "feedback":
            text = f"{c.outcome}:{c.reason_code or '-'}@{(c.since or '')[:10]} until {(c.until or '')[:10]}"
        elif c.source == "encounter":
            text = f"shown by {c.service}@{c.since}"
        else:
            text = f"{c.setting}"
        return ";".join((text, *self.broken))

    def explain(self) -> dict[str, Any]:
        """JSON for `b12-cds evaluate`."""
        out: dict[str, Any] = {"delivery": self.delivery}
        if self.cause is not None:
            out["cause"] = self.cause.to_json()
        if self.broken:
            out["broken"] = list(self.broken)
        return out


@dataclass(frozen=True)
class SuppressionPeriods:
    """Days a card kind stays suppressed after feedback, from `cards/suppression.json`."""

    override_system: str
    overridden: Mapping[str, int]
    overridden_other: int
    accepted: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, cards_dir: str | Path, override_system: str,
             known_reasons: frozenset[str], card_kinds: frozenset[str]) -> "SuppressionPeriods":
        """Read and check the file (unknown reason or kind, negative days: fail at start-up)."""
        path = Path(cards_dir) / SUPPRESSION_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing: the suppression periods after feedback (copy the "
                             "shipped cards/suppression.json and adjust it)")
        raw = json.loads(path.read_text(encoding="utf-8"))
        overridden = {str(k): _days(v, path, k) for k, v in raw["overridden"].items()}
        accepted = {str(k): _days(v, path, k) for k, v in raw.get("accepted", {}).items()}
        unknown = sorted(set(overridden) - known_reasons)
        if unknown:
            raise ValueError(f"{path}: unknown override reasons {unknown}")
        missing = sorted(known_reasons - set(overridden))
        if missing:
            raise ValueError(f"{path}: no period for override reasons {missing}")
        if set(accepted) - card_kinds:
            raise ValueError(f"{path}: unknown card kinds {sorted(set(accepted) - card_kinds)}")
        return cls(override_system, overridden, _days(raw["overridden_other"], path, "overridden_other"),
                   accepted)

    def days(self, kind: str, outcome: str, system: str | None, code: str | None) -> int:
        """The suppression period for one feedback entry (0: none)."""
        if outcome == "accepted":
            return self.accepted.get(kind, 0)
        if system == self.override_system and code in self.overridden:
            return self.overridden[code]
        return self.overridden_other


def _days(value: Any, path: Path, key: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{path}: {key} must be a whole number of days >= 0")
    return value


class AlertPolicy:
    """Suppression, encounter lockout and silent mode (one per app; reads the store)."""

    def __init__(self, settings: Settings, store: Store, periods: SuppressionPeriods) -> None:
        self.settings = settings
        self.store = store
        self.periods = periods
        self.silent_services = settings.silent_service_set
        self.silent_kinds = settings.silent_card_kind_set
        self.lockout = timedelta(hours=settings.encounter_lockout_hours)
        self._lockout_on = self.lockout > timedelta(0)

    def situation(self, decision: Decision, facts: PatientFacts) -> Situation:
        """Keyed-hash fingerprints of what the card is based on (see `Situation`)."""
        digest = self.store.keyed_digest
        b12 = None
        if facts.b12_results:
            r = facts.b12_results[0]
            b12 = digest(f"b12\x00{r.resource_id}\x00{r.on}\x00{r.value}\x00{r.unit}")
        flags = frozenset(digest(f"flag\x00{e.reference or e.label}\x00{e.valueset}\x00{e.on}")
                          for e in facts.red_flags) if facts.red_flags else frozenset()
        return Situation(decision.indicator, b12, flags)

    def decide(self, decision: Decision, facts: PatientFacts, service_id: str, hook: str,
               patient_id: str, encounter_id: str | None, now: datetime) -> PolicyOutcome | None:
        """The delivery of the card `decision` chose (None when it chose none)."""
        if decision.kind is None:
            return None
        situation = self.situation(decision, facts)
        lockout = hook in ORDER_HOOKS and bool(encounter_id) and self._lockout_on
        records: PolicyRecords = self.store.policy_records(
            patient_id, decision.kind, now, encounter_id if lockout else None,
            now - self.lockout if lockout else None)
        broken: list[str] = []
        sup = records.suppression
        if sup is not None:
            change = situation.changed_since(Situation.from_json(sup.situation))
            if change is None:
                return PolicyOutcome("suppressed", situation, Cause(
                    "feedback", sup.outcome, sup.reason_system, sup.reason_code, sup.reason_display,
                    sup.feedback_at, sup.until, sup.service_id))
            broken.append(f"suppression:{change}")
        lock = records.lockout
        if lock is not None:
            change = situation.changed_since(Situation.from_json(lock.situation))
            if change is None:
                return PolicyOutcome("locked-out", situation, Cause(
                    "encounter", since=lock.issued_at, service=lock.service_id), tuple(broken))
            broken.append(f"lockout:{change}")
        if service_id in self.silent_services:
            return PolicyOutcome("silent", situation, Cause("setting", setting="CDS_SILENT_SERVICES"),
                                 tuple(broken))
        if decision.kind in self.silent_kinds:
            return PolicyOutcome("silent", situation, Cause("setting", setting="CDS_SILENT_CARD_KINDS"),
                                 tuple(broken))
        return PolicyOutcome("shown", situation, None, tuple(broken))


def build_policy(settings: Settings, store: Store, override_system: str,
                 override_reasons: frozenset[str], card_kinds: frozenset[str],
                 service_ids: frozenset[str]) -> AlertPolicy:
    """The app's policy; unknown ids in the silent-mode settings fail at start-up (a typo must
    not leave a pilot rule live)."""
    unknown_services = sorted(settings.silent_service_set - service_ids)
    if unknown_services:
        raise ValueError(f"CDS_SILENT_SERVICES names unknown services {unknown_services}")
    unknown_kinds = sorted(settings.silent_card_kind_set - card_kinds)
    if unknown_kinds:
        raise ValueError(f"CDS_SILENT_CARD_KINDS names unknown card kinds {unknown_kinds}")
    if settings.encounter_lockout_hours < 0:
        raise ValueError("CDS_ENCOUNTER_LOCKOUT_HOURS must be >= 0")
    periods = SuppressionPeriods.load(settings.cards_dir, override_system, override_reasons, card_kinds)
    return AlertPolicy(settings, store, periods)
