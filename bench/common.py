"""Shared helpers: percentiles, card normalisation, the expected card, machine description."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_ID = "b12-neck-pain-patient-view"
HOOK_PATH = f"/cds-services/{SERVICE_ID}"
B12_LOINC = "2132-9"
_UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def percentile(samples: list[float], q: float) -> float:
    """The `q`-quantile (0..1) of `samples`, linear interpolation between closest ranks."""
    if not samples:
        return float("nan")
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def normalise_cards(payload: bytes) -> bytes:
    """The response with every UUID masked (card/suggestion uuids and ids differ per call)."""
    cards = orjson.loads(payload).get("cards")
    return _UUID_RE.sub(b"<uuid>", orjson.dumps(cards, option=orjson.OPT_SORT_KEYS))


def card_problems(payload: bytes) -> list[str]:
    """Why the response is not the expected B12-test card (empty list: it is)."""
    try:
        cards = orjson.loads(payload)["cards"]
    except Exception as err:  # noqa: BLE001
        return [f"response is not a cards response ({type(err).__name__})"]
    if not cards:
        return ["no card"]
    for card in cards:
        for sg in card.get("suggestions") or ():
            for action in sg.get("actions") or ():
                res = action.get("resource") or {}
                codes = [c.get("code") for c in (res.get("code") or {}).get("coding") or ()]
                if res.get("resourceType") == "ServiceRequest" and B12_LOINC in codes:
                    if not card.get("uuid") or not sg.get("uuid"):
                        return ["card or suggestion without uuid"]
                    return []
    return ["no card suggests a serum B12 test (ServiceRequest, LOINC 2132-9): "
            + "; ".join(str(c.get("summary")) for c in cards)]


def silence_service_logs() -> None:
    """Keep the service's JSON log lines (still formatted, as in production) out of the report.

    Called before and after `create_app` (which installs the handler idempotently)."""
    from cds_service import logs

    logs.configure()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger("cds_service").handlers:
        if getattr(handler, "_cds_json", False):  # the service's own handler, nobody else's
            handler.setStream(devnull)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    versions = []
    for dist in ("flask", "werkzeug", "gunicorn", "a2wsgi", "uvloop", "orjson", "pydantic", "fhir.resources", "requests"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} -")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "cds_service"],
                               cwd=REPO_ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
        commit += " (+ uncommitted changes in cds_service/)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "load average (1/5/15 min) at start": load,
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable",
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "libraries": ", ".join(versions),
        "commit": commit or "unknown",
    }
