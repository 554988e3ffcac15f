"""The store's fixed cost on a hook call: this tree's `cds_service/store.py` against an older
revision's, interleaved in one process.

    .venv/bin/python -m bench.store_ab --old-rev <git revision> [--reps 4000]

The old `store.py` is read with `git show <rev>:cds_service/store.py` and imported under another
module name; each side gets its own SQLite database (in a temporary directory on disk, the default
deployment), created by its own code (so the old side has the old schema).  Two measures, each
alternating old and new in chunks of 10 calls, median, p99 and mean of every call (the mean
counts the rare slow calls, such as a WAL checkpoint with its fsyncs, that the median hides):

1. **store work of one hook call**: what the hook path asks of the store when the rules chose a
   card (patient-view, no encounter, as the benchmark's patients): the alert policy's read
   (`policy_records`) then the issued-card write (`record_issued_cards`, one card with one
   suggestion, as the B12-test card).
2. **whole hook call**: the small benchmark patient's patient-view call through the Flask test
   client (as `bench.run --parts inproc`), the app's store swapped between the old and the new
   `Store` object (and the situation's JSON encoder with it).

Prints a markdown table with the ratios new/old, then the work of measure 1 counted from
/proc/self/io (load-independent): write system calls and bytes written per call (the WAL frames,
and the checkpoints' copies into the database file, averaged over the calls).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import HOOK_PATH, REPO_ROOT, percentile


def load_old_store(rev: str, workdir: Path) -> Any:
    """`cds_service/store.py` at `rev`, imported as module `old_store`."""
    source = subprocess.run(["git", "show", f"{rev}:cds_service/store.py"], cwd=REPO_ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = workdir / "old_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_store", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_store"] = module
    spec.loader.exec_module(module)
    return module


def interleave(old: Callable[[], Any], new: Callable[[], Any], reps: int, chunk: int = 10,
               warmup: int = 50) -> tuple[list[float], list[float]]:
    """Time `reps` calls of each, alternating chunks (old first, then new, ...); microseconds."""
    for _ in range(warmup):
        old()
        new()
    gc.collect()
    times: dict[int, list[float]] = {0: [], 1: []}
    for start in range(0, reps, chunk):
        for side, fn in ((0, old), (1, new)) if (start // chunk) % 2 == 0 else ((1, new), (0, old)):
            out = times[side]
            for _ in range(min(chunk, reps - start)):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e6)
    return times[0], times[1]


def io_counts() -> dict[str, int]:
    """This process's write syscalls and bytes written so far (Linux /proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"syscw": int(fields["syscw"]), "wchar": int(fields["wchar"])}


def work_per_call(fn: Callable[[], Any], calls: int, store: Any) -> dict[str, float]:
    """Write syscalls and bytes per call of `calls` calls, what the store still had to move into
    its database afterwards included (a store with an issued-card journal folds it in batches)."""
    before = io_counts()
    for _ in range(calls):
        fn()
    fold = getattr(store, "fold_journals", None)
    if fold is not None:
        fold()
    after = io_counts()
    return {k: (after[k] - before[k]) / calls for k in before}


