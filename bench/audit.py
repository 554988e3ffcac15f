"""Benchmark of `b12-cds audit`: patients per second per core, peak memory, speed-up to all cores.

    .venv/bin/python -m bench.audit                    # 100,000 patients, 1 worker then all cores
    .venv/bin/python -m bench.audit --patients 2000    # quick look

1. Generate the population (`bench/population.py`, NDJSON per resource type) in a temporary
   directory on disk.
2. Baseline, the in-process engine's per-patient cost: a sample population from the same
   generator (different ids) is grouped in memory and each `PatientRecord` is evaluated with
   `ClinicalEngine.evaluate` in this process (a fresh engine, so validation verdicts are cold as
   they are for an export: every resource is new).  Only the engine is timed.
3. The audit's code path against the bare engine in this process, shard by shard alternating
   (so both meet the same load at the same moments): the per-patient cost ratio.
4. The audit (`run_audit`, the CLI's code path, progress bars off) on 1 worker, then on every
   usable core, against the bare engine on as many processes: CPU per patient (getrusage of the
   driver and the workers: includes the pool's start-up, reading, sharding and the merge),
   wall-clock patients/s and the speed-up (which needs a quiet machine; the engine's own
   speed-up on the same machine shows what it allowed).  Peak memory: the largest VmHWM of
   any worker process, and the driver's peak RSS.

Targets: per-patient cost within 1.3x of the engine's (step 3); speed-up near-linear
(>= 0.8 x cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson

from bench.common import machine
from bench.population import REFERENCE_DATE, patient_resources, write_population
from cds_service.app import tune_garbage_collector
from cds_service.audit.evaluate import engine_for, evaluate_shard, hook_request_for
from cds_service.audit.inputs import plan_partitions
from cds_service.audit.shards import read_shard, split_partition
from cds_service.audit.runner import run_audit, usable_cores
from cds_service.config import Settings
from cds_service.engine import ClinicalEngine
from cds_service.record import PatientRecord

NOW = datetime(REFERENCE_DATE.year, REFERENCE_DATE.month, REFERENCE_DATE.day, 12, tzinfo=timezone.utc)
TARGET_RATIO = 1.3
TARGET_EFFICIENCY = 0.8


class ChildPeak:
    """Largest VmHWM (the process's own peak RSS; fresh after exec, unlike ru_maxrss) of this
    process's children, sampled from /proc while a run goes on."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.1):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                    self.peak_kib = max(self.peak_kib, int(fields["VmHWM"].split()[0]))

    def __enter__(self) -> "ChildPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _engine_task(directory: str, settings: Settings, index: int, count: int) -> tuple[float, float, int]:
    """In a fresh worker process: evaluate every `count`-th patient of the sample (prebuilt
    records, only `ClinicalEngine.evaluate` timed); (CPU s, wall s, patients)."""
    engine = ClinicalEngine.load(settings)
    grouped = sorted(patient_resources(directory).items())[index::count]
    records = [(pid, PatientRecord.from_resources(res)) for pid, res in grouped]
    records = [(pid, r) for pid, r in records if r.patient is not None]
    del grouped
    tune_garbage_collector()  # as the service's and the audit's workers do
    wall, cpu = time.perf_counter(), time.process_time()
    for pid, record in records:
        engine.evaluate(record, hook_request_for(pid), NOW)
    return time.process_time() - cpu, time.perf_counter() - wall, len(records)


def engine_cost(directory: Path, settings: Settings, workers: int) -> dict[str, float]:
    """The bare engine on `workers` processes at once (each its share of the sample), so it meets
    the same machine as the audit with that many workers: CPU per patient, patients/s."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_engine_task, [str(directory)] * workers, [settings] * workers,
                                range(workers), [workers] * workers))
    n = sum(r[2] for r in results)
    return {"workers": workers, "cpu_per_patient": sum(r[0] for r in results) / n,
            "patients_per_s": n / max(r[1] for r in results), "patients": n}


def interleaved_ratio(directory: Path, settings: Settings, tmp: Path, n_shards: int = 16) -> dict[str, float]:
    """The audit's code path against the bare engine in one process, shard by shard, alternating
    (A: `evaluate_shard`, B: `ClinicalEngine.evaluate` on the same shard's prebuilt records), so
    both meet the same machine load at the same moments; plus the split phase.  CPU time."""
    work = tmp / "work-interleaved"
    settings_engine = ClinicalEngine.load(settings)
    engine_for(settings)  # the audit worker's one-time engine load is not a per-patient cost
    cpu = time.process_time
    t = cpu()
    for part in plan_partitions([directory]):
        split_partition(part, str(work), n_shards)
    split_s = cpu() - t
    audit_s = engine_s = 0.0
    patients = 0
    for k in range(n_shards):
        t = cpu()
        tally = evaluate_shard(str(work), k, settings, NOW.isoformat())
        audit_s += cpu() - t
        records = [(pid, PatientRecord.from_resources([orjson.loads(raw) for raw in lines]))
                   for pid, lines in sorted(read_shard(str(work), k).items())]
        records = [(pid, r) for pid, r in records if r.patient is not None]
        assert len(records) == tally["patients_evaluated"]
        t = cpu()
        for pid, record in records:
            settings_engine.evaluate(record, hook_request_for(pid), NOW)
        engine_s += cpu() - t
        patients += len(records)
        del records
    shutil.rmtree(work, ignore_errors=True)
    return {"patients": patients, "split_us": split_s / patients * 1e6, "evaluate_us": audit_s / patients * 1e6,
            "engine_us": engine_s / patients * 1e6, "ratio": (split_s + audit_s) / engine_s}


def run(patients: int, sample: int, workers_all: int, tmp: Path) -> dict[str, Any]:
    settings = Settings.from_env({"log_level": "ERROR", "data_dir": str(tmp / "data")})
    t0 = time.perf_counter()
    population = write_population(tmp / "export", patients, seed=42)
    generate_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in population.directory.glob("*.ndjson"))
    runs = []
    with ChildPeak() as peak:
        for workers in sorted({1, workers_all}):
            cpu0, self0 = _children_cpu(), time.process_time()
            load = os.getloadavg()[0]
            audit = run_audit([population.directory], tmp / f"work-{workers}", settings, now=NOW, workers=workers,
                              progress=False)
            cpu = _children_cpu() - cpu0 + time.process_time() - self0
            n = audit.tally["patients_evaluated"]
            runs.append({"workers": workers, "seconds": audit.seconds, "patients": n, "shards": audit.shards,
                         "partitions": audit.partitions, "wall_per_patient_core": audit.seconds * workers / n,
                         "cpu_per_patient": cpu / n, "load": load,
                         "cards": sum(audit.tally.get("cards", {}).values())})
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tune_garbage_collector()  # as in the audit's workers
    interleaved = interleaved_ratio(population.directory, settings, tmp)
    baseline = write_population(tmp / "sample", sample, seed=43, prefix="s")
    engine = {r["workers"]: engine_cost(baseline.directory, settings, r["workers"]) for r in runs}
    for r in runs:
        r["engine"] = engine[r["workers"]]
    return {"patients": patients, "resources": population.resources, "bytes": size, "generate_s": generate_s,
            "engine_sampled": engine[1]["patients"], "runs": runs, "interleaved": interleaved,
            "worker_peak_rss_mib": peak.peak_kib / 1024, "driver_peak_rss_mib": driver_peak}


def markdown(result: dict[str, Any], command: str) -> list[str]:
    lines = ["## Population audit (`b12-cds audit`)", "",
             f"Command: `{command}` (from the repository root, with the project's venv)", ""]
    lines += ["| machine | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in machine().items()] + [""]
    lines.append(f"Population: {result['patients']:,} patients, {result['resources']:,} resources, "
                 f"{result['bytes'] / 2**20:,.0f} MiB of NDJSON (generated in {result['generate_s']:.1f} s). "
                 f"Engine baseline: `ClinicalEngine.evaluate` on prebuilt records of {result['engine_sampled']:,} "
                 "patients of the same generator, in as many processes as the audit run it is compared with.")
    i = result["interleaved"]
    lines += ["", f"**Audit code path vs the engine, same process, shard by shard alternating** (robust to the "
                  f"machine's load, which moves both alike): per patient {i['split_us']:,.0f} µs splitting + "
                  f"{i['evaluate_us']:,.0f} µs grouping, parsing and evaluating, against {i['engine_us']:,.0f} µs "
                  f"for `ClinicalEngine.evaluate` alone on the same patients: **ratio {i['ratio']:.2f}** "
                  f"({i['patients']:,} patients)."]
    lines += ["", "Runs on a process pool (what `b12-cds audit` does), against the engine alone on as many processes; "
                  "CPU per patient: CPU seconds of the driver and all workers / patients (what the cores spend, "
                  "whatever else runs on the machine).", "",
              "| workers | shards | load avg at start | audit wall s | audit patients/s | audit patients/s per core "
              "| audit CPU µs per patient | engine CPU µs per patient | ratio (CPU) | audit speed-up | "
              "engine speed-up (same machine) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    one = result["runs"][0]
    for r in result["runs"]:
        e = r["engine"]
        lines.append(f"| {r['workers']} | {r['shards']} | {r['load']:.2f} | {r['seconds']:.1f} | "
                     f"{r['patients'] / r['seconds']:,.0f} | {r['patients'] / r['seconds'] / r['workers']:,.0f} | "
                     f"{r['cpu_per_patient'] * 1e6:,.0f} | {e['cpu_per_patient'] * 1e6:,.0f} | "
                     f"{r['cpu_per_patient'] / e['cpu_per_patient']:.2f} | {one['seconds'] / r['seconds']:.2f} | "
                     f"{e['patients_per_s'] / one['engine']['patients_per_s']:.2f} |")
    last = result["runs"][-1]
    ratio = i["ratio"]
    efficiency = one["seconds"] / last["seconds"] / last["workers"]
    lines += ["", f"Peak memory: largest worker process {result['worker_peak_rss_mib']:.0f} MiB (VmHWM), "
                  f"driver {result['driver_peak_rss_mib']:.0f} MiB.",
              "", f"Targets: per-patient cost within {TARGET_RATIO}x of the engine's (interleaved): {ratio:.2f}x, "
                  f"{'met' if ratio <= TARGET_RATIO else '**NOT met**'}; near-linear speed-up (efficiency >= "
                  f"{TARGET_EFFICIENCY}): {efficiency:.2f}, "
                  f"{'met' if efficiency >= TARGET_EFFICIENCY else '**NOT met** (compare the engine speed-up: what the machine allowed)'}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=10_000, help="patients in the engine baseline")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="the 'all cores' run (default: usable)")
    parser.add_argument("--tmp", type=Path, help="directory for the export and shards (default: system temp)")
    parser.add_argument("--out", type=Path, help="also write the markdown section to this file")
    args = parser.parse_args(argv)
    command = "python -m bench.audit" + ("" if not (argv or sys.argv[1:]) else " " + shlex.join(argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="b12-bench-audit-", dir=args.tmp) as tmp:
        result = run(args.patients, args.sample, args.workers, Path(tmp))
    lines = markdown(result, command)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
