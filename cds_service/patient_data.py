"""Patient data for one hook call: prefetch templates, prefetch resolution, FHIR server fallback.

Discovery publishes one template per key of `record.PREFETCH_KEYS` (`build_prefetch_templates`).
On a hook call `PatientDataGatherer.gather()` takes each key from the request's prefetch when the
EHR sent it, and fetches the rest from `fhirServer`:

- a prefetched value is used as sent (a Bundle contributes its entries; its `next` links are
  followed when the FHIR server may be called);
- a `null` value means "the EHR has no data": nothing is fetched;
- an absent key, or a value that is an OperationOutcome (or a Bundle holding only
  OperationOutcomes), is fetched from `fhirServer` with `Authorization: Bearer <access_token>`.

Outbound safety: every URL the token is sent to (`fhirServer`, each query, each `next` link) is
first put in one normal form (`fhir_url.normalise`: RFC 3986 dot segments removed, unreserved
characters decoded; control characters, backslashes, encoded slashes or dots, userinfo rejected)
and that form is what is checked and what is sent (`requests` must prepare exactly it).  Calls go
only to a `fhirServer` under `CDS_FHIR_ALLOWLIST` (scheme + host + port + path segments);
redirects are never followed; bodies are read streaming and capped at `fhir_max_response_bytes`;
`next` links must stay under `fhirServer`; the token goes nowhere else.  All fetches of one call
run concurrently, one thread per key, and share one deadline (`fhir_deadline`) that bounds every
read: at the deadline the late requests' sockets are shut down and their threads joined
(`deadline_http`), so nothing a call started outlives it.  Whatever goes wrong on the wire
(non-2xx, HTML, truncated JSON, a non-Bundle search answer, a timeout) makes that key
unavailable; it never raises out of `gather()`.  Only a missing Patient or Conditions (or a
missing key with a `fhirServer` we may not call) is fatal: `CdsError(412)` naming the keys.

Resources are checked structurally only here (a dict with a known `resourceType`, about the
context patient); full R4B validation happens in the facts layer on the resources the rules use.
"""

from __future__ import annotations

import http.cookiejar
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import requests

from cds_service import facts, fhir_url, wire
from cds_service.config import Settings
from cds_service.deadline_http import JOIN_GRACE_SECONDS, AbortableAdapter, CallAbort
from cds_service.gate_memo import GateMemo, GateVerdict
from cds_service.logs import get_logger
from cds_service.protocol import CdsError, HookRequest, invalid_json
from cds_service.retry_after import retry_after_seconds
from cds_service.record import PREFETCH_KEYS, REQUIRED_KEYS, PatientRecord, Resource

log = get_logger("patient_data")

KNOWN_RESOURCE_TYPES: frozenset[str] = frozenset({
    "Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement",
    "Procedure", "ServiceRequest", "Medication",
})
"""Resource types the rules can use; anything else in a Bundle is skipped and counted."""
Needed = Callable[[Mapping[str, Any]], bool]
"""Whether the rules can use a resource, judged from its head (`facts.resource_needed`, bound to
the engine's knowledge): a resource for which it is False is dropped (a raw one is never
decoded)."""

SEARCH_COUNT = 100
"""`_count` of the unfiltered searches (page size; pages are followed up to fhir_max_pages)."""
CODED_SEARCH_COUNT = 50
"""`_count` of the code-filtered searches."""

FHIR_JSON = "application/fhir+json"
_TOKEN_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_CHUNK_BYTES = 64 * 1024
_RETRY_STATUSES = frozenset({429, 503})
_DEFAULT_RETRY_DELAY = 0.1
"""Wait before the single retry on 429/503 when the server gives no Retry-After."""


class TemplateError(ValueError):
    """A prefetch template could not be rendered (unknown or valueless token)."""


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def _fhir_token_value(system: str, code: str) -> str:
    """`system|code` for a token search, FHIR-escaped and URL-encoded (`|` and `,` stay literal)."""
    def esc(text: str) -> str:
        text = text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")
        return quote(text, safe=":/.-_~")
    return f"{esc(system)}|{esc(code)}" if system else esc(code)


def _token_list(codes: Iterable[tuple[str, str]]) -> str:
    """Comma-separated, de-duplicated, sorted (stable templates) `system|code` list."""
    return ",".join(sorted({_fhir_token_value(s, c) for s, c in codes if c}))


@dataclass(frozen=True)
class SearchSpec:
    """One prefetch key's search, stated in terms of what the fact matcher reads.

    `valuesets` are the matcher's value sets (taken from the `facts` constants, never listed
    here) that this search exists to find.  With a `param`, the search is a token equality list
    of their exact codes on that parameter; without one it is unfiltered and `unfiltered_because`
    says why a code filter would lose entries the matcher accepts.
    """

    resource_type: str
    valuesets: frozenset[str]
    param: str | None = None
    """Token search parameter for the value sets' codes; None: no code filter."""
    status: frozenset[str] = frozenset()
    """`status` filter (a facts constant: the statuses the matcher counts); empty: none."""
    sort: str = ""
    count: int = CODED_SEARCH_COUNT
    unfiltered_because: str = ""