def store_work(store: Any, issued_card: type, situation: str) -> Callable[[], None]:
    """One hook call's store work: the policy read, then recording one card with one suggestion."""
    counter = iter(range(10**9))

    def call() -> None:
        n = next(counter)
        patient = f"bench-patient-{n % 50}"
        now = datetime.now(timezone.utc)
        store.policy_records(patient, "b12-test", now, None, None)
        store.record_issued_cards(
            "b12-neck-pain-patient-view", f"bench-{n}", patient,
            [issued_card(str(uuid.uuid4()), "b12-test", (str(uuid.uuid4()),), situation=situation)])

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-rev", required=True, help="git revision of the old store.py")
    parser.add_argument("--reps", type=int, default=4000, help="calls per side and measure")
    args = parser.parse_args(argv)

    from bench.common import silence_service_logs
    from bench.inproc import check_cards, make_service_app
    from bench.patients import all_patients, hook_body
    from cds_service import policy as policy_module
    from cds_service.app import services
    from cds_service.config import Settings
    from cds_service.store import IssuedCard, Store

    rows: list[tuple[str, list[float], list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="b12-store-ab-") as tmp:
        root = Path(tmp)
        old_mod = load_old_store(args.old_rev, root)
        old_dir, new_dir = root / "old", root / "new"
        key = "k" * 40
        old_store = old_mod.Store.open(Settings(data_dir=str(old_dir), patient_hash_key=key))
        new_store = Store.open(Settings(data_dir=str(new_dir), patient_hash_key=key))
        situation = json.dumps({"indicator": "info", "b12": "0123456789abcdef", "red_flags": []},
                               separators=(",", ":"))
        old_work = store_work(old_store, old_mod.IssuedCard, situation)
        new_work = store_work(new_store, IssuedCard, situation)
        rows.append(("store work of one hook call (policy read + issued-card write)", *interleave(
            old_work, new_work, args.reps)))
        counted = {"old": work_per_call(old_work, args.reps, old_store),
                   "new": work_per_call(new_work, args.reps, new_store)}

        # The whole hook call, one app, its store (and the situation encoder) swapped per side.
        app = make_service_app(str(new_dir), patient_hash_key=key)
        silence_service_logs()
        svc = services(app)
        app_new_store = svc.store
        patient = next(p for p in all_patients() if p.size == "small")
        raw = hook_body(patient, hook_instance="bench-small")
        client = app.test_client()
        new_to_json = policy_module.Situation.to_json

        def old_to_json(self: Any) -> str:
            return json.dumps({"indicator": self.indicator, "b12": self.b12,
                               "red_flags": sorted(self.red_flags)}, separators=(",", ":"))

        def side(store: Any, to_json: Any) -> Callable[[], None]:
            def call() -> None:
                svc.store = svc.policy.store = store
                policy_module.Situation.to_json = to_json  # type: ignore[method-assign]
                resp = client.post(HOOK_PATH, data=raw, content_type="application/json", buffered=True)
                if resp.status_code != 200:
                    raise RuntimeError(f"hook call answered {resp.status_code}")
            return call

        old_call, new_call = side(old_store, old_to_json), side(app_new_store, new_to_json)
        old_call()
        check_cards(client, raw)  # the old side answered and the new side gives the expected card
        new_call()
        check_cards(client, raw)
        rows.append(("whole hook call, small patient (in-process)", *interleave(
            old_call, new_call, args.reps)))
        policy_module.Situation.to_json = new_to_json  # type: ignore[method-assign]
        svc.store = svc.policy.store = app_new_store
        for s in (old_store, new_store, app_new_store):
            s.close()

    print(f"old: `{args.old_rev}` store.py; new: working tree; {args.reps} calls per side, "
          "interleaved in chunks of 10\n")
    print("| measure | old p50 µs | new p50 µs | new/old p50 | old p99 µs | new p99 µs | new/old p99 "
          "| old mean µs | new mean µs | new/old mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, old, new in rows:
        o50, n50, o99, n99 = (percentile(old, 0.5), percentile(new, 0.5),
                              percentile(old, 0.99), percentile(new, 0.99))
        om, nm = statistics.fmean(old), statistics.fmean(new)
        print(f"| {name} | {o50:.1f} | {n50:.1f} | {n50 / o50:.2f} | {o99:.1f} | {n99:.1f} | {n99 / o99:.2f} "
              f"| {om:.1f} | {nm:.1f} | {nm / om:.2f} |")
    old, new = counted["old"], counted["new"]
    print(f"\nWork of measure 1, {args.reps} more calls per side (/proc/self/io):\n")
    print("| per call | old | new | new/old |")
    print("|---|---:|---:|---:|")
    print(f"| write system calls | {old['syscw']:.2f} | {new['syscw']:.2f} | {new['syscw'] / old['syscw']:.2f} |")
    print(f"| bytes written | {old['wchar']:.0f} | {new['wchar']:.0f} | {new['wchar'] / old['wchar']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
