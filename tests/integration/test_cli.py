"""`b12-cds evaluate` and `b12-cds seed` through the real entry point (a subprocess), against a
real FHIR server (sekmet-fhir), a closed port, stubs answering 404/401, a TLS server with an
untrusted certificate and a name that cannot resolve: each problem gets its own one-line
message saying what to check, and no Python traceback."""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.servers import HOST, Reply, StubServer, free_port, http_ok, sekmet_server

pytestmark = pytest.mark.integration

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))


def b12_cds(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    return subprocess.run([B12_CDS, *args], capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(proc: subprocess.CompletedProcess[str], command: str = "evaluate") -> str:
    """The failed command's error: one line, prefixed with the command, last on stderr (`seed`
    says what it is about to write first), no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("b12-cds ")]
    assert errors == [lines[-1]] and lines[-1].startswith(f"b12-cds {command}: "), proc.stderr
    if command == "evaluate":
        assert len(lines) == 1, proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def fhir_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, base = sekmet_server(tmp_path_factory.mktemp("sekmet-cli"))
    with server.start(http_ok(f"{base}/metadata"), timeout=60):
        yield base


@pytest.fixture(scope="module")
def seeded(fhir_base: str) -> list[str]:
    proc = b12_cds("seed", "--fhir-server", fhir_base)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    # It said what it would write before writing: every Patient id, and the shared-server advice.
    assert all(pid in proc.stderr for pid in ids) and "--id-prefix" in proc.stderr
    return ids


# --- errors -----------------------------------------------------------------------------------

def test_connection_refused(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    line = one_line_error(b12_cds("evaluate", "--fhir-server", f"http://{HOST}:{port}/fhir", "--patient", "p1"))
    assert f"connection refused by {HOST}:{port}" in line and "is the FHIR server running" in line


def test_name_not_resolved() -> None:
    # .invalid never resolves (RFC 6761), so this needs no network.
    line = one_line_error(b12_cds("evaluate", "--fhir-server", "http://no-such-host.invalid/fhir", "--patient", "p1"))
    assert "cannot resolve host name 'no-such-host.invalid'" in line


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 whose self-signed certificate nobody trusts."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "untrusted.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # the client aborting the handshake is the point

    httpd = Quiet((HOST, 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"https://{HOST}:{httpd.server_address[1]}/fhir"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_tls_failure(tls_server: str) -> None:
    line = one_line_error(b12_cds("evaluate", "--fhir-server", tls_server, "--patient", "p1"))
    assert "TLS failure" in line and "certificate" in line


def test_base_url_without_fhir_suffix(fhir_base: str) -> None:
    root = fhir_base.removesuffix("/fhir")
    line = one_line_error(b12_cds("evaluate", "--fhir-server", root, "--patient", "p1"))
    assert f"no FHIR server at {root}" in line and f"try {root}/fhir" in line


def test_unknown_patient(fhir_base: str) -> None:
    line = one_line_error(b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", "nobody-here"))
    assert "no Patient with id 'nobody-here'" in line and "check --patient" in line


def test_expired_token_401() -> None:
    with StubServer() as stub:
        outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}
        stub.route("/fhir/metadata", Reply(401, outcome))
        stub.route("/fhir/Patient/p1", Reply(401, outcome))
        line = one_line_error(b12_cds("evaluate", "--fhir-server", f"{stub.base}/fhir", "--patient", "p1",
                                      "--token", "expired-token"))
        assert "HTTP 401" in line and "expired" in line and "--token" in line
        assert "expired-token" not in line
        # The token was sent (the service's fetches and the diagnosis), so the 401 is about it.
        assert any(r.headers.get("Authorization") == "Bearer expired-token" for r in stub.requests)


def test_stub_404_everywhere_suggests_fhir_suffix() -> None:
    with StubServer() as stub:  # every path answers 404
        line = one_line_error(b12_cds("evaluate", "--fhir-server", stub.base, "--patient", "p1"))
        assert f"try {stub.base}/fhir" in line


def test_user_errors_without_traceback(tmp_path: Path, fhir_base: str) -> None:
    line = one_line_error(b12_cds("evaluate", "--fhir-server", "localhost:8090", "--patient", "p1"))
    assert "is not an http(s) URL" in line
    line = one_line_error(b12_cds("evaluate", "--fhir-server", "http://[::1", "--patient", "p1"))
    assert "not a valid URL" in line
    line = one_line_error(b12_cds("evaluate", "--fhir-server", "http://127.0.0.1:8090/fhir/%2e%2e/x",
                                  "--patient", "p1"))
    assert "not a usable FHIR base URL (encoded dot segment in path)" in line
    line = one_line_error(b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", "p1", "--hook",
                                  "order-select", "--draft-orders", str(tmp_path / "missing.json")))
    assert "no such file" in line
    bad = tmp_path / "bad.json"
    bad.write_text('{"resourceType": "Bundle", ')
    line = one_line_error(b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", "p1", "--hook",
                                  "order-select", "--draft-orders", str(bad)))
    assert "is not valid JSON (line 1" in line
    line = one_line_error(b12_cds("seed", "--fhir-server", f"http://{HOST}:{free_port()}/fhir"), "seed")
    assert "connection refused" in line


def test_broken_pipe_is_quiet(fhir_base: str, seeded: list[str]) -> None:
    proc = subprocess.run(f"'{B12_CDS}' evaluate --fhir-server {fhir_base} --patient {seeded[0]} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


# --- explanation, prefetch, compare -----------------------------------------------------------

def test_evaluate_explains_with_the_records_behind_each_fact(fhir_base: str, seeded: list[str]) -> None:
    pid = "demo-metformin-chronic"
    assert pid in seeded
    proc = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", pid, "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    expl = answer["explanation"]
    assert expl["decision"]["kind"] == "b12-test" and expl["decision"]["rule"] == "8"
    evidence = expl["facts"]["neck_pain"] + [e for r in expl["facts"]["risk_factors"] for e in r["evidence"]]
    for ev in evidence:  # each names a real record entry carrying that very code
        if ev["resource_type"] == "Patient":
            continue
        res = requests.get(f"{fhir_base}/{ev['reference']}", timeout=5).json()
        concept = res.get("code") or res.get("medicationCodeableConcept")
        if ev["code"]:
            assert {"system": ev["system"], "code": ev["code"]}.items() <= next(
                c for c in concept["coding"] if c["code"] == ev["code"]).items()
    assert expl["unavailable"] == [] and expl["skipped_invalid"] == []

    text = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", pid).stdout
    assert "Decision: card b12-test, reason risk-and-symptoms (rule 8 in docs/rules.md#" in text
    assert f"Condition/{expl['facts']['neck_pain'][0]['resource_id']}, code 81680005 (http://snomed.info/sct)" in text
    assert "Looked for and not found:" in text and "b12_results: final B12 results" in text


def test_no_card_is_explained(fhir_base: str, seeded: list[str]) -> None:
    proc = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", "demo-recent-normal")
    assert proc.returncode == 0, proc.stderr
    assert "No cards" in proc.stdout
    assert "Decision: no card, reason recent-normal (rule 7b" in proc.stdout
    assert "latest B12 result used: Observation/" in proc.stdout and "-> normal" in proc.stdout


@pytest.mark.parametrize("pid", ["demo-metformin-chronic", "demo-indeterminate-pmol", "demo-pending-order"])
def test_compare_prefetch_and_fallback(fhir_base: str, seeded: list[str], pid: str) -> None:
    proc = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", pid, "--compare", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["same"] is True and out["differences"] == []
    pre, fb = out["prefetch"]["explanation"], out["fhir"]["explanation"]
    assert pre["data_sources"]["fetched_from_fhir_server"] == [] and pre["data_sources"]["fhir_calls"] == 0
    assert len(fb["data_sources"]["fetched_from_fhir_server"]) == 9
    assert pre["decision"] == fb["decision"]
    text = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", pid, "--compare").stdout
    assert "Same answer in both modes" in text


def test_prefetch_mode_sends_what_the_templates_return(fhir_base: str, seeded: list[str]) -> None:
    proc = b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", "demo-low-b12", "--prefetch", "--json")
    assert proc.returncode == 0, proc.stderr
    expl = json.loads(proc.stdout)["explanation"]
    assert expl["data_sources"]["fhir_calls"] == 0 and len(expl["data_sources"]["prefetched"]) == 9
    assert expl["decision"]["kind"] == "low-b12"


# --- seed -------------------------------------------------------------------------------------

def test_seed_with_id_prefix_keeps_other_peoples_patients(fhir_base: str, seeded: list[str]) -> None:
    before = requests.get(f"{fhir_base}/Condition?patient=demo-metformin-chronic", timeout=5).json()
    dry = b12_cds("seed", "--fhir-server", fhir_base, "--id-prefix", "bob-", "--dry-run")
    assert dry.returncode == 0 and dry.stdout == "" and "Would write" in dry.stderr and "bob-demo-low-b12" in dry.stderr
    assert requests.get(f"{fhir_base}/Patient/bob-demo-low-b12", timeout=5).status_code == 404

    proc = b12_cds("seed", "--fhir-server", fhir_base, "--id-prefix", "alice-")
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert ids == [f"alice-{pid}" for pid in seeded]
    assert all(pid in proc.stderr for pid in ids)
    # Alice's Conditions point at Alice's patient; the unprefixed patient's are untouched.
    mine = requests.get(f"{fhir_base}/Condition?patient=alice-demo-metformin-chronic", timeout=5).json()
    assert mine["entry"] and all(e["resource"]["id"].startswith("alice-") and
                                 e["resource"]["subject"]["reference"] == "Patient/alice-demo-metformin-chronic"
                                 for e in mine["entry"])
    after = requests.get(f"{fhir_base}/Condition?patient=demo-metformin-chronic", timeout=5).json()
    assert [e["resource"]["id"] for e in after["entry"]] == [e["resource"]["id"] for e in before["entry"]]
    # And they get the same decision.
    for pid in ("demo-metformin-chronic", "demo-pending-order"):
        plain = json.loads(b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", pid, "--json").stdout)
        alice = json.loads(b12_cds("evaluate", "--fhir-server", fhir_base, "--patient", f"alice-{pid}",
                                   "--json").stdout)
        assert plain["explanation"]["decision"] == alice["explanation"]["decision"]


def test_seed_rejects_a_prefix_that_makes_invalid_ids(fhir_base: str) -> None:
    line = one_line_error(b12_cds("seed", "--fhir-server", fhir_base, "--id-prefix", "a b/"), "seed")
    assert "is not a valid FHIR id" in line
