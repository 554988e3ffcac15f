"""Start a FHIR Bulk Data export (`$export`) and download its NDJSON files.

Protocol (FHIR Bulk Data Access IG, "Export" and "Status request"):
1. kick-off: `GET <base>/Patient/$export?_type=...` (or `/$export`, `/Group/<id>/$export`) with
   `Accept: application/fhir+json` and `Prefer: respond-async`; the server answers 202 with a
   `Content-Location` status URL (any other answer is an error, an OperationOutcome if the
   server sent one);
2. status: `GET <status URL>` until it stops answering 202 (waiting `Retry-After` seconds, or
   an HTTP date, between polls; 429 means "slow down" and is waited on too); 200 carries the
   manifest `{"output": [{"type", "url"}], "error": [...], "requiresAccessToken": bool}`; a 4xx
   or 5xx is a failed export (the body is an OperationOutcome);
3. download each output URL with `Accept: application/fhir+ndjson`, streamed to disk.

Outbound safety is the hooks': every URL (base, status, output files) must be under
`CDS_FHIR_ALLOWLIST`, redirects are never followed, and the bearer token is sent only there
(for output files only when the manifest says `requiresAccessToken`).  Nothing of the token or
the data is logged.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from cds_service.audit.inputs import RECORD_TYPES
from cds_service.config import Settings
from cds_service.logs import get_logger
from cds_service import fhir_url
from cds_service.retry_after import retry_after_seconds

log = get_logger("bulk_export")

DEFAULT_TYPES = tuple(sorted(RECORD_TYPES))
MAX_WAIT_SECONDS = 300.0
"""Longest single wait between polls, whatever Retry-After says."""
DEFAULT_POLL_SECONDS = 2.0
_SAFE_TYPE = re.compile(r"^[A-Za-z]{1,64}$")


class BulkExportError(RuntimeError):
    """The export could not be started, failed on the server, or could not be downloaded."""


@dataclass
class ExportResult:
    files: list[Path]
    manifest: dict[str, Any]
    errors: list[str] = field(default_factory=list)
    """Files from the manifest's `error` array (OperationOutcome NDJSON), downloaded too."""


def _diagnostics(resp: requests.Response) -> str:
    """A short reason from an OperationOutcome body, else the status line."""
    try:
        body = resp.json()
        issues = body.get("issue") if isinstance(body, dict) else None
        if isinstance(issues, list) and issues and isinstance(issues[0], dict):
            text = issues[0].get("diagnostics") or (issues[0].get("details") or {}).get("text")
            if isinstance(text, str) and text:
                return f"HTTP {resp.status_code}: {text[:300]}"
    except ValueError:
        pass
    return f"HTTP {resp.status_code}"


