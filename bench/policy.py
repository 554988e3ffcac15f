"""Part 5: the alert policy's store read (suppression + encounter lockout) on the hook path.

Two measures, both on SQLite on disk in a temporary directory (the default deployment):

1. The read alone: `Store.policy_records` for a patient and card kind, with an encounter (so both
   the suppression primary key and the issued-cards encounter index are used), on a store already
   holding `rows` suppressions and `rows` issued cards of other patients and encounters.  Each
   read is for a patient not looked up before: the statement is sent (a process remembers its
   suppression lookups until any process changes a suppression, cds_service/store.py).
2. Its share of a hook call: the typical patient's patient-view call with full prefetch (as in
   part 1) with the real policy vs. the same app with the store read replaced by one that returns
   nothing, calls alternating in chunks of 10.  The difference of the p50s is the read's cost on
   the hook path (the same patient again and again: after the first call its suppression lookup
   is remembered).
"""

from __future__ import annotations

import gc
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.common import HOOK_PATH, percentile
from bench.inproc import BenchError, _time_calls, check_cards, make_service_app
from bench.patients import Patient, hook_body


@dataclass
class PolicyRow:
    stored_rows: int
    reads: int
    read_p50_us: float
    read_p99_us: float
    hook_calls: int
    hook_p50_ms: float
    hook_p99_ms: float
    without_read_p50_ms: float
    without_read_p99_ms: float

    @property
    def share_p50(self) -> float:
        """The read's share of the hook call (p50 difference over the hook's p50)."""
        return max(0.0, self.hook_p50_ms - self.without_read_p50_ms) / self.hook_p50_ms


def _fill(store: Any, rows: int) -> None:
    """`rows` suppressions and `rows` issued cards (with encounters) of other patients."""
    from cds_service.store import timestamp_text

    now = datetime.now(timezone.utc)
    until = timestamp_text(now + timedelta(days=180))
    at = timestamp_text(now)
    with store._transaction(durable=False) as cur:
        for i in range(rows):
            patient = store.patient_hash(f"other-{i}")
            cur.execute("INSERT INTO suppressions (patient_hash, kind, card_uuid, service_id, outcome,"
                        " reason_system, reason_code, reason_display, feedback_at, until, situation)"
                        " VALUES (?, 'b12-test', ?, 'svc', 'overridden', 's', 'tested-elsewhere', NULL,"
                        " ?, ?, NULL)", (patient, str(uuid.uuid4()), at, until))
            cur.execute("INSERT INTO issued_cards (card_uuid, service_id, kind, hook_instance, patient_hash,"
                        " issued_at, delivery, encounter_hash, situation, withheld_by)"
                        " VALUES (?, 'svc', 'b12-test', 'h', ?, ?, 'shown', ?, NULL, NULL)",
                        (str(uuid.uuid4()), patient, at, store.encounter_hash(f"enc-{i}")))


def run_policy(patient: Patient, *, rows: int, reads: int, hook_calls: int, warmup: int = 20) -> PolicyRow:
    from cds_service.app import services
    from cds_service.store import PolicyRecords

    with tempfile.TemporaryDirectory(prefix="b12-bench-policy-") as data_dir:
        app = make_service_app(data_dir)
        store = services(app).store
        _fill(store, rows)

        now = datetime.now(timezone.utc)
        since = now - timedelta(hours=24)
        for _ in range(min(warmup, reads)):
            store.policy_records("bench-patient", "b12-test", now, "bench-encounter", since)
        gc.collect()
        read_us: list[float] = []
        for i in range(reads):
            t0 = time.perf_counter()
            store.policy_records(f"p-{i}", "b12-test", now, f"e-{i % 89}", since)
            read_us.append((time.perf_counter() - t0) * 1e6)

        # The hook path, with the real read and with a read that returns nothing.
        raw = hook_body(patient, hook_instance="bench-policy")
        client = app.test_client()
        check_cards(client, raw)
        real_read = store.policy_records

        def no_read(*args: Any, **kwargs: Any) -> PolicyRecords:
            return PolicyRecords()

        def timed(read: Any, n: int) -> list[float]:
            store.policy_records = read  # type: ignore[method-assign]
            try:
                return _time_calls(client, raw, n)
            finally:
                store.policy_records = real_read  # type: ignore[method-assign]

        timed(real_read, warmup)
        timed(no_read, warmup)
        gc.collect()
        with_ms: list[float] = []
        without_ms: list[float] = []
        for start in range(0, hook_calls, 10):
            k = min(10, hook_calls - start)
            without_ms += timed(no_read, k)
            with_ms += timed(real_read, k)
        if client.post(HOOK_PATH, data=raw, content_type="application/json").status_code != 200:
            raise BenchError("hook call failed after timing")
        store.close()
    return PolicyRow(stored_rows=rows, reads=reads, read_p50_us=percentile(read_us, 0.5),
                     read_p99_us=percentile(read_us, 0.99), hook_calls=hook_calls,
                     hook_p50_ms=percentile(with_ms, 0.5), hook_p99_ms=percentile(with_ms, 0.99),
                     without_read_p50_ms=percentile(without_ms, 0.5),
                     without_read_p99_ms=percentile(without_ms, 0.99))
