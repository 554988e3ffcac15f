"""Which browser origins may read the service's answers (`CDS_CORS_ORIGINS`).

Accepted forms, comma-separated:

* `*`: any origin (the default; the CDS Hooks Sandbox and browser EHRs on any host).
* an exact origin, `scheme://host[:port]`, e.g. `https://ehr.example.org` (compared exactly,
  case-insensitively for scheme and host, as origins are).
* a wildcard-subdomain origin, `scheme://*.domain[:port]`, e.g. `https://*.example.org`: any
  host that ends in `.example.org` (one or more labels before it), same scheme and port;
  `https://example.org` itself is not included.

Nothing else is accepted (no paths, no other wildcards, no regular expressions): every entry
becomes a fully anchored pattern, so `https://*.example.org` cannot match
`https://xexample.org.attacker.net`.  A malformed entry stops the service at start.

`OriginPolicy.answer_headers` gives the CORS headers of every answer the Flask app writes
(preflight included).  It replaced flask-cors on the hook path, whose per-answer work was a
measurable part of a hook call's fixed cost; it answers exactly what flask-cors 6 answered with
the settings the service used (`origins` from this policy, `send_wildcard` when any origin is
allowed, `allow_headers` `Content-Type` and `Authorization`, methods GET/OPTIONS/POST,
`max_age` 600): tests/test_cors.py compares the two on every kind of request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ENTRY = re.compile(
    r"^(?P<scheme>https?)://(?P<wild>\*\.)?(?P<host>" + _LABEL + r"(?:\." + _LABEL + r")*|\[[0-9a-f:.]+\])"
    r"(?P<port>:[0-9]{1,5})?$")


PREFLIGHT_METHODS = "GET, OPTIONS, POST"
"""`Access-Control-Allow-Methods` (flask-cors's form: sorted, comma-separated)."""
PREFLIGHT_HEADERS = ("content-type", "authorization")
"""Request headers a preflight may ask for (compared case-insensitively)."""
PREFLIGHT_MAX_AGE = "600"
"""Seconds a browser may cache a preflight answer."""


@dataclass(frozen=True)
class OriginPolicy:
    """The parsed `CDS_CORS_ORIGINS`: any origin, or a list of anchored patterns."""

    allow_all: bool
    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def parse(cls, setting: str) -> "OriginPolicy":
        entries = [e.strip() for e in setting.split(",") if e.strip()]
        if not entries or entries == ["*"]:
            return cls(allow_all=True)
        if "*" in entries:
            raise ValueError("CDS_CORS_ORIGINS: '*' cannot be combined with other origins")
        return cls(allow_all=False, patterns=tuple(_compile(e) for e in entries))

    def allows(self, origin: str | None) -> bool:
        """True if a browser at `origin` may read answers."""
        if self.allow_all:
            return True
        return bool(origin) and any(p.match(origin) for p in self.patterns)

    def flask_cors_origins(self) -> str | list[re.Pattern[str]]:
        """The `origins` argument flask-cors would take (the reference the tests compare with)."""
        return "*" if self.allow_all else list(self.patterns)

    def answer_headers(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """CORS headers for an answer of the Flask app to the request described by the WSGI
        `environ` (read directly: werkzeug's header view costs more than the whole check).

        Any origin allowed: `Access-Control-Allow-Origin: *` on every answer, whether or not the
        request named an origin.  Otherwise only a request whose `Origin` matches gets headers
        (its origin echoed, `Vary: Origin`); a missing or refused origin gets none.  A preflight
        (OPTIONS whose `Access-Control-Request-Method` is one of ours) also gets the allowed
        methods, the requested headers we accept, and `Access-Control-Max-Age`.
        """
        origin = environ.get("HTTP_ORIGIN")
        if self.allow_all:
            headers = [("Access-Control-Allow-Origin", "*")]
        elif origin and any(p.match(origin) for p in self.patterns):
            headers = [("Access-Control-Allow-Origin", origin)]
        else:
            return []
        if environ.get("HTTP_ACCESS_CONTROL_REQUEST_PRIVATE_NETWORK") == "true":
            headers.append(("Access-Control-Allow-Private-Network", "false"))
        if environ.get("REQUEST_METHOD", "GET").upper() == "OPTIONS":
            requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", "").upper()
            # A substring test, as flask-cors makes it (`"POST" in "GET, OPTIONS, POST"`).
            if requested and requested in PREFLIGHT_METHODS:
                allowed = _allowed_request_headers(environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))
                if allowed:
                    headers.append(("Access-Control-Allow-Headers", allowed))
                headers.append(("Access-Control-Max-Age", PREFLIGHT_MAX_AGE))
                headers.append(("Access-Control-Allow-Methods", PREFLIGHT_METHODS))
        if not self.allow_all:
            headers.append(("Vary", "Origin"))
        return headers

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """CORS headers for an answer the service writes itself, outside Flask (server-level
        errors).  `origin` is None when the request could not be parsed far enough to know it."""
        if self.allow_all:
            return [("Access-Control-Allow-Origin", "*")]
        if origin and self.allows(origin):
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]


def _allowed_request_headers(requested: str | None) -> str:
    """The requested headers we accept, as the client spelled them, sorted, comma-separated."""
    if not requested:
        return ""
    names = (h.strip() for h in requested.split(","))
    return ", ".join(sorted(h for h in names if h.casefold() in PREFLIGHT_HEADERS))


def _compile(entry: str) -> re.Pattern[str]:
    match = _ENTRY.match(entry.lower())
    if not match:
        raise ValueError(
            f"CDS_CORS_ORIGINS: {entry!r} is not an origin (scheme://host[:port]) or a "
            "wildcard-subdomain origin (scheme://*.domain[:port])")
    scheme, host, port = match["scheme"], match["host"], match["port"] or ""
    subdomains = r"(?:" + _LABEL + r"\.)+" if match["wild"] else ""
    # \Z, not $: `$` also matches before a trailing newline.
    return re.compile(re.escape(scheme + "://") + subdomains + re.escape(host + port) + r"\Z",
                      re.IGNORECASE)
