"""FHIR server URLs the access token may be sent to: one normal form, checked and sent as is.

An EHR's `fhirServer` and the `next` links of the Bundles it (or its FHIR server) returns decide
where this service sends the EHR's Bearer token.  A prefix check on the raw string is not enough:
`https://ehr/tenantA/fhir/../../other` starts with the allowlisted prefix, but the HTTP library
removes the dot segments (RFC 3986 section 5.2.4) and sends the token to `/other`; `%2e%2e`, `..%2f`,
`..;/`, `\\`, a raw newline or tab do the same in HTTP libraries or FHIR servers (Tomcat, IIS) that
decode or split differently.

`normalise()` turns a URL into the one form that is both checked and sent:

* only `http`/`https`, an ASCII host (lowercased), no userinfo, a valid port (the default port
  dropped), no fragment, no empty query (`?` alone);
* raw control characters, spaces, backslashes and non-ASCII characters anywhere: rejected;
* percent-encodings of unreserved characters decoded, the others uppercased (RFC 3986 6.2.2);
  characters not allowed in a URI (`|`, `"`, `{`...) percent-encoded, as `requests` would do;
* in the path, dot segments removed (RFC 3986 5.2.4) and anything a server could still read as a
  separator or a dot segment rejected: an encoded `/` or `\\` (`%2F`, `%5C`), an encoded control
  character, a double encoding (`%25`), an encoded dot segment (`%2e%2e`), a `..;param` segment,
  bytes that are not UTF-8.

`FhirUrl.is_under(base)` compares scheme, host, port and path segments.  The gatherer sends
`FhirUrl.text` and checks that `requests` prepared exactly that URL before sending it.

RFC 3986 parsing, validation and dot-segment removal come from `rfc3986` (python-hyper): the
RFC's own algorithms, already tested against its examples; this module adds the policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import rfc3986
from rfc3986 import exceptions as rfc3986_exceptions
from rfc3986 import normalizers, validators

DEFAULT_PORTS = {"http": 80, "https": 443}

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_PCHAR = _UNRESERVED | _SUB_DELIMS | frozenset(":@")
_PATH_CHARS = _PCHAR | frozenset("/")
_QUERY_CHARS = _PCHAR | frozenset("/?")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Raw characters never accepted: C0 controls, space, DEL, backslash (and anything non-ASCII).
_FORBIDDEN_RAW = re.compile(r"[\x00-\x20\x7f\\]")
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?$"
                   r"|^\[[0-9a-f:.]+\]$")
_VALIDATOR = (validators.Validator()
              .allow_schemes("http", "https")
              .require_presence_of("scheme", "host")
              .check_validity_of("scheme", "host", "port", "path", "query"))


class UnsafeUrl(ValueError):
    """The URL cannot be normalised safely; `reason` is a fixed phrase, safe to log (no URL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FhirUrl:
    """A normalised absolute http(s) URL (see the module doc)."""

    scheme: str
    host: str
    port: int | None
    """Explicit non-default port, else None."""
    path: str
    """Starts with `/`; no dot segments."""
    query: str | None

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port is not None else "")

    @property
    def text(self) -> str:
        """The URL exactly as it is sent."""
        return self.origin + self.path + (f"?{self.query}" if self.query is not None else "")

    @property
    def base(self) -> str:
        """The URL without query and without a trailing `/` (for joining a relative path)."""
        return self.origin + self.path.rstrip("/")

    def segments(self) -> tuple[str, ...]:
        """Path segments, a trailing empty one (from a trailing `/`) dropped."""
        parts = self.path.split("/")[1:]
        if parts and parts[-1] == "":
            parts.pop()
        return tuple(parts)

    def is_under(self, base: "FhirUrl") -> bool:
        """Same scheme, host and port, and `base`'s path segments are a prefix of this path's."""
        if (self.scheme, self.host, self.port) != (base.scheme, base.host, base.port):
            return False
        prefix = base.segments()
        return self.segments()[:len(prefix)] == prefix

    def __str__(self) -> str:
        return self.text


