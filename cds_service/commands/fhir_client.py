"""The command line's own FHIR requests, and one-line messages for what goes wrong with them.

`b12-cds evaluate` and `b12-cds seed` talk to a FHIR server a person named on the command line.
When that fails, the person needs to know what to check (is the server running? is the base URL
right? is the token still valid?), not a stack trace: `CliError` carries that one line, and
`cli.main` prints it.  Nothing here logs; messages name the URL and host the user typed, never a
token.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from cds_service import fhir_url

FHIR_JSON = "application/fhir+json"


class CliError(Exception):
    """A user error: printed as one line (`b12-cds <command>: <message>`), exit status 1."""


class HttpStatusError(CliError):
    """The FHIR server answered with an HTTP error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def checked_base_url(url: str, option: str = "--fhir-server") -> str:
    """`url` without trailing slashes, or CliError when it is not an absolute http(s) URL."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise CliError(f"{option} {url!r} is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CliError(f"{option} {url!r} is not an http(s) URL (expected e.g. http://127.0.0.1:8090/fhir)")
    try:
        fhir_url.normalise(text)  # the service's own check of fhirServer and CDS_FHIR_ALLOWLIST
    except fhir_url.UnsafeUrl as err:
        raise CliError(f"{option} {url!r} is not a usable FHIR base URL ({err.reason})") from None
    return text.rstrip("/")


def _causes(err: BaseException) -> list[BaseException]:
    """`err`, urllib3's `reason`, and their causes and contexts."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or e in seen:
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None) if isinstance(getattr(e, "reason", None), BaseException) else None]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return seen


def connection_message(err: requests.RequestException, url: str) -> str:
    """What went wrong reaching `url`, and what to check, in one line."""
    parts = urlsplit(url)
    host = parts.hostname or url
    where = f"{host}:{parts.port}" if parts.port else host
    causes = _causes(err)
    if isinstance(err, requests.exceptions.SSLError) or any(isinstance(c, ssl.SSLError) for c in causes):
        detail = next((str(getattr(c, "verify_message", "") or getattr(c, "reason", "") or "")
                       for c in causes if isinstance(c, ssl.SSLError)), "")
        hint = f" ({detail})" if detail else ""
        return (f"TLS failure talking to {where}{hint}: check the server's certificate (trusted CA, "
                f"host name), and that the URL's scheme is right (http:// or https://)")
    if any(isinstance(c, (urllib3.exceptions.NameResolutionError, socket.gaierror)) for c in causes):
        return f"cannot resolve host name {host!r}: check the spelling of the URL and your network or DNS"
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return (f"connection refused by {where}: is the FHIR server running, and on this host and "
                f"port?")
    if isinstance(err, requests.Timeout):
        return f"{where} did not answer in time: is the server up and reachable from here?"
    if isinstance(err, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return f"{url!r} is not a usable URL"
    return f"cannot reach {where} ({type(err).__name__}): check the URL and your network"


def status_message(status: int, url: str, *, what: str, base: str) -> str:
    """One line for an HTTP error answer to a request for `what` at `url` (under `base`)."""
    if status == 401:
        return (f"the FHIR server refused the request for {what} (HTTP 401): the token is missing, "
                f"expired or invalid; get a fresh one and pass it with --token")
    if status == 403:
        return (f"the FHIR server does not allow reading {what} (HTTP 403): check the token's "
                f"scopes (e.g. patient/*.read)")
    if status == 404 and what == "the server's CapabilityStatement":
        hint = ""
        if not urlsplit(base).path.rstrip("/").endswith("/fhir"):
            hint = f"; many servers serve FHIR under /fhir: try {base}/fhir"
        return f"no FHIR server at {base} (GET {url} answered 404): check the base URL{hint}"
    return f"the FHIR server answered HTTP {status} to the request for {what} ({url})"


def get_json(session: requests.Session, url: str, *, token: str | None, timeout: float,
             what: str, base: str) -> Any:
    """GET `url` as FHIR JSON; the parsed body, or CliError saying what to check."""
    headers = {"Accept": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = session.get(url, headers=headers, timeout=(min(10.0, timeout), timeout), allow_redirects=False)
    except requests.RequestException as err:
        raise CliError(connection_message(err, url)) from None
    if not 200 <= resp.status_code < 300:
        raise HttpStatusError(status_message(resp.status_code, url, what=what, base=base), resp.status_code)
    try:
        return resp.json()
    except ValueError:
        raise CliError(f"the answer to GET {url} is not JSON: is {base} a FHIR server's base URL?") from None


def diagnose(base: str, patient_read: str, patient_id: str, *, token: str | None, timeout: float = 10.0) -> str | None:
    """Why patient data could not be read from `base`, in one line; None when nothing is wrong.

    Asks what a person would check first: does the server answer (`GET /metadata`), then does
    the patient exist (`patient_read`, the rendered `patient` prefetch template).
    """
    with requests.Session() as session:
        session.trust_env = False
        try:
            get_json(session, f"{base}/metadata", token=token, timeout=timeout,
                     what="the server's CapabilityStatement", base=base)
        except CliError as err:
            # Some servers want a token for /metadata too; a 401 there still says "token".
            return str(err)
        headers = {"Accept": FHIR_JSON, **({"Authorization": f"Bearer {token}"} if token else {})}
        url = f"{base}/{patient_read.lstrip('/')}"
        try:
            resp = session.get(url, headers=headers, timeout=(min(10.0, timeout), timeout), allow_redirects=False)
        except requests.RequestException as err:
            return connection_message(err, url)
        if resp.status_code in (404, 410):
            return (f"no Patient with id {patient_id!r} on {base} (HTTP {resp.status_code}): check --patient "
                    f"(b12-cds seed prints the ids of the demo patients it loads)")
        if not 200 <= resp.status_code < 300:
            return status_message(resp.status_code, url, what=f"Patient {patient_id!r}", base=base)
    return None