class BulkExporter:
    """One export from one FHIR server (the settings give the allowlist and timeouts)."""

    def __init__(self, base_url: str, settings: Settings, *, token: str | None = None,
                 session: requests.Session | None = None, sleep: Callable[[float], None] = time.sleep,
                 poll_seconds: float = DEFAULT_POLL_SECONDS, timeout_seconds: float = 3600.0) -> None:
        self.base = base_url.rstrip("/")
        self.settings = settings
        self.token = token
        self.session = session or requests.Session()
        self.sleep = sleep
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        self._check(self.base)

    # -- helpers ----------------------------------------------------------------------------------
    def _check(self, url: str) -> str:
        """`url` in normal form (`fhir_url.normalise`) when it is under CDS_FHIR_ALLOWLIST: the
        form that is checked is the form that is sent, so the token cannot be steered elsewhere."""
        try:
            normal = fhir_url.normalise(url)
        except fhir_url.UnsafeUrl as err:
            raise BulkExportError(f"URL is not usable ({err.reason})") from None
        if not fhir_url.allowed(normal, fhir_url.normalise_allowlist(self.settings.fhir_allowlist_prefixes)):
            raise BulkExportError("URL is not on CDS_FHIR_ALLOWLIST: " + normal.base[:200])
        return normal.text

    def _get(self, url: str, *, accept: str, with_token: bool = True, stream: bool = False,
             extra: dict[str, str] | None = None) -> requests.Response:
        url = self._check(url)
        headers = {"Accept": accept, **(extra or {})}
        if with_token and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            return self.session.get(url, headers=headers, allow_redirects=False, stream=stream,
                                    timeout=(self.settings.fhir_connect_timeout, max(self.settings.fhir_read_timeout, 30.0)))
        except requests.RequestException as err:
            raise BulkExportError(f"cannot reach {url.split('?', 1)[0][:200]}: {type(err).__name__}") from None

    # -- the three steps --------------------------------------------------------------------------
    def kick_off(self, *, level: str = "Patient", group: str | None = None,
                 types: tuple[str, ...] = DEFAULT_TYPES, since: str | None = None) -> str:
        """Start the export; returns the status URL."""
        bad = [t for t in types if not _SAFE_TYPE.match(t)]
        if bad:
            raise BulkExportError(f"not a resource type: {bad[0][:64]!r}")
        path = {"system": "/$export", "Patient": "/Patient/$export"}.get(level)
        if group:
            path = f"/Group/{requests.utils.quote(group, safe='')}/$export"
        if path is None:
            raise BulkExportError(f"unknown export level {level!r} (system, Patient, or a group id)")
        params = {"_type": ",".join(types), "_outputFormat": "application/fhir+ndjson"}
        if since:
            params["_since"] = since
        url = self.base + path + "?" + "&".join(f"{k}={requests.utils.quote(v, safe=',')}" for k, v in params.items())
        resp = self._get(url, accept="application/fhir+json", extra={"Prefer": "respond-async"})
        if resp.status_code != 202:
            raise BulkExportError(f"export kick-off refused: {_diagnostics(resp)}")
        location = resp.headers.get("Content-Location")
        if not location:
            raise BulkExportError("export kick-off answered 202 without a Content-Location")
        location = requests.compat.urljoin(url, location)
        self._check(location)
        log.info("bulk_export_started", extra={"event": "bulk_export_started"})
        return location

    def wait(self, status_url: str) -> dict[str, Any]:
        """Poll the status URL until the export is complete; returns the manifest."""
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            resp = self._get(status_url, accept="application/json")
            if resp.status_code == 200:
                try:
                    manifest = resp.json()
                except ValueError:
                    raise BulkExportError("export manifest is not JSON") from None
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output", []), list):
                    raise BulkExportError("export manifest has no output list")
                return manifest
            if resp.status_code not in (202, 429):
                raise BulkExportError(f"export failed: {_diagnostics(resp)}")
            wait = min(MAX_WAIT_SECONDS, retry_after_seconds(resp.headers.get("Retry-After"), self.poll_seconds))
            if time.monotonic() + wait > deadline:
                raise BulkExportError(f"export not complete after {self.timeout_seconds:.0f} s")
            log.info("bulk_export_pending", extra={"event": "bulk_export_pending",
                                                   "detail": (resp.headers.get("X-Progress") or "")[:100]})
            self.sleep(wait)

    def download(self, manifest: dict[str, Any], out_dir: str | Path) -> ExportResult:
        """Download the manifest's output (and error) files into `out_dir` as `<Type>.<n>.ndjson`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with_token = bool(manifest.get("requiresAccessToken", True))
        files: list[Path] = []
        errors: list[str] = []
        for kind in ("output", "error"):
            items = manifest.get(kind) or []
            if not isinstance(items, list):
                raise BulkExportError(f"export manifest {kind} is not a list")
            for n, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                    raise BulkExportError(f"export manifest {kind}[{n}] has no url")
                rtype = item.get("type") if isinstance(item.get("type"), str) else "Unknown"
                if not _SAFE_TYPE.match(rtype):
                    raise BulkExportError(f"export manifest {kind}[{n}] has a bad type")
                name = f"{rtype}.{n:04d}.ndjson" if kind == "output" else f"errors/{rtype}.{n:04d}.ndjson"
                path = out / name
                self._download(requests.compat.urljoin(self.base + "/", item["url"]), path, with_token)
                (files if kind == "output" else errors).append(path if kind == "output" else str(path))
        return ExportResult(files=files, manifest=manifest, errors=errors)

    def _download(self, url: str, path: Path, with_token: bool) -> None:
        resp = self._get(url, accept="application/fhir+ndjson", with_token=with_token, stream=True)
        with resp:
            if resp.status_code != 200:
                raise BulkExportError(f"download of an export file failed: {_diagnostics(resp)}")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            with open(tmp, "wb") as f:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
            tmp.replace(path)

    def run(self, out_dir: str | Path, **kick_off_args: Any) -> ExportResult:
        """Kick off, wait, download."""
        return self.download(self.wait(self.kick_off(**kick_off_args)), out_dir)
