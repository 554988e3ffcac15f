"""Card building: the hot path (cds_service.cards) vs. the former pydantic-built cards.

    .venv/bin/python -m bench.cards                 # about 30 s
    .venv/bin/python -m bench.cards --calls 200     # harness check only

Times `CardBuilder.build` + `protocol.cards_response` + `orjson.dumps` (what a hook call spends
on its card) with the current builder and with `tests/reference_cards.py` (cards.py as it was
when every card went through the pydantic models), in one process, calls interleaved (old, new,
old, ...) so machine load hits both alike; reports medians and their ratio per card.  Before
timing, both must answer the same bytes (uuids masked).  The facts come from the benchmark
patients (bench/patients.py) through the engine; the other kinds reuse the typical patient's
facts with the decision the rules give for a low, an indeterminate or a pregnancy result.
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from dataclasses import replace
from datetime import date
from typing import Any

import orjson

from bench.common import machine
from bench.patients import make_patient
from cds_service import protocol
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.facts import Evidence, LabResult
from cds_service.protocol import HookContext, HookRequest
from cds_service.record import PatientRecord
from cds_service.rules import Decision
from tests import reference_cards

_UUID = re.compile(rb'"uuid":"[0-9a-f-]{36}"')


def _record(size: str, target: int, seed: int) -> tuple[PatientRecord, str]:
    patient = make_patient(size, target, seed)
    resources: list[Any] = []
    for value in orjson.loads(patient.prefetch_json).values():
        if value and value.get("resourceType") == "Bundle":
            resources += [e["resource"] for e in value["entry"]]
        elif value:
            resources.append(value)
    return PatientRecord.from_resources(resources), patient.patient_id


def cases(engine: ClinicalEngine) -> list[tuple[str, Decision, Any, HookContext]]:
    """(name, decision, facts, context) for each card measured."""
    out = []
    typical = None
    for size, target, seed in (("small", 20, 11), ("typical", 300, 22), ("large", 3000, 33)):
        record, pid = _record(size, target, seed)
        context = HookContext(user_id="Practitioner/bench-gp", patient_id=pid)
        request = HookRequest(hook="patient-view", hook_instance="bench", context=context)
        ev = engine.evaluate(record, request)
        out.append((f"{size} patient, {ev.decision.kind}", ev.decision, ev.facts, context))
        if size == "typical":
            typical = (ev.facts, context)
    facts, context = typical  # type: ignore[misc]
    low = LabResult("lab-low", "2132-9", date(2025, 12, 1), 120.0, "pg/mL", value_ng_l=120.0, canonical=120.0,
                    canonical_unit="ng/L", value_text="120")
    indeterminate = replace(low, resource_id="lab-ind", value=245.0, value_ng_l=245.0, canonical=245.0,
                            value_text="245")
    red_flag = Evidence("red-flags", "Cervical myelopathy", "Condition", "my", date(2025, 11, 2))
    pregnant = Evidence("pregnancy", "Pregnancy", "Condition", "preg", date(2025, 10, 1))
    out += [
        ("typical, low-b12 + red flag", Decision("low-b12", "low-b12", "warning", low),
         replace(facts, b12_results=(low,), red_flags=(red_flag,), neurological_red_flags=(red_flag,)), context),
        ("typical, mma-test", Decision("mma-test", "indeterminate-b12", "info", indeterminate, suggest="mma"),
         replace(facts, b12_results=(indeterminate,)), context),
        ("typical, active B12 in pregnancy",
         Decision("b12-test", "indeterminate-total-b12-in-pregnancy", "info", indeterminate, recommended=True,
                  suggest="active-b12"),
         replace(facts, b12_results=(indeterminate,), pregnancy=(pregnant,)), context),
    ]
    return out


def measure(calls: int) -> list[tuple[str, float, float]]:
    engine = ClinicalEngine.load(Settings())
    new = engine._cards  # the engine's own builder: what a hook call runs
    old = reference_cards.CardBuilder(engine.texts, engine.knowledge, engine.settings, engine.verdicts)
    rows = []
    for name, decision, facts, context in cases(engine):
        def run_old() -> bytes:
            return orjson.dumps(protocol.cards_response([old.build(decision, facts, context)]))

        def run_new() -> bytes:
            return orjson.dumps(protocol.cards_response([new.build(decision, facts, context)]))

        if _UUID.sub(b"", run_old()) != _UUID.sub(b"", run_new()):
            raise SystemExit(f"{name}: the two builders answer different cards; nothing timed")
        for _ in range(min(200, calls)):  # warm both (memos, caches, branch predictors)
            run_old(), run_new()
        t_old, t_new = [], []
        clock = time.perf_counter
        gc.collect()
        for _ in range(calls):
            start = clock()
            run_old()
            middle = clock()
            run_new()
            end = clock()
            t_old.append(middle - start)
            t_new.append(end - middle)
        rows.append((name, statistics.median(t_old) * 1e6, statistics.median(t_new) * 1e6))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cards", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="interleaved calls per card (default 5000)")
    args = parser.parse_args(argv)
    rows = measure(args.calls)
    info = machine()
    print(f"Card building + serialisation, {args.calls} interleaved calls per card, medians "
          f"(`python -m bench.cards --calls {args.calls}`)\n")
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cores', '?')}; commit {info.get('commit', '?')}\n")
    print("| card | pydantic cards (µs) | hot path (µs) | ratio old/new |")
    print("|---|---:|---:|---:|")
    for name, t_old, t_new in rows:
        print(f"| {name} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.2f}x |")
    ratios = [t_old / t_new for _, t_old, t_new in rows]
    print(f"\nGeometric mean of the ratios: {statistics.geometric_mean(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
