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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ENTRY = re.compile(
    r"^(?P<scheme>https?)://(?P<wild>\*\.)?(?P<host>" + _LABEL + r"(?:\." + _LABEL + r")*|\[[0-9a-f:.]+\])"
    r"(?P<port>:[0-9]{1,5})?$")


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
        """The `origins` argument for flask-cors (compiled patterns are matched as they are)."""
        return "*" if self.allow_all else list(self.patterns)

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """CORS headers for an answer the service writes itself, outside Flask (server-level
        errors).  `origin` is None when the request could not be parsed far enough to know it."""
        if self.allow_all:
            return [("Access-Control-Allow-Origin", "*")]
        if origin and self.allows(origin):
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]


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
