"""Run an audit on a local process pool or on a Dask distributed cluster.

Both executors run the same two task functions (`shards.split_partition`, then
`evaluate.evaluate_shard`) on the same plan, and the tallies are merged in shard order, so the
report does not depend on where the work ran.  On a cluster the input files and `work_dir` must
be on storage every worker sees at the same path (a shared filesystem): shards are written and
read there, and only counts travel through the scheduler.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cds_service.audit.evaluate import ROW_FIELDS, evaluate_shard, rows_path
from cds_service.audit.inputs import DEFAULT_PARTITION_BYTES, plan_partitions
from cds_service.audit.shards import merge_counts, split_partition
from cds_service.config import Settings

DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
"""Shards are sized so that one holds about this much NDJSON (what one task holds in memory)."""


@dataclass
class AuditRun:
    """What the run produced: the merged counts and where the per-patient rows went."""

    split: dict[str, Any]
    tally: dict[str, Any]
    partitions: int
    shards: int
    executor: str
    workers: int
    seconds: float
    patients_file: Path | None


def shard_count(total_bytes: int, workers: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Enough shards to keep each under `shard_bytes`, and at least 4 per worker (load balance)."""
    return max(1, workers * 4, math.ceil(total_bytes / max(1, shard_bytes)))


def run_audit(inputs: list[str | Path], work_dir: str | Path, settings: Settings, *,
              now: datetime | None = None, workers: int | None = None, scheduler: str | None = None,
              patients_file: str | Path | None = None, progress: bool = True,
              partition_bytes: int = DEFAULT_PARTITION_BYTES, shard_bytes: int = DEFAULT_SHARD_BYTES,
              n_shards: int | None = None, keep_shards: bool = False) -> AuditRun:
    """Shard the export under `work_dir`, evaluate every shard, merge; write `patients_file`.

    `scheduler` is a Dask scheduler address (`tcp://host:8786`); without it a local process pool
    of `workers` processes (default: every core) runs the tasks."""
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    work = Path(work_dir)
    for sub in ("shards", "rows"):
        shutil.rmtree(work / sub, ignore_errors=True)  # a rerun must not add to an old run's shards
    work.mkdir(parents=True, exist_ok=True)
    parts = plan_partitions(inputs, partition_bytes)
    total_bytes = sum(p.size for p in parts)

    with _executor(scheduler, workers) as (submit, executor_name, n_workers):
        shards = n_shards or shard_count(total_bytes, n_workers, shard_bytes)
        split: dict[str, Any] = {}
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading export", disable=not progress)
        with bar:
            for result in _completed(submit(split_partition, [(p, str(work), shards) for p in parts])):
                merge_counts(split, result)
                bar.update(result["bytes"])

        tallies: list[dict[str, Any] | None] = [None] * shards
        bar = tqdm(total=split.get("patients", 0), unit=" patients", desc="evaluating", disable=not progress)
        with bar:
            futures = submit(evaluate_shard, [(str(work), k, settings, now.isoformat()) for k in range(shards)])
            index = {id(f): k for k, f in enumerate(futures)}
            for future in _completed(futures, keep_future=True):
                result = future.result()
                tallies[index[id(future)]] = result
                bar.update(result["patients_evaluated"])

    tally: dict[str, Any] = {}
    for t in tallies:  # shard order: the same whatever finished first
        merge_counts(tally, t or {})
    out = Path(patients_file) if patients_file else None
    if out is not None:
        _concatenate_rows(work, shards, out)
    if not keep_shards:
        shutil.rmtree(work / "shards", ignore_errors=True)
        shutil.rmtree(work / "rows", ignore_errors=True)
    return AuditRun(split=split, tally=tally, partitions=len(parts), shards=shards, executor=executor_name,
                    workers=n_workers, seconds=round(time.perf_counter() - started, 3), patients_file=out)


def _concatenate_rows(work: Path, shards: int, out: Path) -> None:
    """One CSV of the patients who would get a card, sorted by card kind then patient id."""
    import csv

    rows: list[list[str]] = []
    for k in range(shards):
        path = rows_path(work, k)
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                rows.extend(csv.reader(f))
    rows.sort(key=lambda r: (r[1], r[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ROW_FIELDS)
        writer.writerows(rows)


# --- executors ----------------------------------------------------------------------------------

Submit = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]


class _executor:
    """Context manager giving `submit(fn, argument tuples) -> futures`, its name and worker count."""

    def __init__(self, scheduler: str | None, workers: int | None) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self._close: Callable[[], None] = lambda: None

    def __enter__(self) -> tuple[Submit, str, int]:
        if self.scheduler:
            from distributed import Client

            client = Client(self.scheduler, set_as_default=False)
            self._close = client.close
            n = max(1, sum(client.nthreads().values()))  # worker threads in the whole cluster

            def submit_dask(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
                # pure=False: every task runs (two tasks with equal arguments never happen, but a
                # rerun in the same client must not reuse an earlier run's results).
                return [client.submit(fn, *a, pure=False) for a in args]

            return submit_dask, f"dask ({self.scheduler})", n
        n = self.workers or usable_cores()
        # spawn: a fresh interpreter per worker (no inherited threads or locks from the caller,
        # which may be a web app or a test runner); each loads the engine once.
        pool = ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"))
        self._close = lambda: pool.shutdown(wait=True, cancel_futures=True)

        def submit_local(fn: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Future]:
            return [pool.submit(fn, *a) for a in args]

        return submit_local, "process pool", n

    def __exit__(self, *exc: object) -> None:
        self._close()


def _completed(futures: list[Any], keep_future: bool = False) -> Iterator[Any]:
    """Futures (local or Dask) as they complete: their results, or the futures themselves."""
    if futures and not isinstance(futures[0], Future):
        from distributed import as_completed as dask_completed

        iterator: Iterable[Any] = dask_completed(futures, loop=futures[0].client.loop)
    else:
        iterator = as_completed(futures)
    for future in iterator:
        yield future if keep_future else future.result()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, e.g. under a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
