"""The export's files, cut into partitions that can be read independently and in parallel.

A FHIR Bulk Data export (`$export`) writes one or more NDJSON files per resource type (one
resource per line).  An NDJSON file is cut into byte ranges of about `target_bytes`; a range owns
every line that *starts* inside it, so ranges can be read by different processes or machines
without coordination and without reading the file as a whole.  A `.json` file is read whole: a
Bundle (e.g. one per patient, as Synthea writes them) or a single resource.

Which patient a resource belongs to is read from its `subject` or `patient` reference (the same
fields the hook path checks), in any of the forms a server writes: `Patient/123`, an absolute
`https://.../Patient/123`, `Patient/123/_history/2`, or a Bundle-local `urn:uuid:...` that names
a Patient entry's `fullUrl`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
BUNDLE_SUFFIXES = (".json",)
DEFAULT_PARTITION_BYTES = 32 * 1024 * 1024

RECORD_TYPES: frozenset[str] = frozenset({
    "Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement",
    "Procedure", "ServiceRequest",
})
"""Resource types a `PatientRecord` holds (record.py); other types are counted, not sharded."""
SUBJECT_FIELDS = ("subject", "patient")


@dataclass(frozen=True)
class Partition:
    """A piece of one input file: bytes [start, end) of an NDJSON file, or a whole JSON file."""

    index: int
    path: str
    start: int
    end: int
    format: Literal["ndjson", "bundle"]

    @property
    def size(self) -> int:
        return self.end - self.start


def input_files(paths: list[str | Path]) -> list[Path]:
    """NDJSON and JSON files named or found (recursively) in directories, sorted by path."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(p for p in path.rglob("*") if p.is_file() and p.suffix in NDJSON_SUFFIXES + BUNDLE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return sorted(set(found))


def plan_partitions(paths: list[str | Path], target_bytes: int = DEFAULT_PARTITION_BYTES) -> list[Partition]:
    """Cut the input files into partitions of about `target_bytes` (deterministic order)."""
    parts: list[Partition] = []
    for path in input_files(paths):
        size = path.stat().st_size
        if path.suffix in BUNDLE_SUFFIXES:
            parts.append(Partition(len(parts), str(path), 0, size, "bundle"))
            continue
        start = 0
        while start < size or (start == 0 and size == 0):
            end = min(size, start + max(1, target_bytes))
            parts.append(Partition(len(parts), str(path), start, end, "ndjson"))
            if end >= size:
                break
            start = end
    return parts


def ndjson_lines(part: Partition) -> Iterator[bytes]:
    """The lines that start in [start, end), without their line end; blank lines skipped."""
    with open(part.path, "rb") as f:
        if part.start > 0:
            # The line that straddles `start` belongs to the previous partition: skip to its end.
            f.seek(part.start - 1)
            f.readline()
        pos = f.tell()
        while pos < part.end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            line = line.strip()
            if line:
                yield line


def reference_id(reference: Any, local_patients: dict[str, str] | None = None) -> str | None:
    """The Patient id a reference string points to, else None."""
    if type(reference) is not str:
        return None
    if reference.startswith("Patient/") and reference.count("/") == 1:
        return reference[8:] or None  # the common case, no string surgery
    if reference.startswith("urn:"):
        return (local_patients or {}).get(reference)
    path = reference.split("/_history/", 1)[0].rstrip("/")
    head, sep, rid = path.rpartition("/")
    if sep and rid and (head == "Patient" or head.endswith("/Patient")):
        return rid
    return (local_patients or {}).get(reference)


def patient_id_of(resource: dict[str, Any], local_patients: dict[str, str] | None = None) -> str | None:
    """Whose resource this is: a Patient's own id, else its subject/patient reference."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if type(rid) is str and rid else None
    for name in SUBJECT_FIELDS:
        ref = resource.get(name)
        if type(ref) is dict:
            return reference_id(ref.get("reference"), local_patients)
    return None


def bundle_resources(path: str) -> tuple[list[Any], dict[str, str]]:
    """Resources of a JSON file (a Bundle's entries, or the single resource) and the Bundle's
    Patient `fullUrl` -> id map for resolving `urn:uuid` references.  Raises ValueError when the
    file is not JSON."""
    try:
        data = orjson.loads(Path(path).read_bytes())
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{os.path.basename(path)} is not JSON") from err
    if type(data) is not dict:
        return [data], {}
    if data.get("resourceType") != "Bundle":
        return [data], {}
    entries = data.get("entry") if type(data.get("entry")) is list else []
    resources: list[Any] = []
    local: dict[str, str] = {}
    for entry in entries:
        res = entry.get("resource") if type(entry) is dict else None
        resources.append(res)
        if type(res) is dict and res.get("resourceType") == "Patient" and type(res.get("id")) is str:
            full_url = entry.get("fullUrl")
            if type(full_url) is str:
                local[full_url] = res["id"]
    return resources, local
