"""PLACEHOLDER (owned by the clinical-rules helper; replaced wholesale)."""
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Evaluation:
    decision: Any
    cards: list = field(default_factory=list)
    card_kinds: dict = field(default_factory=dict)
    skipped_resources: int = 0


class ClinicalEngine:
    @classmethod
    def load(cls, settings):
        return cls()

    def valueset_codes(self, name):
        return []

    def evaluate(self, record, request, now=None):
        return Evaluation(decision=None)