def normalise(url: str) -> FhirUrl:
    """The normal form of `url` (see the module doc); raises `UnsafeUrl` with a loggable reason."""
    if not isinstance(url, str) or not url:
        raise UnsafeUrl("empty URL")
    if not url.isascii():
        raise UnsafeUrl("non-ASCII character")
    if _FORBIDDEN_RAW.search(url):
        raise UnsafeUrl("control character, space or backslash")
    if _BAD_PERCENT.search(url):
        raise UnsafeUrl("malformed percent-encoding")
    # Split as RFC 3986 appendix B does: the first "#" starts the fragment (dropped), the first
    # "?" before it starts the query.  rfc3986 parses only what precedes the query; a FHIR search
    # query (thousands of characters of value-set codes) is checked and normalised here in one
    # pass instead of rfc3986's byte-by-byte re-encoding of it.
    before_fragment = url.partition("#")[0]
    head, has_query, raw_query = before_fragment.partition("?")
    try:
        ref = rfc3986.uri_reference(head)
        if ref.scheme:
            ref = ref.copy_with(scheme=ref.scheme.lower())  # schemes are case-insensitive
        _VALIDATOR.validate(ref)
    except rfc3986_exceptions.UnpermittedComponentError:
        raise UnsafeUrl("not an http(s) URL") from None
    except rfc3986_exceptions.MissingComponentError:
        raise UnsafeUrl("not an absolute URL with a host") from None
    except rfc3986_exceptions.RFC3986Exception:
        raise UnsafeUrl("not a valid URL") from None
    if has_query and ("[" in raw_query or "]" in raw_query):
        raise UnsafeUrl("not a valid URL")  # gen-delims not allowed in a query (RFC 3986 3.4)
    authority = ref.authority_info()
    if authority["userinfo"] is not None or "@" in (ref.authority or ""):
        raise UnsafeUrl("userinfo in URL")
    scheme = ref.scheme.lower()
    host = (authority["host"] or "").lower()
    if not _HOST.match(host):
        raise UnsafeUrl("invalid host")
    port: int | None = None
    if authority["port"]:
        port = int(authority["port"])
        if not 0 < port < 65536:
            raise UnsafeUrl("invalid port")
        if port == DEFAULT_PORTS[scheme]:
            port = None
    elif (ref.authority or "").endswith(":"):
        port = None  # "host:" means the default port (RFC 3986 6.2.3)
    return FhirUrl(scheme=scheme, host=host, port=port, path=_normal_path(ref.path or ""),
                   # an empty query is dropped, as `requests` drops it when it prepares the URL
                   query=_normal_component(raw_query, _QUERY_ENCODE) if raw_query else None)


def normalise_allowlist(prefixes: Iterable[str]) -> tuple[FhirUrl, ...]:
    """The allowlist's entries normalised; a bad entry is a configuration error (ValueError)."""
    out = []
    for prefix in prefixes:
        try:
            entry = normalise(prefix)
        except UnsafeUrl as err:
            raise ValueError(f"CDS_FHIR_ALLOWLIST entry is not a usable URL prefix: {err.reason}") from None
        if entry.query is not None:
            raise ValueError("CDS_FHIR_ALLOWLIST entries are URL prefixes without a query")
        out.append(entry)
    return tuple(out)


def allowed(url: FhirUrl, allowlist: Iterable[FhirUrl]) -> bool:
    """Whether `url` lies under one of the (normalised) allowlist entries."""
    return any(url.is_under(prefix) for prefix in allowlist)


def _not_allowed(allowed_chars: frozenset[str]) -> re.Pattern[str]:
    """Matches one ASCII character that is neither in `allowed_chars` nor `%` (callers have
    rejected non-ASCII text and malformed percent-encodings)."""
    return re.compile("[" + "".join(re.escape(chr(code)) for code in range(128)
                                    if chr(code) not in allowed_chars and chr(code) != "%") + "]")


_PATH_ENCODE = _not_allowed(_PATH_CHARS)
_QUERY_ENCODE = _not_allowed(_QUERY_CHARS)


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _normal_component(text: str, not_allowed: re.Pattern[str]) -> str:
    """Decode percent-encoded unreserved characters, uppercase the rest, encode the characters
    not allowed in the component (RFC 3986 6.2.2.1-6.2.2.2)."""
    if "%" in text:
        text = _PERCENT.sub(_decode_unreserved, text)
    # One str.replace per distinct character to encode: a search query repeats the few it has
    # (the "|" of every system|code token) hundreds of times.
    for char in set(not_allowed.findall(text)):
        text = text.replace(char, f"%{ord(char):02X}")
    return text


def _normal_path(path: str) -> str:
    """The path in normal form; rejects what a server could still split or resolve differently."""
    if not path:
        return "/"
    for raw in path.split("/"):
        encoded = {m.upper() for m in _PERCENT.findall(raw)}
        if encoded & {"2F", "5C"}:
            raise UnsafeUrl("encoded slash or backslash in path")
        if "25" in encoded:
            raise UnsafeUrl("double percent-encoding in path")
        if any(int(h, 16) < 0x20 or int(h, 16) == 0x7F for h in encoded):
            raise UnsafeUrl("encoded control character in path")
        decoded = _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), raw)
        if decoded != raw and decoded.split(";", 1)[0] in (".", ".."):
            raise UnsafeUrl("encoded dot segment in path")
        if ";" in raw and raw.split(";", 1)[0] in (".", ".."):
            raise UnsafeUrl("dot segment with parameters in path")
        try:
            bytes(int(h, 16) for h in _PERCENT.findall(raw)).decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeUrl("percent-encoded bytes in path are not UTF-8") from None
    normal = normalizers.remove_dot_segments(_normal_component(path, _PATH_ENCODE))
    return normal if normal.startswith("/") else "/" + normal