SEARCHES: dict[str, SearchSpec] = {
    "conditions": SearchSpec(
        "Condition", facts.CONDITION_SETS, count=SEARCH_COUNT,
        unfiltered_because="ICD-10-CM families (E11, K50...) cannot be a token search; dot-less "
                           "and lower-case ICD-10-CM spellings; resolved surgical history still counts"),
    # combo-code (FHIR R4: Observation.code or component.code) also finds panels that send
    # B12/MMA as components under a panel code of their own.
    "labResults": SearchSpec("Observation", facts.LAB_SETS, "combo-code", sort="-date"),
    # Findings by code and by value: the matcher reads every FINDING_SETS set both ways (a diet
    # recorded as an Observation *coded* "vegetarian diet", or a "diet" Observation whose value
    # is "vegan diet"; a neurological exam whose value is "paraesthesia").
    "findings": SearchSpec("Observation", facts.FINDING_SETS, "code"),
    "findingValues": SearchSpec("Observation", facts.FINDING_SETS, "value-concept"),
    "medicationRequests": SearchSpec(
        "MedicationRequest", facts.MEDICATION_SETS, count=SEARCH_COUNT,
        unfiltered_because="medications match by ingredient name in text, by product codes we do "
                           "not list, and by reference to a Medication (its code is not on the request)"),
    "medicationStatements": SearchSpec(
        "MedicationStatement", facts.MEDICATION_SETS, count=SEARCH_COUNT,
        unfiltered_because="as medicationRequests"),
    "procedures": SearchSpec(
        "Procedure", frozenset({facts.SURGERY_SET}), count=SEARCH_COUNT,
        unfiltered_because="surgical history is small and coded with local procedure codes"),
    "serviceRequests": SearchSpec(
        "ServiceRequest", facts.LAB_SETS, status=facts.PENDING_ORDER, count=SEARCH_COUNT,
        unfiltered_because="B12/MMA orders coded only with the EHR's own orderable code are recognised "
                           "by the test's name in their text or display (lab-name synonyms)"),
}
"""Prefetch key -> its search.  A value set added to a facts constant flows into discovery and
fallback with no edit here; tests/test_query_coverage.py fails when the matcher reads a value
set (or a resource) that no search here asks for."""


def build_prefetch_templates(valueset_codes: Callable[[str], list[tuple[str, str]]]) -> dict[str, str]:
    """The discovery prefetch templates, one per `record.PREFETCH_KEYS` entry, from `SEARCHES`.

    Only the spec's "valid" template subset is used: an instance read, type searches by
    `patient`, token equality lists (`system|code,...`), `_count` and `_sort`.  Code filters come
    from the value sets via `valueset_codes(name) -> [(system, code), ...]`; a value set that
    yields no codes leaves its search unfiltered (a superset: the rules match codes themselves)
    and logs a warning.  The fallback runs these same templates, so the two modes ask for the
    same data.
    """
    patient = "patient={{context.patientId}}"

    def search(spec: SearchSpec) -> str:
        parts = [f"{spec.resource_type}?{patient}"]
        if spec.param:
            names = sorted(spec.valuesets)
            codes = _token_list(c for name in names for c in valueset_codes(name))
            if codes:
                parts.append(f"{spec.param}={codes}")
            else:
                log.warning("valueset_empty", extra={"event": "valueset_empty", "detail": ",".join(names)})
        if spec.status:
            parts.append("status=" + ",".join(sorted(spec.status)))
        if spec.sort:
            parts.append(f"_sort={spec.sort}")
        parts.append(f"_count={spec.count}")
        return "&".join(parts)

    templates = {"patient": "Patient/{{context.patientId}}"}
    templates.update((key, search(spec)) for key, spec in SEARCHES.items())
    assert tuple(templates) == PREFETCH_KEYS, "templates must cover exactly record.PREFETCH_KEYS"
    return templates


def render_template(template: str, token_values: Mapping[str, str]) -> str:
    """Replace every `{{token}}` with its URL-encoded value.

    A token without a (non-empty) value raises `TemplateError`: an empty substitution would
    silently widen the query (e.g. `Condition?patient=` could match every patient).
    """
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        value = token_values.get(name)
        if not isinstance(value, str) or not value:
            raise TemplateError(f"prefetch token {{{{{name}}}}} has no value")
        return quote(value, safe="")

    return _TOKEN_RE.sub(substitute, template)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatherResult:
    """The patient record of one hook call and how it was obtained (counts only, no data)."""

    record: PatientRecord
    fetched_keys: tuple[str, ...] = ()
    """Keys fetched (completely) from the FHIR server."""
    failed_keys: tuple[str, ...] = ()
    """Keys whose data could not be had, or only in part (also in `record.unavailable`)."""
    skipped_resources: int = 0
    """Entries dropped as structurally invalid (not a dict, unknown type, another patient)."""
    fhir_calls: int = 0
    """HTTP requests made to the FHIR server (retries included)."""


@dataclass
class _KeyData:
    """What one prefetch key contributed."""

    resources: list[Resource] = field(default_factory=list)
    skipped: int = 0
    calls: int = 0
    ok: bool = True
    """False when the key's data could not be had, or only partly (failed fetch, page limit)."""
    fetched: bool = False
    reason: str = ""
    dropped: set[tuple[str, str]] = field(default_factory=set)
    """(type, id) of the resources the gate dropped.  `PatientRecord.from_resources` keeps the
    first copy of a type/id, so a later copy (another version of it) must not take the place of
    a dropped one: without the gate the dropped copy would have been kept and this one ignored."""


class _FetchFailed(Exception):
    """One FHIR request failed; the message is a short reason fit for logs (no URL, no data)."""


