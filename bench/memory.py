"""Part 7: memory per worker under concurrent large prefetches (`b12-cds serve` on 127.0.0.1).

What a deployment must plan for is the peak resident memory of a worker while several EHRs send
very large charts at once.  This part

1. builds **EHR-shaped** prefetches: the benchmark's synthetic patients (`bench/patients.py`,
   about 1 KiB per resource) with what a production EHR adds to each resource, modelled on the
   published example answers of Oracle Health (Cerner) Millennium's FHIR R4 API: a generated
   narrative (`text.div`, one `<p>` per field), an identifier, the EHR's own code next to the
   standard one (`userSelected`), the encounter and, for results, the performer.  Its size per
   resource is printed: it is the estimate behind the default `CDS_MAX_BODY_BYTES`;
2. starts `b12-cds serve` (2 workers x 4 threads, auth off, temporary data directory) with the
   body limit raised when a scenario's body needs it, and sends `concurrency` concurrent
   requests of that body, `rounds` times each, fresh connections;
3. records each worker's resident memory: at rest after a warm-up call, and its peak during the
   load (the kernel's high-water mark, `VmHWM` in /proc/PID/status, so no short peak between
   two samples is missed), with the statuses (200; 503 when the body budget stayed full) and
   latencies.

    .venv/bin/python -m bench.memory                      # about 3 minutes
    .venv/bin/python -m bench.run --parts memory --out /tmp/memory.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import requests

from bench.common import HOOK_PATH, card_problems, free_port, percentile
from bench.patients import hook_body, make_patient
from bench.servers import rss_mib, service_server

MIB = 1024 * 1024
TENANT = "ec2458f2-1e24-41c8-b71b-0e701af7583d"
"""The tenant id of Oracle Health's public sandbox, as in its example answers (a placeholder here)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    resources: int
    concurrency: int
    rounds: int
    env: dict[str, str] = field(default_factory=dict)
    """Settings for this server (`CDS_MAX_BODY_BYTES` raised when the body needs it, ...)."""


@dataclass
class ScenarioResult:
    scenario: Scenario
    body_bytes: int
    max_body_bytes: int
    budget_bytes: int
    statuses: dict[int, int]
    latencies_ms: list[float]
    worker_rest_mib: list[float]
    worker_peak_mib: list[float]
    worker_after_mib: list[float]
    bad_answers: list[str]
    wall_s: float

    @property
    def peak_growth_mib(self) -> float:
        """The largest peak above its own resting size, over the workers."""
        return max(p - r for p, r in zip(self.worker_peak_mib, self.worker_rest_mib))


def _p(parts: list[tuple[str, str]]) -> str:
    return "".join(f"<p><b>{label}</b>: {value}</p>" for label, value in parts)


def _code_text(concept: dict[str, Any] | None) -> str:
    if not concept:
        return ""
    return concept.get("text") or next((c.get("display", "") for c in concept.get("coding", ())), "")


def _narrative(res: dict[str, Any], patient_number: str) -> str:
    """A generated narrative in the shape of Millennium's: the type, then one line per field."""
    kind = res["resourceType"]
    rows = [("Patient Id", patient_number), ("Status", str(res.get("status", "")).title())]
    if kind == "Observation":
        cat = (res.get("category") or [{}])[0].get("coding", [{}])[0].get("code", "")
        rows += [("Categories", cat.replace("-", " ").title()), ("Code", _code_text(res.get("code")))]
        q = res.get("valueQuantity") or {}
        rows.append(("Result", f"{q.get('value', '')} {q.get('unit', '')}"))
        interp = (res.get("interpretation") or [{}])[0].get("coding", [{}])[0].get("code")
        if interp:
            rows.append(("Interpretation", {"H": "HIGH", "L": "LOW"}.get(interp, "NORMAL")))
        rows.append(("Effective Date", res.get("effectiveDateTime", "")))
        rng = (res.get("referenceRange") or [None])[0]
        if rng:
            rows.append(("Reference Range", f"{rng['low']['value']}-{rng['high']['value']} {q.get('unit', '')}"))
    elif kind == "Condition":
        rows += [("Problem", _code_text(res.get("code"))), ("Clinical Status", "Active"),
                 ("Verification Status", "Confirmed"), ("Onset", res.get("onsetDateTime", "")),
                 ("Recorded Date", res.get("recordedDate", ""))]
    elif kind == "MedicationRequest":
        rows += [("Medication", _code_text(res.get("medicationCodeableConcept"))), ("Intent", "Order"),
                 ("Dosage Instructions", "1 tablet, Oral, Daily"), ("Authored On", res.get("authoredOn", ""))]
    else:
        rows += [("Code", _code_text(res.get("code"))),
                 ("Date", res.get("performedDateTime") or res.get("authoredOn") or "")]
    return f'<div xmlns="http://www.w3.org/1999/xhtml"><p><b>{kind}</b></p>{_p(rows)}</div>'


