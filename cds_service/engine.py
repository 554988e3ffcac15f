"""The clinical engine: value sets + card texts loaded once, then facts -> decision -> cards.

Contract used by the HTTP layer:
    engine = ClinicalEngine.load(settings)
    engine.knowledge, engine.valueset_codes(name)
    evaluation = engine.evaluate(record, hook_request, now=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from cds_service import protocol
from cds_service.cards import REQUEST_INTENTS, CardBuilder, CardTexts
from cds_service.config import Settings
from cds_service.facts import PatientFacts, derive_facts
from cds_service.fhir_validation import ValidationVerdicts
from cds_service.knowledge import LOINC, Knowledge
from cds_service.record import PatientRecord
from cds_service.rules import Decision, decide


@dataclass(frozen=True)
class Evaluation:
    decision: Decision
    cards: list[protocol.Card]
    card_kinds: dict[str, str]
    """Card uuid -> card kind ("low-b12", "mma-test", "b12-test")."""
    skipped_resources: int
    facts: PatientFacts | None = None
    """The facts behind the decision (for logs/debugging; never sent to the client)."""


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

    def evaluate(self, record: PatientRecord, request: protocol.HookRequest,
                 now: datetime | None = None) -> Evaluation:
        """Facts -> rules -> at most one card for this patient."""
        now = now or datetime.now(timezone.utc)
        facts = derive_facts(record, request.context, self.knowledge, self.settings, now, self.verdicts)
        decision = decide(facts, self.settings)
        card = self._cards.build(decision, facts, request.context)
        cards = [card] if card is not None else []
        kinds = {c.uuid: decision.kind for c in cards if decision.kind}
        return Evaluation(decision=decision, cards=cards, card_kinds=kinds,
                          skipped_resources=facts.skipped_resources, facts=facts)
