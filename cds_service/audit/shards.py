"""Hash-partition resources by patient id into shard files on disk (no global in-memory join).

`split_partition` reads one input partition and appends each resource to the shard its patient
id hashes to: `<work_dir>/shards/<shard>/<partition>.ndjson`, one line `patient-id TAB json`.
Every partition writes its own file per shard, so tasks never share a file and need no locks;
reading a shard's files in partition order gives each patient's resources in export order
whatever ran where.  NDJSON lines are copied as they are (not re-serialised).

The hash is CRC-32 of the id (stable across processes and machines, unlike Python's `hash`).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from cds_service.audit.inputs import RECORD_TYPES, Partition, bundle_resources, ndjson_lines, patient_id_of

FLUSH_BYTES = 16 * 1024 * 1024
"""Buffered shard lines written out past this size (bounds a task's memory)."""


def shard_of(patient_id: str, n_shards: int) -> int:
    return zlib.crc32(patient_id.encode("utf-8")) % n_shards


def shard_dir(work_dir: str | Path, shard: int) -> Path:
    return Path(work_dir) / "shards" / f"{shard:05d}"


def split_partition(part: Partition, work_dir: str, n_shards: int) -> dict[str, Any]:
    """Shard one partition; returns its counts (mergeable with `merge_counts`).

    Counts: `resources` per type sharded, `patients` (Patient resources seen), `unreadable`
    (lines or entries that are not a JSON object with a resourceType), `without_patient_reference`
    (record types without a usable subject/patient reference), `other_types` (types the rules do
    not read: counted, not sharded), `bytes` read."""
    resources: Counter[str] = Counter()
    other: Counter[str] = Counter()
    unreadable = 0
    no_reference = 0
    buffers: dict[int, list[bytes]] = {}
    buffered = 0

    def flush() -> None:
        nonlocal buffered
        for shard, lines in buffers.items():
            folder = shard_dir(work_dir, shard)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{part.index:06d}.ndjson", "ab") as f:
                f.write(b"".join(lines))
        buffers.clear()
        buffered = 0

    for raw, resource, local in _resources(part):
        rtype = resource.get("resourceType") if type(resource) is dict else None
        if type(rtype) is not str:
            unreadable += 1
            continue
        if rtype not in RECORD_TYPES:
            other[rtype] += 1
            continue
        pid = patient_id_of(resource, local)
        if pid is None or "\t" in pid or "\n" in pid:
            no_reference += 1
            continue
        line = b"%s\t%s\n" % (pid.encode("utf-8"), raw if raw is not None else orjson.dumps(resource))
        buffers.setdefault(shard_of(pid, n_shards), []).append(line)
        buffered += len(line)
        resources[rtype] += 1
        if buffered >= FLUSH_BYTES:
            flush()
    flush()
    return {"resources": dict(resources), "patients": resources.get("Patient", 0), "unreadable": unreadable,
            "without_patient_reference": no_reference, "other_types": dict(other), "bytes": part.size}


def _resources(part: Partition) -> Iterator[tuple[bytes | None, Any, dict[str, str] | None]]:
    """(raw line or None, parsed resource or None, Bundle-local Patient map) per item."""
    if part.format == "bundle":
        try:
            items, local = bundle_resources(part.path)
        except ValueError:
            yield None, None, None
            return
        for res in items:
            yield None, res, local
        return
    loads = orjson.loads
    for line in ndjson_lines(part):
        try:
            yield line, loads(line), None
        except orjson.JSONDecodeError:
            yield line, None, None


def read_shard(work_dir: str, shard: int) -> dict[str, list[bytes]]:
    """Patient id -> its resources' JSON (bytes), in export order.  Insertion order of the ids
    follows first appearance, so callers sort when they need a canonical order."""
    patients: dict[str, list[bytes]] = {}
    folder = shard_dir(work_dir, shard)
    if not folder.is_dir():
        return patients
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            for line in f:
                pid, _, raw = line.rstrip(b"\n").partition(b"\t")
                key = pid.decode("utf-8")
                group = patients.get(key)
                if group is None:
                    patients[key] = group = []
                group.append(raw)
    return patients


def merge_counts(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add `other`'s counts (ints, or dicts of ints, nested) into `into`; returns `into`."""
    for key, value in other.items():
        if isinstance(value, dict):
            merge_counts(into.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        else:
            into.setdefault(key, value)
    return into
