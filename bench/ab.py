"""A/B in one process: the hook path of this checkout against an earlier git revision.

    .venv/bin/python -m bench.ab --against main              # or any commit, tag, branch
    .venv/bin/python -m bench.ab --against HEAD~1 --calls 4000

On a shared machine, timings of two processes run one after the other differ by more than most
changes are worth.  This runs both versions side by side instead: the revision's `cds_service`
is exported with `git archive` and imported as a second package (`cds_service_rev`: its own
logger and Prometheus metric names, so the two apps share nothing), and calls alternate between
the two apps and the baseline app (`bench.baseline_app`) in small chunks, in rotating order.

Rows (the small benchmark patient, auth off, Flask's test client, as `bench.inproc`):

* `fixed`: the evaluation (`http.hooks._evaluate_hook`) replaced, in both versions, by a stub that
  answers a prepared card: what is left is the fixed cost of a call outside the clinical engine
  (Flask and werkzeug, request checks, CORS and security headers, metrics, the log line).
* `fixed, Origin`: the same with a browser's `Origin` header (the CORS answer is built).
* `small patient`: the whole hook call (both versions must answer the same cards first).

The table gives medians per call; "above baseline" subtracts the median of a reference app
timed in the same rotation, which leaves the part the service can change: for the `fixed` rows
a bare Flask endpoint that answers the same prepared card (the test client's and Flask's own
work), for the whole call the parse-only baseline app of `bench.inproc`.  Ratios are
revision / this checkout.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import orjson

from bench.baseline_app import create_baseline_app
from bench.common import HOOK_PATH, REPO_ROOT, machine, normalise_cards, percentile, silence_service_logs
from bench.inproc import make_service_app
from bench.patients import all_patients, hook_body

REV_PACKAGE = "cds_service_rev"
ORIGIN = {"Origin": "https://ehr.example.org"}


def import_revision(rev: str, into: Path) -> ModuleType:
    """`cds_service` (with `cards/` and `valuesets/`) as of `rev`, importable as `cds_service_rev`."""
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev, "cds_service", "cards", "valuesets"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)  # noqa: S202 - our own repository's archive
    package = into / REV_PACKAGE
    (into / "cds_service").rename(package)
    for source in package.rglob("*.py"):
        text = re.sub(r"\bcds_service\b", REV_PACKAGE, source.read_text(encoding="utf-8"))
        # Metric names are process-global in prometheus-client's default registry.
        text = re.sub(r'\b(Counter|Histogram|Gauge|Summary)\("', r'\1("rev_', text)
        source.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(into))
    import importlib

    return importlib.import_module(REV_PACKAGE)


def make_rev_app(package: ModuleType, data_dir: str) -> Any:
    import logging
    import os

    app = package.create_app({"data_dir": data_dir, "auth_disabled": True})
    logging.getLogger(REV_PACKAGE).setLevel(logging.INFO)  # as the service logs in production
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger(REV_PACKAGE).handlers:
        if getattr(handler, "_cds_json", False):
            handler.setStream(devnull)
    return app


def create_bare_app(answer: dict[str, Any]) -> Any:
    """Flask with one route answering `answer`: the floor under the `fixed` rows."""
    from flask import Flask, Response

    app = Flask(__name__, static_folder=None)
    body = orjson.dumps(answer)

    @app.post("/cds-services/<service_id>")
    def hook(service_id: str) -> Response:
        return Response(body, mimetype="application/json")

    return app


def stub_evaluation(hooks_module: ModuleType, answer: dict[str, Any], json_response: Callable[..., Any]) -> None:
    """Replace the evaluation with a prepared answer (the same log fields a real call sets)."""
    import inspect

    from flask import g, has_request_context

    if not hasattr(hooks_module, "_evaluate_hook"):
        raise SystemExit(f"{hooks_module.__name__} has no _evaluate_hook: the fixed rows cannot stub it")
    # Since the hook route ahead of Flask, the evaluation answers the JSON bytes (and runs
    # outside Flask's request context); before, a Response.
    returns_bytes = inspect.signature(hooks_module._evaluate_hook).return_annotation in ("bytes", bytes)
    body = orjson.dumps(answer)

    def evaluate(*args: Any) -> Any:
        if has_request_context():  # earlier revisions: the error handlers' lines read `g`
            g.hook_instance = "bench-small"
        counts = {"cards": 1, "card_kinds": ["b12_test"], "reason": "risk-factors", "policy": "shown"}
        if len(args) == 4:  # (services, service, request, fields): the line's fields are filled in
            args[3].update(counts, hook_instance="bench-small")
        else:  # earlier revisions, (service): the fields went through `g`
            g.log_counts = counts
        return body if returns_bytes else json_response(answer)

    hooks_module._evaluate_hook = evaluate


def timed(client: Any, raw: bytes, headers: dict[str, str], n: int) -> list[float]:
    out = []
    post = client.post
    for _ in range(n):
        t0 = time.perf_counter()
        resp = post(HOOK_PATH, data=raw, content_type="application/json", headers=headers, buffered=True)
        out.append((time.perf_counter() - t0) * 1e6)
        if resp.status_code != 200:
            raise SystemExit(f"status {resp.status_code} during timing")
    return out


def interleave(clients: dict[str, Any], raw: bytes, headers: dict[str, str], calls: int,
               chunk: int = 10) -> dict[str, float]:
    """Median microseconds per call of each client, calls alternating in rotating order."""
    names = list(clients)
    for name in names:
        timed(clients[name], raw, headers, 50)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(0, calls, chunk):
        shift = (i // chunk) % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name] += timed(clients[name], raw, headers, chunk)
    return {name: percentile(xs, 0.5) for name, xs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. main)")
    parser.add_argument("--calls", type=int, default=3000, help="calls per app and row")
    args = parser.parse_args(argv)

    patient = next(p for p in all_patients() if p.size == "small")
    raw = hook_body(patient, hook_instance="bench-small")
    with tempfile.TemporaryDirectory(prefix="b12-ab-") as tmp:
        rev = import_revision(args.against, Path(tmp) / "src")
        silence_service_logs()
        import logging

        logging.getLogger(REV_PACKAGE).setLevel(logging.WARNING)  # its start-up lines

        apps = {"revision": make_rev_app(rev, f"{tmp}/rev-data"), "this": make_service_app(f"{tmp}/data")}
        clients = {name: app.test_client(use_cookies=False) for name, app in apps.items()}
        clients["baseline"] = create_baseline_app().test_client(use_cookies=False)

        answers = [clients[name].post(HOOK_PATH, data=raw, content_type="application/json").get_data()
                   for name in ("revision", "this")]
        if normalise_cards(answers[0]) != normalise_cards(answers[1]):
            raise SystemExit("the two versions answer different cards: nothing is timed")
        rows = [("small patient", interleave(clients, raw, {}, args.calls))]

        import importlib

        from cds_service.http import errors, hooks

        answer = orjson.loads(answers[1])
        stub_evaluation(hooks, answer, errors.json_response)
        stub_evaluation(importlib.import_module(f"{REV_PACKAGE}.http.hooks"), answer,
                        importlib.import_module(f"{REV_PACKAGE}.http.errors").json_response)
        clients["baseline"] = create_bare_app(answer).test_client(use_cookies=False)
        rows.insert(0, ("fixed", interleave(clients, raw, {}, args.calls)))
        rows.insert(1, ("fixed, Origin", interleave(clients, raw, ORIGIN, args.calls)))

    print(f"bench.ab: this checkout vs {args.against}, {args.calls} calls per app and row, "
          f"{machine().get('cpu', '')}")
    print("| row | revision us | this us | reference us | revision above reference | this above reference | ratio (above reference) | ratio (whole call) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, med in rows:
        old, new, base = med["revision"], med["this"], med["baseline"]
        print(f"| {label} | {old:.1f} | {new:.1f} | {base:.1f} | {old - base:.1f} | {new - base:.1f} | "
              f"{(old - base) / max(new - base, 1e-9):.2f}x | {old / new:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
