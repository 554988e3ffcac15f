"""A per-worker memory of what the resource gate decided about exact resource bytes.

An EHR sends the same chart again and again: `patient-view` on every chart open, `order-select`
on every change of the order being written, `order-sign` at signing, each with the same
prefetch.  Most of a prefetched Bundle is data the rules never use (vital signs, unrelated
labs), and reading it costs, per resource, a typed decode of its head (`wire.Head`) and the
gate's test (`facts.head_gate`): together about as much as the rest of the hook call for a
chart of 300 resources.  The gate is a pure function of a resource's head, so of its bytes:
the same bytes always get the same answer, and a resource seen before can be judged from a
lookup of its bytes' hash instead.

What is kept, per resource, is the hash of its bytes and what the gatherer needs to act on the
answer without the head: the byte length, the resource type, its logical id and its subject
reference (``Patient/<id>``), and the verdict.  No clinical content (codes, texts, values,
dates) is kept; a deployment that wants no identifiers in memory at all sets
`CDS_GATE_MEMO_ENTRIES=0`.

The key is Python's `hash()` of the bytes: SipHash-1-3 with the interpreter's random key
(unless `PYTHONHASHSEED` fixes it), 64 bits, checked together with the byte length.  A
cryptographic digest would cost as much as the decode it replaces (SHA-256: ~0.8 µs per
resource, measured; the hash: ~0.1 µs).  The chance that two different resources of the same
length share a key is about 2^-64 per pair: with the memo full (32,768 entries) and 3,000
lookups per hook call, once in ~10^11 calls.

A Bundle is only remembered from its second sight (`GateMemo.remembers_bundle`): a chart seen once
costs one hash per Bundle, not one per resource.
"""

from __future__ import annotations

from typing import NamedTuple


class GateVerdict(NamedTuple):
    """What the gate decided about one resource's bytes (see the module doc)."""

    length: int
    resource_type: str
    resource_id: str | None
    subject_reference: str | None
    needed: bool


class GateMemo:
    """Bounded: at most `max_entries` verdicts, then it starts over (a worker that sees more
    distinct charts than that between repeats gains nothing from a memo; clearing keeps the
    cost of the bound at zero per lookup).  Thread-safe as far as it needs to be: every
    operation is one dict operation, atomic under the GIL; a race between a clear and an insert
    only loses entries.  Tied to one gate (`gate`): a memo used with another is cleared."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(0, max_entries)
        self._verdicts: dict[int, GateVerdict] = {}
        self._bundles_seen: dict[tuple[int, int, int], None] = {}
        self._gate: object | None = None

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._verdicts)

    def bind(self, gate: object) -> None:
        """Use the memo for `gate`'s answers (forgetting another gate's)."""
        if gate is not self._gate:
            self.clear()
            self._gate = gate

    def clear(self) -> None:
        self._verdicts.clear()
        self._bundles_seen.clear()

    def remembers_bundle(self, first_key: int, first_length: int, count: int) -> bool:
        """Whether to look up and remember the resources of a Bundle of `count` raw resources
        whose first one has hash `first_key` and length `first_length`: yes when that first
        resource is remembered, or when a Bundle starting the same way was seen before; else
        no, and the Bundle is noted as seen (so a chart seen once costs one hash per Bundle)."""
        if self.get(first_key, first_length) is not None:
            return True
        fingerprint = (first_key, first_length, count)
        if fingerprint in self._bundles_seen:
            return True
        if len(self._bundles_seen) >= self.max_entries:
            self._bundles_seen.clear()
        self._bundles_seen[fingerprint] = None
        return False

    def get(self, key: int, length: int) -> GateVerdict | None:
        """The verdict remembered for bytes with hash `key` and `length`, else None."""
        verdict = self._verdicts.get(key)
        if verdict is not None and verdict.length == length:
            return verdict
        return None

    def put(self, key: int, verdict: GateVerdict) -> None:
        if len(self._verdicts) >= self.max_entries:
            self._verdicts.clear()
        self._verdicts[key] = verdict