def ehr_shape(res: dict[str, Any], index: int, patient_number: str) -> dict[str, Any]:
    """`res` with what a production EHR adds (narrative, identifier, local code, encounter,
    performer).  Codes the rules match are kept as they are, so the card does not change."""
    kind = res["resourceType"]
    out: dict[str, Any] = {"resourceType": kind, "id": res["id"], "meta": res.get("meta")}
    out["text"] = {"status": "generated", "div": _narrative(res, patient_number)}
    stamp = (res.get("effectiveDateTime") or res.get("authoredOn") or res.get("recordedDate")
             or "2020-01-01").replace("-", "").replace(":", "").replace("T", "")[:14]
    out["identifier"] = [{"system": "https://fhir.cerner.com/ceuuid",
                          "value": f"CE87caf4b7-{index:04x}-4667-9897-702218017c9e-{index}-{stamp}00"}]
    for key, value in res.items():
        if key in out:
            continue
        out[key] = value
    for field_name in ("code", "medicationCodeableConcept"):
        concept = res.get(field_name)
        if concept and kind != "Patient":
            local = {"system": f"https://fhir.cerner.com/{TENANT}/codeSet/72", "code": str(700000 + index % 90000),
                     "display": _code_text(concept), "userSelected": True}
            out[field_name] = {**concept, "coding": [*concept.get("coding", ()), local]}
    if kind != "Patient":
        out["encounter"] = {"reference": f"Encounter/{97950000 + index // 7}"}
    if kind == "Observation":
        out["performer"] = [{"reference": "Practitioner/12742400", "display": "Lab, Result, MD"}]
        out["category"] = [{**c, "text": c["coding"][0]["code"].replace("-", " ").title()}
                           for c in out.get("category") or ()]
    return out


def ehr_shaped_body(resources: int, seed: int = 7) -> tuple[bytes, bytes, int]:
    """(EHR-shaped body, the same patient's plain bench body, resource count)."""
    patient = make_patient(f"mem{resources}", resources, seed)
    plain = hook_body(patient, hook_instance="bench-memory")
    prefetch = orjson.loads(patient.prefetch_json)
    index = 0
    for value in prefetch.values():
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            continue
        for entry in value["entry"]:
            index += 1
            entry["resource"] = ehr_shape(entry["resource"], index, "12724066")
    shaped = {**patient.__dict__, "prefetch_json": orjson.dumps(prefetch)}
    body = hook_body(type(patient)(**shaped), hook_instance="bench-memory")
    return body, plain, patient.resource_count


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (writing 5 to clear_refs, Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _settled_rss(workers: list[int], timeout: float = 30.0) -> dict[int, float]:
    """Each worker's RSS once it stops changing (a worker builds the app after the fork; the
    first to finish already answers /healthz while the other is still importing)."""
    last = {pid: rss_mib(pid) for pid in workers}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.5)
        now = {pid: rss_mib(pid) for pid in workers}
        if all(abs(now[pid] - last[pid]) < 1 for pid in workers):
            return now
        last = now
    return last


