"""The benchmark harness still runs: a few in-process calls produce the expected card and ratios.

Not a performance test (no timing is asserted): it keeps bench/ from rotting as the service
changes.  The real numbers come only from `python -m bench.run` (bench/README.md).
"""

from __future__ import annotations

import math

import orjson

from bench.common import card_problems
from bench.inproc import run_inprocess
from bench.patients import SIZES, all_patients, hook_body, make_patient


def test_patients_are_deterministic_and_sized() -> None:
    for name, target, seed in SIZES:
        a, b = make_patient(name, target, seed), make_patient(name, target, seed)
        assert a.prefetch_json == b.prefetch_json
        assert a.resource_count == target
        assert orjson.loads(hook_body(a))["prefetch"]["patient"]["id"] == a.patient_id


def test_inprocess_harness_produces_card_and_ratio(tmp_path) -> None:
    small = [p for p in all_patients() if p.size == "small"]
    rows, cards = run_inprocess(small, {"small": 5}, warmup=1, data_dir=str(tmp_path))
    (row,) = rows
    assert row.calls == 5 and row.resources == 20
    assert "B12" in row.card_summary
    assert b"2132-9" in cards["small"]
    for value in (row.ratio_p50, row.ratio_p99, row.us_per_resource, row.floor_ratio_p50):
        assert math.isfinite(value) and value >= 0


def test_reading_floor_answers_like_the_baseline() -> None:
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    from bench.baseline_app import reading_floor_app

    client = Client(reading_floor_app, Response)
    body = hook_body(all_patients()[0])
    ok = client.post("/cds-services/x", data=body, content_type="application/json")
    assert ok.status_code == 200 and orjson.loads(ok.data) == {"cards": []}
    assert client.post("/cds-services/x", data=b"[1]", content_type="application/json").status_code == 400


def test_card_check_rejects_an_empty_answer() -> None:
    assert card_problems(b'{"cards": []}') == ["no card"]


def test_audit_benchmark_harness(tmp_path) -> None:
    from bench.audit import markdown, run

    result = run(150, 60, 2, tmp_path)
    one, two = result["runs"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["patients"] == two["patients"] > 140 and one["cards"] == two["cards"] > 0
    assert one["engine"]["cpu_per_patient"] > 0 and two["engine"]["patients"] == one["engine"]["patients"]
    assert result["worker_peak_rss_mib"] > 10
    text = "\n".join(markdown(result, "python -m bench.audit"))
    assert "ratio (CPU)" in text and "Peak memory" in text


def test_policy_harness_times_the_read_and_the_hook() -> None:
    from bench.policy import run_policy

    small = next(p for p in all_patients() if p.size == "small")
    row = run_policy(small, rows=20, reads=10, hook_calls=10, warmup=1)
    assert (row.stored_rows, row.reads, row.hook_calls) == (20, 10, 10)
    for value in (row.read_p50_us, row.hook_p50_ms, row.without_read_p50_ms, row.share_p50):
        assert math.isfinite(value) and value >= 0


def test_card_building_harness_compares_the_same_cards() -> None:
    from bench.cards import measure

    rows = measure(calls=3)  # raises unless both builders answer the same bytes for every card
    kinds = " ".join(name for name, _, _ in rows)
    assert all(k in kinds for k in ("b12-test", "low-b12", "mma-test", "pregnancy"))
    assert all(math.isfinite(t_old) and math.isfinite(t_new) and t_new > 0 for _, t_old, t_new in rows)


def test_ab_harness_compares_this_checkout_with_a_revision() -> None:
    """`bench.ab` imports HEAD beside this checkout and prints its three rows (in a subprocess:
    the second package and its metrics stay out of this test process)."""
    import subprocess
    import sys

    from bench.common import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "bench.ab", "--against", "HEAD", "--calls", "20"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [row.split(" | ")[0] for row in rows] == ["| fixed", "| fixed, Origin", "| small patient"]
    for row in rows:
        assert row.rstrip(" |").endswith("x")


def test_store_ab_harness_compares_the_store_with_a_revision() -> None:
    """`bench.store_ab` imports a revision's store.py beside this one and prints both measures
    and the work counts (in a subprocess: the second Store class stays out of this process)."""
    import subprocess
    import sys

    from bench.common import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "bench.store_ab", "--old-rev", "HEAD", "--reps", "20"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| measure", "| store work of one hook call (policy read + issued-card write)",
                    "| whole hook call, small patient (in-process)", "| per call",
                    "| write system calls", "| bytes written"]
