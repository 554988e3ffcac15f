"""Part 4: start-up time (import + create_app) in fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench.common import REPO_ROOT, percentile

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from cds_service import create_app
t1 = time.perf_counter()
app = create_app({"data_dir": sys.argv[1], "auth_disabled": True, "log_level": "ERROR"})
t2 = time.perf_counter()
rss = 0
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        rss = int(line.split()[1]) / 1024
print(json.dumps({"import_s": t1 - t0, "create_app_s": t2 - t1, "rss_mib": rss}))
"""


@dataclass
class StartupRow:
    runs: int
    import_s: float
    create_app_s: float
    total_s: float
    process_s: float
    """Wall time of the whole fresh process (interpreter start + import + create_app + exit)."""
    rss_mib: float


def run_startup(runs: int = 5) -> StartupRow:
    imports, creates, totals, walls, rss = [], [], [], [], []
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="b12-bench-start-") as tmp:
        for i in range(runs + 1):  # the first run (byte-code compilation, cold caches) is dropped
            data_dir = os.path.join(tmp, f"d{i}")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _PROBE, data_dir], cwd=REPO_ROOT, env=env,
                                 capture_output=True, text=True, timeout=120, check=True)
            wall = time.perf_counter() - t0
            if i == 0:
                continue
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            imports.append(probe["import_s"])
            creates.append(probe["create_app_s"])
            totals.append(probe["import_s"] + probe["create_app_s"])
            walls.append(wall)
            rss.append(probe["rss_mib"])
    return StartupRow(runs=runs, import_s=percentile(imports, 0.5), create_app_s=percentile(creates, 0.5),
                      total_s=percentile(totals, 0.5), process_s=percentile(walls, 0.5),
                      rss_mib=percentile(rss, 0.5))