def _warm_up(url: str, body: bytes, workers: list[int], timeout: float) -> None:
    """Calls from several threads at once until every worker has answered some (a new
    connection lands on whichever worker accepts first: its RSS grows by the caches a served
    hook call builds), so each worker's resting size includes them."""
    def one() -> None:
        requests.post(url, data=body, timeout=timeout, headers={"Content-Type": "application/json",
                                                                "Connection": "close"})
    start = _settled_rss(workers)
    for _ in range(20):
        threads = [threading.Thread(target=one) for _ in range(2 * len(workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if all(rss_mib(pid) > start[pid] + 3 for pid in workers):
            break
    _settled_rss(workers, timeout=5)


def run_scenario(sc: Scenario, body: bytes, *, progress: Callable[[str], None] = print,
                 warmup_body: bytes | None = None, timeout: float = 180.0) -> ScenarioResult:
    """Serve, warm up, send `sc.concurrency` x `sc.rounds` requests of `body`, measure."""
    from cds_service.config import Settings

    env = dict(sc.env)
    settings = Settings.from_env(env, environ={})
    with tempfile.TemporaryDirectory(prefix="b12-bench-mem-") as tmp:
        port = free_port()
        server = service_server(port, 2, str(Path(tmp) / "data"), Path(tmp) / "serve.log",
                                CDS_LOG_LEVEL="WARNING", **env)
        with server:
            url = f"{server.url}{HOOK_PATH}"
            workers = server.worker_pids()
            _warm_up(url, warmup_body or body, workers, timeout)
            rest = [rss_mib(pid) for pid in workers]
            reset = all(_reset_hwm(pid) for pid in workers)
            if not reset:
                progress("  (cannot reset VmHWM: peaks include start-up)")
            statuses: dict[int, int] = {}
            latencies: list[float] = []
            bad: list[str] = []
            lock = threading.Lock()
            done = [0]
            total = sc.concurrency * sc.rounds
            started = time.perf_counter()

            def client() -> None:
                for _ in range(sc.rounds):
                    t0 = time.perf_counter()
                    try:
                        resp = requests.post(url, data=body, timeout=timeout,
                                             headers={"Content-Type": "application/json",
                                                      "Connection": "close"})
                        status, payload = resp.status_code, resp.content
                    except requests.RequestException as err:
                        status, payload = 0, type(err).__name__.encode()
                    ms = (time.perf_counter() - t0) * 1000
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1
                        latencies.append(ms)
                        if status == 200:
                            bad.extend(card_problems(payload))
                        elif status != 503:
                            bad.append(f"status {status}: {payload[:200]!r}")
                        done[0] += 1
                        progress(f"  {sc.name}: {done[0]}/{total} answered ({status}, {ms / 1000:.1f} s)")

            threads = [threading.Thread(target=client, daemon=True) for _ in range(sc.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
            peak = [_hwm_mib(pid) for pid in workers]
            time.sleep(0.5)
            after = [rss_mib(pid) for pid in workers]
    return ScenarioResult(sc, len(body), settings.max_body_bytes, settings.body_budget_for(4), statuses,
                          latencies, rest, peak, after, bad, wall)


def default_scenarios(quick: bool = False) -> list[tuple[Scenario, int]]:
    """(scenario, resources): 10,000-resource charts one at a time (the cost of one body), then 8
    at once under the shipped defaults, under a budget of one body and with the budget out of
    the way (what it bounds); 30,000 resources with the body limit raised to fit them (budget
    derived from it)."""
    if quick:
        return [(Scenario("1,000 resources, defaults", 1000, 4, 1), 1000)]
    return [
        (Scenario("10,000 resources, one at a time", 10_000, 1, 3), 10_000),
        (Scenario("10,000 resources, defaults", 10_000, 8, 2), 10_000),
        (Scenario("10,000 resources, budget of one body (CDS_BODY_BUDGET_BYTES=32 MiB)", 10_000, 8, 2,
                  {"CDS_BODY_BUDGET_BYTES": str(32 * MIB)}), 10_000),
        (Scenario("10,000 resources, budget off (CDS_BODY_BUDGET_BYTES=1 GiB)", 10_000, 8, 2,
                  {"CDS_BODY_BUDGET_BYTES": str(1024 * MIB)}), 10_000),
        (Scenario("30,000 resources, CDS_MAX_BODY_BYTES=96 MiB", 30_000, 8, 1,
                  {"CDS_MAX_BODY_BYTES": str(96 * MIB)}), 30_000),
    ]


def sizes_table(counts: tuple[int, ...] = (300, 3000, 10_000)) -> list[tuple[int, float, float]]:
    """(resources, bench KiB per resource, EHR-shaped KiB per resource)."""
    rows = []
    for n in counts:
        shaped, plain, count = ehr_shaped_body(n)
        rows.append((count, len(plain) / count / 1024, len(shaped) / count / 1024))
    return rows


def report(results: list[ScenarioResult], sizes: list[tuple[int, float, float]]) -> list[str]:
    lines = ["## 7. Memory per worker under concurrent large prefetches (`b12-cds serve`, 2 workers x 4 threads)", ""]
    lines += ["Body size per resource (compact JSON, whole request / resources):", "",
              "| resources | bench/patients.py KiB per resource | EHR-shaped KiB per resource |",
              "| ---: | ---: | ---: |"]
    lines += [f"| {n:,} | {a:.2f} | {b:.2f} |" for n, a, b in sizes]
    lines += ["", "EHR-shaped: each resource as a production EHR sends it (generated narrative `text.div`, "
              "identifier, the EHR's own code beside the standard one, encounter, performer), modelled "
              "on Oracle Health Millennium's published FHIR R4 example answers (bench/memory.py).", ""]
    lines += ["| scenario | body MiB | body limit MiB | budget MiB | requests (concurrent) | statuses "
              "| wall s | p50 s | max s | worker at rest MiB | worker peak MiB | peak above rest MiB | after MiB |",
              "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | ---: | --- |"]
    for r in results:
        sc = r.scenario
        st = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items()))
        lines.append(
            f"| {sc.name} | {r.body_bytes / MIB:.1f} | {r.max_body_bytes / MIB:.0f} | {r.budget_bytes / MIB:.0f} "
            f"| {sc.concurrency * sc.rounds} ({sc.concurrency}) | {st} | {r.wall_s:.1f} "
            f"| {percentile(r.latencies_ms, 0.5) / 1000:.1f} | {max(r.latencies_ms) / 1000:.1f} "
            f"| {', '.join(f'{x:.0f}' for x in r.worker_rest_mib)} | {', '.join(f'{x:.0f}' for x in r.worker_peak_mib)} "
            f"| {r.peak_growth_mib:.0f} | {', '.join(f'{x:.0f}' for x in r.worker_after_mib)} |")
    lines += ["", "Peak: the kernel's high-water mark of each worker's resident memory during the load "
              "(`VmHWM`, reset after the warm-up); at rest: after warm-up calls; after: 0.5 s after the "
              "last answer. 503: no room in the body budget within CDS_BODY_BUDGET_WAIT (10 s).", ""]
    for r in results:
        if r.bad_answers:
            lines.append(f"**{r.scenario.name}: unexpected answers**: {'; '.join(r.bad_answers[:3])}")
            lines.append("")
    return lines


def run_memory(quick: bool = False, progress: Callable[[str], None] = print) -> tuple[list[str], list[ScenarioResult]]:
    progress("memory: measuring body sizes")
    sizes = sizes_table((300, 1000) if quick else (300, 3000, 10_000))
    results = []
    warm, _, _ = ehr_shaped_body(300)
    for sc, n in default_scenarios(quick):
        body, _, _ = ehr_shaped_body(n)
        progress(f"memory: {sc.name}: body {len(body) / MIB:.1f} MiB, {sc.concurrency} concurrent x {sc.rounds}")
        results.append(run_scenario(sc, body, progress=progress, warmup_body=warm))
    return report(results, sizes), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small scenario (harness check)")
    args = parser.parse_args(argv)
    lines, _ = run_memory(args.quick, progress=lambda s: print(s, file=sys.stderr, flush=True))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
