"""The clinical engine: value sets + card texts loaded once, then facts -> decision -> cards.

Contract used by the HTTP layer:
    engine = ClinicalEngine.load(settings)
    engine.knowledge, engine.valueset_codes(name)
    evaluation = engine.evaluate(record, hook_request, now=None, policy=None)

`policy` (the HTTP layer passes cds_service.policy.AlertPolicy.decide, bound to the request) runs
after the rules and before the card is built: it may withhold the card (suppressed after
feedback, locked out in this encounter, silent mode).  Without it (the population audit, unit
tests) the engine answers what the rules alone decide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from cds_service import protocol
from cds_service.cards import REQUEST_INTENTS, CardBuilder, CardTexts, RenderedCard
from cds_service.config import Settings
from cds_service.facts import PatientFacts, derive_facts, head_gate, resource_needed
from cds_service.fhir_validation import ValidationVerdicts
from cds_service.frozen import fast_init
from cds_service.knowledge import LOINC, Knowledge
from cds_service.record import PatientRecord
from cds_service.rules import Decision, decide
from cds_service.wire import Head

if TYPE_CHECKING:  # the policy reads the store; the engine only calls what it is given
    from cds_service.policy import PolicyOutcome

PolicyStep = Callable[[Decision, PatientFacts, datetime], "PolicyOutcome | None"]
"""(decision, facts, now) -> the policy's verdict on the chosen card (None: no card chosen)."""


@fast_init
@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    cards: list[RenderedCard]
    """The cards to answer (`cards_response`); `RenderedCard.model()` gives the protocol model."""
    card_kinds: dict[str, str]
    """Card uuid -> card kind ("low-b12", "mma-test", "b12-test")."""
    skipped_resources: int
    facts: PatientFacts | None = None
    """The facts behind the decision (for logs/debugging; never sent to the client)."""
    policy: PolicyOutcome | None = None
    """The alert policy's verdict on the card the rules chose (None: no policy, or no card)."""

    @property
    def reason(self) -> str:
        """Why there is (or is not) a card: the policy's no-card reason ("suppressed",
        "locked-out", "silent") when it withheld the card, else the rules' reason code."""
        if self.policy is not None and not self.policy.shown:
            return self.policy.delivery
        return self.decision.reason


class ClinicalEngine:
    """Loaded once per process; `evaluate` is pure apart from reading the clock when `now` is None."""

    def __init__(self, settings: Settings, knowledge: Knowledge, texts: CardTexts) -> None:
        self.settings = settings
        self.knowledge = knowledge
        self.texts = texts
        self.verdicts = ValidationVerdicts(settings.validation_cache_size)
        self._cards = CardBuilder(texts, knowledge, settings, self.verdicts)

    @classmethod
    def load(cls, settings: Settings) -> "ClinicalEngine":
        """Load `valuesets_dir` and `cards_dir`; raises on broken files or settings so a bad
        deployment fails at start-up."""
        knowledge = Knowledge.load(settings.valuesets_dir)
        if (LOINC, settings.b12_order_loinc) not in knowledge.valueset_codes("b12-lab"):
            raise ValueError(f"b12_order_loinc {settings.b12_order_loinc!r} is not in the b12-lab value set")
        if settings.order_intent not in REQUEST_INTENTS:
            raise ValueError(f"order_intent {settings.order_intent!r} is not a ServiceRequest intent")
        return cls(settings, knowledge, CardTexts.load(settings.cards_dir))

    def valueset_codes(self, name: str) -> list[tuple[str, str]]:
        """Exact (system, code) pairs of value set `name` (see Knowledge.valueset_codes)."""
        return self.knowledge.valueset_codes(name)

    @cached_property
    def resource_needed(self) -> Callable[[Mapping[str, Any]], bool]:
        """resource -> whether the rules can use it (judged from its head: `facts.HEAD_FIELDS`);
        the gatherer drops, and never decodes, the resources for which this is False."""
        return partial(resource_needed, self.knowledge)

    @cached_property
    def head_needed(self) -> Callable[[Head], bool]:
        """The same test on a typed head (`wire.Head`), written for the hook path's loop."""
        return head_gate(self.knowledge)

    def evaluate(self, record: PatientRecord, request: protocol.HookRequest,
                 now: datetime | None = None, policy: PolicyStep | None = None) -> Evaluation:
        """Facts -> rules -> policy -> at most one card for this patient."""
        now = now or datetime.now(timezone.utc)
        facts = derive_facts(record, request.context, self.knowledge, self.settings, now, self.verdicts)
        decision = decide(facts, self.settings)
        verdict = policy(decision, facts, now) if policy is not None and decision.kind else None
        card = (self._cards.build(decision, facts, request.context)
                if verdict is None or verdict.shown else None)
        cards = [card] if card is not None else []
        kinds = {card.uuid: decision.kind} if card is not None and decision.kind else {}
        # (decision, cards, card_kinds, skipped_resources, facts, policy): positional, as
        # keyword arguments cost a few tenths of a microsecond more per call
        return Evaluation(decision, cards, kinds, facts.skipped_resources, facts, verdict)