def _open_prefetch(value: Any) -> Any:
    """A prefetch value as `gather` reads it: a raw one opened (`wire.open_prefetch_value`:
    a `LazyBundle`, or the decoded value), anything else (a `LazyBundle` already) as it is."""
    if type(value) is not wire.RawJson:
        return value
    try:
        return wire.open_prefetch_value(value)
    except orjson.JSONDecodeError as err:
        raise invalid_json(err) from None


# ---------------------------------------------------------------------------------------------
# Allowlist
# ---------------------------------------------------------------------------------------------


def url_allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether `url`, once normalised (`fhir_url.normalise`), lies under one of `prefixes`."""
    try:
        return fhir_url.allowed(fhir_url.normalise(url), fhir_url.normalise_allowlist(prefixes))
    except (fhir_url.UnsafeUrl, ValueError):
        return False


def _checked_next(link: str, base: fhir_url.FhirUrl) -> fhir_url.FhirUrl:
    """A `next` link in normal form, under `base`; `_FetchFailed` naming why not (no URL)."""
    try:
        nxt = fhir_url.normalise(link)
    except fhir_url.UnsafeUrl as err:
        raise _FetchFailed(f"next link rejected ({err.reason})") from None
    if not nxt.is_under(base):
        raise _FetchFailed("next link outside fhirServer")
    return nxt


# ---------------------------------------------------------------------------------------------
# Resource checks
# ---------------------------------------------------------------------------------------------


def _is_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _bundle_resources(bundle: Resource) -> list[Any]:
    """The `entry[].resource` values of a Bundle (entries without a resource are kept as None)."""
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return []
    return [e.get("resource") if isinstance(e, dict) else None for e in entries]


def _needs_fetch(value: Any) -> bool:
    """An OperationOutcome, or a Bundle whose entries are all OperationOutcomes: not data."""
    if value is None:
        return False  # "no data"
    if isinstance(value, wire.LazyBundle):
        return False  # judged as its entries are read (`_accept_raw` counts the OperationOutcomes)
    if _is_outcome(value):
        return True
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        # Lazily: a data Bundle is recognised at its first entry, without copying its entries.
        return (isinstance(entries, list) and bool(entries)
                and all(isinstance(e, dict) and _is_outcome(e.get("resource")) for e in entries))
    return not isinstance(value, dict)  # a string, list or number is not a prefetch value


def _next_link(bundle: Resource) -> str | None:
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


_SUBJECT_FIELDS = ("subject", "patient")


def _about_patient(resource: Resource, patient_id: str) -> bool:
    """Whether a resource belongs to the context patient (Medication has no subject: True)."""
    rtype = resource["resourceType"]
    if rtype == "Medication":
        return True
    if rtype == "Patient":
        return resource.get("id") == patient_id
    for name in _SUBJECT_FIELDS:
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            if ref["reference"] == f"Patient/{patient_id}":  # the common case, no string surgery
                return True
            path = ref["reference"].split("/_history/", 1)[0].rstrip("/")
            return path == f"Patient/{patient_id}" or path.endswith(f"/Patient/{patient_id}")
    return False


def _accept(candidates: Iterable[Any], patient_id: str, into: _KeyData,
            needed: Needed | None = None) -> int:
    """Keep structurally usable resources the rules can use; count the unusable ones
    (OperationOutcome entries, and resources the rules cannot use, are neither).  Returns the
    number of OperationOutcomes passed over."""
    keep = into.resources.append
    dropped = into.dropped
    own_reference = f"Patient/{patient_id}"
    outcomes = 0
    for res in candidates:  # runs for every resource: the common case is checked inline
        rtype = res.get("resourceType") if type(res) is dict else None
        if rtype == "OperationOutcome":
            outcomes += 1
            continue
        if type(rtype) is str and rtype in KNOWN_RESOURCE_TYPES:
            subject = res.get("subject")
            if (type(subject) is dict and subject.get("reference") == own_reference) \
                    or _about_patient(res, patient_id):
                if needed is None:
                    keep(res)
                elif _gate(needed(res), rtype, res.get("id"), dropped):
                    keep(res)
                continue
        into.skipped += 1
    return outcomes


def _gate(needed: bool, rtype: str, rid: Any, dropped: set[tuple[str, str]]) -> bool:
    """Whether to keep a resource the gate judged `needed`; records the dropped ones.  A needed
    copy of a type/id already dropped is not kept either (see `_KeyData.dropped`)."""
    if type(rid) is not str:
        return needed
    if not needed:
        dropped.add((rtype, rid))
        return False
    return not dropped or (rtype, rid) not in dropped


def _unshadowed(resources: list[Resource], dropped: list[set[tuple[str, str]]]) -> list[Resource]:
    """`resources` without those whose type/id the gate dropped earlier (in any of the
    `_KeyData.dropped` sets given; empty ones may be left out)."""
    if not dropped:
        return resources
    return [r for r in resources if type(r.get("id")) is not str
            or not any((r.get("resourceType"), r["id"]) in d for d in dropped)]


def _accept_raw(bundle: wire.LazyBundle, patient_id: str, into: _KeyData, needed: Needed | None,
                needed_head: Callable[[wire.Head], bool] | None = None, memo: GateMemo | None = None) -> int:
    """`_accept` for a Bundle still in raw form: the checks run on each resource's head
    (`wire.LazyBundle.head`) and only the resources kept are decoded (`CdsError(400)` if one is
    not valid JSON after all).  Returns the number of OperationOutcomes passed over.

    With `memo` (for `needed_head`'s answers), a Bundle seen before is read through it
    (`_accept_raw_remembered`): the same decisions, most without decoding a head."""
    raws = bundle.raws
    if memo is not None and needed_head is not None and raws and memo.enabled:
        memo.bind(needed_head)
        first = raws[0]
        if memo.remembers_bundle(hash(bytes(first)), len(first), len(raws)):
            return _accept_raw_remembered(raws, patient_id, into, needed, needed_head, memo)
    keep = into.resources.append
    dropped = into.dropped
    own_reference = f"Patient/{patient_id}"
    gate = needed_head or needed
    decode_head = wire.HEAD_DECODER.decode  # inlined `wire.typed_head`: this runs per resource
    head_errors = wire.HEAD_DECODE_ERRORS
    decode = wire.decode_resource
    outcomes = 0
    try:
        for raw in bundle.raws:
            try:
                head = decode_head(raw)
            except head_errors:  # no resource, not an object, or an unusual head: as a dict
                outcomes += _accept_dict_head(raw, patient_id, into, needed)
                continue
            rtype = head.resourceType
            if rtype == "OperationOutcome":
                outcomes += 1
                continue
            if rtype in KNOWN_RESOURCE_TYPES:
                subject = head.subject
                if (subject is not None and subject.reference == own_reference) \
                        or _about_patient(wire.head_as_dict(head), patient_id):
                    if gate is None:
                        keep(decode(raw))
                    elif gate(head):
                        if not dropped or head.id is None or (rtype, head.id) not in dropped:
                            keep(decode(raw))
                    elif (rid := head.id) is not None:
                        dropped.add((rtype, rid))  # see _KeyData.dropped
                    continue
            into.skipped += 1
    except orjson.JSONDecodeError as err:
        raise invalid_json(err) from None
    return outcomes


def _accept_raw_remembered(raws: list[wire.RawJson], patient_id: str, into: _KeyData,
                           needed: Needed | None, gate: Callable[[wire.Head], bool], memo: GateMemo) -> int:
    """`_accept_raw`'s loop through `memo`: a resource whose bytes are remembered is acted on
    from its `GateVerdict` (kept and decoded, dropped, counted as skipped or as an
    OperationOutcome) exactly as its head would have decided; any other is judged from its head
    as in `_accept_raw`, and remembered when the verdict depends on nothing but its bytes and
    the context patient's reference (see `cds_service.gate_memo`)."""
    keep = into.resources.append
    dropped = into.dropped
    own_reference = f"Patient/{patient_id}"
    decode_head = wire.HEAD_DECODER.decode
    head_errors = wire.HEAD_DECODE_ERRORS
    decode = wire.decode_resource
    remembered = memo.get
    remember = memo.put
    known_types = KNOWN_RESOURCE_TYPES
    outcomes = 0
    try:
        for raw in raws:
            key = hash(bytes(raw))
            length = len(raw)
            verdict = remembered(key, length)
            if verdict is not None:
                rtype = verdict.resource_type
                if rtype == "OperationOutcome":
                    outcomes += 1
                    continue
                if rtype not in known_types:
                    into.skipped += 1
                    continue
                if verdict.subject_reference == own_reference:
                    rid = verdict.resource_id
                    if verdict.needed:
                        if not dropped or rid is None or (rtype, rid) not in dropped:
                            keep(decode(raw))
                    elif rid is not None:
                        dropped.add((rtype, rid))  # see _KeyData.dropped
                    continue
                # another patient's, or a reference in another form: judged from the head below
            try:
                head = decode_head(raw)
            except head_errors:  # no resource, not an object, or an unusual head: as a dict
                outcomes += _accept_dict_head(raw, patient_id, into, needed)
                continue
            rtype = head.resourceType
            if rtype == "OperationOutcome":
                remember(key, GateVerdict(length, rtype, None, None, False))
                outcomes += 1
                continue
            if rtype in known_types:
                subject = head.subject
                if subject is not None and subject.reference == own_reference:
                    is_needed = gate(head)
                    remember(key, GateVerdict(length, rtype, head.id, own_reference, is_needed))
                    if is_needed:
                        if not dropped or head.id is None or (rtype, head.id) not in dropped:
                            keep(decode(raw))
                    elif (rid := head.id) is not None:
                        dropped.add((rtype, rid))  # see _KeyData.dropped
                    continue
                if _about_patient(wire.head_as_dict(head), patient_id):
                    if gate(head):  # (not remembered: the reference is in another form)
                        if not dropped or head.id is None or (rtype, head.id) not in dropped:
                            keep(decode(raw))
                    elif (rid := head.id) is not None:
                        dropped.add((rtype, rid))
                    continue
            elif type(rtype) is str:
                remember(key, GateVerdict(length, rtype, None, None, False))  # a type the rules never use
            into.skipped += 1
    except orjson.JSONDecodeError as err:
        raise invalid_json(err) from None
    return outcomes


def _accept_dict_head(raw: wire.RawJson, patient_id: str, into: _KeyData, needed: Needed | None) -> int:
    """`_accept_raw` for one resource without a typed head: judged on its dict head
    (`wire.dict_head`), or decoded in full when it has none (not an object...).  Returns 1 for
    an OperationOutcome, else 0."""
    head = wire.dict_head(raw)
    if head is None:
        return _accept([wire.decode_resource(raw)], patient_id, into, needed)
    rtype = head.get("resourceType")
    if rtype == "OperationOutcome":
        return 1
    if type(rtype) is str and rtype in KNOWN_RESOURCE_TYPES:
        subject = head.get("subject")
        if (type(subject) is dict and subject.get("reference") == f"Patient/{patient_id}") \
                or _about_patient(head, patient_id):
            if needed is None or _gate(needed(head), rtype, head.get("id"), into.dropped):
                into.resources.append(wire.decode_resource(raw))
            return 0
    into.skipped += 1
    return 0


_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_MEDICATION_HOLDERS = frozenset({"MedicationRequest", "MedicationStatement"})
_MEDICATION_JOB = "medication-references-"
MEDICATION_BATCH = 50
"""Medication ids per `Medication?_id=` read (keeps the URL short)."""
MEDICATION_BATCHES = 4
"""Reads of referenced Medications per hook call (so at most 200 distinct Medications)."""


def _medication_id(reference: str, server: fhir_url.FhirUrl | None) -> str | None:
    """The id of a `Medication/<id>` reference, relative or absolute under `server`, else None."""
    if "://" in reference:
        if server is None:
            return None
        try:
            url = fhir_url.normalise(reference)
        except fhir_url.UnsafeUrl:
            return None
        if url.query is not None or not url.is_under(server):
            return None
        segments = url.segments()[len(server.segments()):]
    else:
        segments = tuple(reference.split("/"))
    if len(segments) == 4 and segments[2] == "_history":
        segments = segments[:2]  # a version-specific reference: the Medication it is a version of
    if len(segments) != 2 or segments[0] != "Medication" or not _FHIR_ID.fullmatch(segments[1]):
        return None
    return segments[1]


def _medication_references(templates: Iterable[str], data: Mapping[str, _KeyData],
                           server: fhir_url.FhirUrl | None) -> tuple[dict[str, set[str]], set[str]]:
    """(Medication id -> keys referring to it, not yet gathered; keys with a reference that
    cannot be read from `server`)."""
    have = {r.get("id") for kd in data.values() for r in kd.resources if r.get("resourceType") == "Medication"}
    wanted: dict[str, set[str]] = {}
    unresolvable: set[str] = set()
    for key in templates:
        for res in data[key].resources:
            if res.get("resourceType") not in _MEDICATION_HOLDERS:
                continue
            ref = res.get("medicationReference")
            target = ref.get("reference") if isinstance(ref, dict) else None
            if not isinstance(target, str) or target.startswith("#"):
                continue  # inline code, display only, or a contained Medication
            mid = _medication_id(target, server)
            if mid is None:
                unresolvable.add(key)
            elif mid not in have:
                wanted.setdefault(mid, set()).add(key)
    return wanted, unresolvable


# ---------------------------------------------------------------------------------------------
# The gatherer
# ---------------------------------------------------------------------------------------------


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Never store cookies: one session serves every patient and every EHR token."""

    def set_ok(self, cookie: Any, request: Any) -> bool:  # noqa: D401
        return False


class PatientDataGatherer:
    """Resolves prefetch and fetches what is missing; one per app (holds a pooled Session)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or ~/.netrc credentials from the environment
        self.session.max_redirects = 0
        self.session.cookies.set_policy(_NoCookies())
        # Every request of a hook call can be cut off at its deadline (deadline_http).
        adapter = AbortableAdapter(pool_connections=8, pool_maxsize=32, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"Accept": FHIR_JSON, "Accept-Encoding": "gzip, deflate",
                                     "User-Agent": "b12-neck-cds"})
        self._templates: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self.gate_memo = GateMemo(settings.gate_memo_entries)
        """What the gate decided about resources seen before (`cds_service.gate_memo`)."""
        # Normalised once: a bad entry is a configuration error at start, not a silent no-match.
        self.allowlist = fhir_url.normalise_allowlist(settings.fhir_allowlist_prefixes)

    def close(self) -> None:
        self.session.close()

    # -- discovery ------------------------------------------------------------------------------

    def prefetch_templates(self, hook: str, engine: Any) -> dict[str, str]:
        """The prefetch templates for `hook` (built once from the engine's value sets)."""
        with self._lock:
            cached = self._templates.get(hook)
            if cached is None:
                cached = build_prefetch_templates(engine.valueset_codes)
                self._templates[hook] = cached
        return dict(cached)

    # -- hook calls -----------------------------------------------------------------------------

    def gather(self, request: HookRequest, templates: Mapping[str, str],
               needed: Needed | None = None,
               needed_head: Callable[[wire.Head], bool] | None = None) -> GatherResult:
        """Resolve every template key from prefetch, else the FHIR server (see module doc).

        With `needed` (the engine's `resource_needed`), only the resources the rules can use are
        kept, and prefetched Bundles still in raw form (`wire`) are decoded only that far;
        `needed_head` (the engine's `head_needed`) is the same test for typed heads, faster.

        Raises `CdsError(412)` when the Patient or Conditions cannot be had, or when data is
        missing and `fhirServer` is not on the allowlist; `CdsError(400)` when a raw prefetch
        value turns out not to be valid JSON.  Never raises for wire problems.
        """
        started = time.monotonic()
        deadline = started + max(0.0, self.settings.fhir_deadline)
        patient_id = request.context.patient_id
        server = request.fhir_server
        server_url: fhir_url.FhirUrl | None = None
        server_problem = "not on this service's allowlist (CDS_FHIR_ALLOWLIST)"
        if server:
            try:
                server_url = fhir_url.normalise(server)
            except fhir_url.UnsafeUrl as err:
                server_problem = f"not a usable URL ({err.reason})"
        server_ok = server_url is not None and fhir_url.allowed(server_url, self.allowlist)

        data: dict[str, _KeyData] = {}
        to_fetch: list[str] = []
        to_continue: dict[str, str] = {}  # key -> next link of a prefetched Bundle
        skipped_prefetch = 0  # rejected single-resource prefetch values (fetched instead)
        prefetch = {key: _open_prefetch(request.prefetch[key]) for key in templates if key in request.prefetch}
        for key in templates:
            if key not in prefetch or _needs_fetch(prefetch[key]):
                to_fetch.append(key)
                continue
            value = prefetch[key]
            kd = data[key] = _KeyData()
            if value is None:
                continue  # the EHR has no data for this key
            if isinstance(value, wire.LazyBundle) or value.get("resourceType") == "Bundle":
                if isinstance(value, wire.LazyBundle):
                    outcomes = _accept_raw(value, patient_id, kd, needed, needed_head, self.gate_memo)
                    if outcomes and outcomes == len(value.raws):  # only OperationOutcomes: not data
                        del data[key]  # (nothing was kept, skipped or dropped)
                        to_fetch.append(key)
                        continue
                    nxt = _next_link({"link": value.link})
                else:
                    _accept(_bundle_resources(value), patient_id, kd, needed)
                    nxt = _next_link(value)
                if nxt and server_ok:
                    try:
                        to_continue[key] = _checked_next(nxt, server_url)  # type: ignore[arg-type]
                    except _FetchFailed as err:  # the token goes nowhere but under fhirServer
                        kd.ok, kd.reason = False, str(err)
            else:
                _accept([value], patient_id, kd)  # a single resource: kept whatever it is
                if not kd.resources:  # a single resource of another patient or unknown type
                    del data[key]
                    to_fetch.append(key)
                    skipped_prefetch += kd.skipped

        if to_fetch and server and not server_ok:
            log.warning("fhir_server_not_allowed", extra={
                "event": "fhir_server_not_allowed", "hook_instance": request.hook_instance,
                "keys_failed": to_fetch, "reason": server_problem})
            raise CdsError(412, f"fhirServer is {server_problem} "
                                f"and these prefetch keys are missing: {', '.join(to_fetch)}")

        if server_ok and (to_fetch or to_continue):
            self._fetch_all(request, server_url, templates, to_fetch, to_continue,  # type: ignore[arg-type]
                            data, deadline)
        for key in to_fetch:
            data.setdefault(key, _KeyData(ok=False, reason="no fhirServer"))
        medications = self._resolve_medications(request, templates, data,
                                                server_url if server_ok else None, deadline)

        unavailable = [k for k in templates if not data[k].ok]
        fetched = tuple(k for k in templates if data[k].fetched and data[k].ok)
        calls = sum(kd.calls for kd in data.values())
        skipped = skipped_prefetch + sum(kd.skipped for kd in data.values())
        # The hook's own log line carries the counts; this line adds the per-key failure reasons
        # and the fetch time, so at INFO it is written only when the FHIR server was involved.
        level = logging.INFO if (calls or unavailable) else logging.DEBUG
        if log.isEnabledFor(level):  # the all-prefetch case is DEBUG: nothing built for it
            log.log(level, "gather", extra={
                "event": "gather", "hook_instance": request.hook_instance,
                "keys_fetched": list(fetched) or None, "keys_failed": unavailable or None,
                "reason": ";".join(f"{k}:{data[k].reason}" for k in unavailable) or None,
                "fhir_calls": calls, "skipped_resources": skipped,
                "duration_ms": round((time.monotonic() - started) * 1000, 2)})

        missing_required = [k for k in templates
                            if k in REQUIRED_KEYS and not data[k].ok and not data[k].resources]
        if "patient" in data and "patient" not in missing_required and not any(
                r.get("resourceType") == "Patient" for r in data["patient"].resources):
            missing_required.insert(0, "patient")  # e.g. prefetched as null: nothing to evaluate
        if missing_required:
            raise CdsError(412, "required FHIR data could not be obtained (not prefetched"
                                + (", and the FHIR server did not provide it" if server_ok else
                                   ", and no usable fhirServer was given")
                                + f"): {', '.join(missing_required)}")

        resources: list[Resource] = []
        dropped: list[set[tuple[str, str]]] = []  # by the gate, in the keys before this one
        for k in templates:  # (not merged into one set: the kept resources are few, the dropped many)
            kd = data[k]
            resources += _unshadowed(kd.resources, dropped)
            if kd.dropped:
                dropped.append(kd.dropped)
        resources += medications
        drafts = []
        if request.context.draft_orders:
            drafts = [r for r in _bundle_resources(request.context.draft_orders) if isinstance(r, dict)]
        record = PatientRecord.from_resources(resources, draft_orders=drafts,
                                              unavailable=frozenset(unavailable))
        return GatherResult(record=record, fetched_keys=fetched, failed_keys=tuple(unavailable),
                            skipped_resources=skipped, fhir_calls=calls)

    # -- medications given by reference -------------------------------------------------------

    def _resolve_medications(self, request: HookRequest, templates: Mapping[str, str],
                             data: dict[str, _KeyData], server: fhir_url.FhirUrl | None,
                             deadline: float) -> list[Resource]:
        """The Medication resources that gathered MedicationRequests/Statements refer to and
        that neither prefetch nor the searches supplied, read from `fhirServer`.

        The spec's prefetch template subset has no `_include`, so an EHR satisfying our templates
        sends the requests without their Medications.  Both data modes then read them the same
        way: `Medication?_id=a,b,...` against `fhirServer` (allowlist, token, deadline, size cap
        and paging as for every fetch), in at most `MEDICATION_BATCHES` batches.  A reference
        that cannot be resolved (no usable fhirServer, not found, a failed read, another
        server's URL) makes the key that holds it unavailable: its medications were not fully
        checked.  Contained (`#id`) Medications need no read.
        """
        wanted, unresolvable = _medication_references(templates, data, server)
        if not wanted and not unresolvable:
            return []
        ids = sorted(wanted)
        batches = [ids[i:i + MEDICATION_BATCH] for i in range(0, len(ids), MEDICATION_BATCH)]
        found: dict[str, Resource] = {}
        why = "no fhirServer"
        if server is not None:
            jobs = {f"{_MEDICATION_JOB}{n}": f"Medication?_id={','.join(batch)}&_count={len(batch)}"
                    for n, batch in enumerate(batches[:MEDICATION_BATCHES])}
            self._fetch_all(request, server, jobs, list(jobs), {}, data, deadline)
            why = "not found"
            for job in jobs:
                kd = data[job]
                if not kd.ok:
                    why = kd.reason or "read failed"
                    continue  # part of a failed read is not used
                for res in kd.resources:
                    rid = res.get("id")
                    if res.get("resourceType") == "Medication" and rid in wanted:
                        found.setdefault(rid, res)
        failed = {key: "medication reference not readable from fhirServer" for key in unresolvable}
        for mid, keys in wanted.items():
            if mid not in found:
                failed.update((key, f"medication reference unresolved ({why})") for key in keys)
        for key, reason in failed.items():
            kd = data[key]
            if kd.ok:
                kd.ok, kd.reason = False, reason
        return list(found.values())

    # -- fetching -------------------------------------------------------------------------------

    def _fetch_all(self, request: HookRequest, server: fhir_url.FhirUrl, templates: Mapping[str, str],
                   to_fetch: list[str], to_continue: dict[str, fhir_url.FhirUrl],
                   data: dict[str, _KeyData], deadline: float) -> None:
        """Run every key's fetch concurrently, one thread per key; keys unfinished at the deadline
        are failures.  At the deadline the threads' sockets are shut down and the threads joined:
        nothing started here outlives the call (see `deadline_http`)."""
        headers = {}
        if request.fhir_authorization is not None:
            headers["Authorization"] = f"Bearer {request.fhir_authorization.access_token}"
        tokens = request.context.token_values()
        patient_id = request.context.patient_id

        jobs: dict[str, tuple[fhir_url.FhirUrl, bool]] = {}  # key -> (first URL, is an instance read)
        for key in to_fetch:
            try:
                rendered = render_template(templates[key], tokens)
                url = fhir_url.normalise(f"{server.base}/{rendered.lstrip('/')}")
            except TemplateError as err:
                data[key] = _KeyData(ok=False, reason=str(err))
                continue
            except fhir_url.UnsafeUrl as err:
                data[key] = _KeyData(ok=False, reason=f"query URL rejected ({err.reason})")
                continue
            if not url.is_under(server):  # e.g. a patient id of ".." resolved away
                data[key] = _KeyData(ok=False, reason="query URL outside fhirServer")
                continue
            jobs[key] = (url, "?" not in templates[key])
        for key, nxt in to_continue.items():
            jobs[key] = (nxt, False)
        if not jobs:
            return

        # Every first request is prepared here, before any thread starts: a started thread holds
        # the GIL while it prepares (requests re-parses the URL, ~0.1-0.5 ms for a value-set
        # search), and `Thread.start` waits for it, so preparing in the threads staggered the
        # sends by the sum of those times instead of letting them all go out at once.
        first_requests: dict[str, requests.PreparedRequest | None] = {}
        for key, (url, _is_read) in jobs.items():
            try:
                first_requests[key] = self._prepare(url, headers)
            except _FetchFailed:
                first_requests[key] = None  # the thread prepares it again and fails the same way

        call = CallAbort()
        running: dict[str, tuple[threading.Thread, _KeyData]] = {}
        try:
            for key, (url, is_read) in jobs.items():
                kd = _KeyData(fetched=key in to_fetch)
                thread = threading.Thread(
                    target=self._fetch_key, name=f"fhir-fetch-{key}", daemon=True,
                    args=(url, server, headers, patient_id, is_read, kd, deadline, call, first_requests[key]))
                running[key] = (thread, kd)
                thread.start()
            for thread, _kd in running.values():
                thread.join(max(0.0, deadline - time.monotonic()))
        finally:
            late = {key for key, (thread, _kd) in running.items() if thread.is_alive()}
            if late:
                call.abort()  # shut their sockets down: blocked reads return at once
                grace_end = time.monotonic() + JOIN_GRACE_SECONDS
                for key in late:
                    running[key][0].join(max(0.0, grace_end - time.monotonic()))
                stragglers = sum(running[key][0].is_alive() for key in late)
                if stragglers:
                    log.warning("fhir_fetch_straggler", extra={
                        "event": "fhir_fetch_straggler", "hook_instance": request.hook_instance,
                        "count": stragglers})

        for key, (_thread, kd) in running.items():
            if key in late:  # cut off at the deadline: use none of its data
                kd = _KeyData(fetched=kd.fetched, calls=kd.calls, ok=False, reason="deadline")
            if key in to_continue:  # further pages of a prefetched Bundle: add to its first page
                first = data[key]
                first.resources.extend(_unshadowed(kd.resources, [first.dropped]))
                first.skipped += kd.skipped
                first.calls += kd.calls
                if not kd.ok:
                    first.ok, first.reason = False, kd.reason
            else:
                data[key] = kd

    def _fetch_key(self, url: fhir_url.FhirUrl, base: fhir_url.FhirUrl, headers: dict[str, str],
                   patient_id: str, is_read: bool, kd: _KeyData, deadline: float,
                   call: CallAbort, prepared: requests.PreparedRequest | None = None) -> None:
        """Fetch one key (a read, or a search with its `next` pages) into `kd`; never raises.
        `prepared`: the first request, already prepared for `url` (`_prepare`)."""
        seen: set[str] = set()
        pages = 0
        call.attach()
        try:
            next_url: fhir_url.FhirUrl | None = url
            while next_url is not None:
                if next_url.text in seen:
                    log.warning("fhir_next_loop", extra={"event": "fhir_next_loop", "count": pages})
                    return
                if pages >= max(1, self.settings.fhir_max_pages):
                    kd.ok, kd.reason = False, "page limit"
                    return
                seen.add(next_url.text)
                pages += 1
                body = self._get_json(next_url, headers, kd, deadline, call,
                                      prepared if next_url is url else None)
                rtype = body.get("resourceType") if isinstance(body, dict) else None
                if rtype == "Bundle":
                    _accept(_bundle_resources(body), patient_id, kd)
                    link = _next_link(body)
                    next_url = _checked_next(link, base) if link else None
                elif is_read and isinstance(body, dict) and rtype in KNOWN_RESOURCE_TYPES:
                    _accept([body], patient_id, kd)
                    if not kd.resources:
                        kd.ok, kd.reason = False, "read returned another resource"
                    return
                else:
                    kd.ok, kd.reason = False, f"unexpected {str(rtype)[:40] or type(body).__name__}"
                    return
        except _FetchFailed as err:
            kd.ok, kd.reason = False, str(err)
        except Exception as err:  # noqa: BLE001 - a fetch must never break the hook call
            kd.ok, kd.reason = False, f"error {type(err).__name__}"
        finally:
            call.detach()

    def _prepare(self, url: fhir_url.FhirUrl, headers: dict[str, str]) -> requests.PreparedRequest:
        """The GET of `url` as `requests` will send it; `_FetchFailed` unless that is exactly
        `url`'s normal form (requests/urllib3 would send something else: do not send)."""
        prepared = self.session.prepare_request(requests.Request("GET", url.text, headers=headers))
        if prepared.url != url.text:
            raise _FetchFailed("URL changed when prepared")
        return prepared

    def _get_json(self, url: fhir_url.FhirUrl, headers: dict[str, str], kd: _KeyData,
                  deadline: float, call: CallAbort, prepared: requests.PreparedRequest | None = None) -> Any:
        """GET `url` (exactly its normal form; `prepared`: its request from `_prepare`, if made
        already) and parse the JSON body; one retry on 429/503 within the deadline."""
        if prepared is None:
            prepared = self._prepare(url, headers)
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or call.aborted:
                raise _FetchFailed("deadline")
            kd.calls += 1
            try:
                resp = self.session.send(
                    prepared, allow_redirects=False, stream=True,
                    timeout=(min(self.settings.fhir_connect_timeout, remaining),
                             min(self.settings.fhir_read_timeout, remaining)))
            except requests.Timeout:
                call.release_thread()
                raise _FetchFailed("timeout") from None
            except requests.RequestException as err:
                call.release_thread()
                raise _FetchFailed(f"connection {type(err).__name__}") from None
            try:
                if resp.status_code in _RETRY_STATUSES and attempt == 1:
                    delay = retry_after_seconds(resp.headers.get("Retry-After"), _DEFAULT_RETRY_DELAY)
                    if time.monotonic() + delay >= deadline:
                        raise _FetchFailed(f"http {resp.status_code}, retry after the deadline")
                    call.release_thread()
                    resp.close()
                    if call.sleep(delay):  # ends before the deadline, or at an abort
                        raise _FetchFailed("deadline")
                    continue
                if not 200 <= resp.status_code < 300:
                    raise _FetchFailed(f"http {resp.status_code}")
                ctype = resp.headers.get("Content-Type", "").lower()
                if "json" not in ctype and ctype:
                    raise _FetchFailed(f"content type {ctype.split(';')[0][:40]}")
                raw = self._read_capped(resp, deadline, call)
            finally:
                call.release_thread()  # before the connection goes back to the pool
                resp.close()
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise _FetchFailed("invalid JSON") from None
        raise _FetchFailed("retry failed")  # pragma: no cover - the loop always returns or raises

    def _read_capped(self, resp: requests.Response, deadline: float, call: CallAbort) -> bytes:
        """The (decoded) body, or `_FetchFailed` past the size cap or the deadline."""
        cap = self.settings.fhir_max_response_bytes
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > cap:
            raise _FetchFailed("response too large")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in resp.iter_content(_CHUNK_BYTES):
                size += len(chunk)
                if size > cap:
                    raise _FetchFailed("response too large")
                if call.aborted or time.monotonic() > deadline:
                    raise _FetchFailed("deadline")
                chunks.append(chunk)
        except requests.RequestException as err:
            raise _FetchFailed(f"read {type(err).__name__}") from None
        if call.aborted:  # a shut-down socket reads as end of body: the body may be cut short
            raise _FetchFailed("deadline")
        return b"".join(chunks)


