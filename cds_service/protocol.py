"""CDS Hooks 2.0 wire protocol: request checks, the card model, OperationOutcome errors.

Every rule of the spec about the *shape* of requests and responses lives here.  `Card`'s
validators reject nulls, empty strings/arrays/objects, over-long summaries, unknown indicators, a
`suggestions` list without `selectionBehavior`, and override reasons that are not full Codings.
The hot path (cards.CardBuilder) assembles card JSON directly; `Card` judges it: at start-up over
the parts every card shares, and in the tests over every card kind and decision.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cds_service.frozen import fast_init
from cds_service.wire import LazyBundle, is_raw

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

ISSUE_CODE_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    408: "timeout",
    412: "incomplete",
    413: "too-long",
    414: "too-long",
    415: "not-supported",
    431: "too-long",
    429: "throttled",
    500: "exception",
    501: "not-supported",
}


class CdsError(Exception):
    """An error answered with `status` and an OperationOutcome body."""

    def __init__(self, status: int, diagnostics: str, *, expression: str | None = None,
                 issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.expression = expression
        self.extra_issues = issues or []

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.status, self.diagnostics, expression=self.expression,
                                 extra_issues=self.extra_issues)


def operation_outcome(status: int, diagnostics: str, *, expression: str | None = None,
                      extra_issues: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A FHIR R4 OperationOutcome for an HTTP error `status`."""
    issue: dict[str, Any] = {
        "severity": "error" if status < 500 else "fatal",
        "code": ISSUE_CODE_BY_STATUS.get(status, "processing"),
        "diagnostics": diagnostics,
    }
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue, *(extra_issues or [])]}


def bad_request(diagnostics: str, expression: str | None = None) -> CdsError:
    return CdsError(400, diagnostics, expression=expression)


def invalid_json(err: Exception) -> CdsError:
    """The 400 for a body that is not valid JSON, naming the parser's reason (its first part:
    no position or excerpt of the body)."""
    return CdsError(400, f"request body is not valid JSON ({str(err).split(':', 1)[0][:80]})")


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

HOOK_REQUIRED_CONTEXT: dict[str, tuple[str, ...]] = {
    "patient-view": ("userId", "patientId"),
    "order-select": ("userId", "patientId", "selections", "draftOrders"),
    "order-sign": ("userId", "patientId", "draftOrders"),
}
"""Required context fields per hook (CDS Hooks library 1.0.1)."""

USER_ID_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")
ORDER_USER_ID_TYPES = ("Practitioner", "PractitionerRole")
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""FHIR R4 `id` datatype: ids go into FHIR URLs, so anything else is refused up front."""


@dataclass(frozen=True)
class FhirAuthorization:
    access_token: str
    token_type: str = "Bearer"
    scope: str = ""
    subject: str = ""

    def __repr__(self) -> str:  # never print the token
        return f"FhirAuthorization(token_type={self.token_type!r}, scope={self.scope!r})"


@fast_init  # built on every hook call (see cds_service.frozen)
@dataclass(frozen=True)
class HookContext:
    user_id: str
    patient_id: str
    encounter_id: str | None = None
    draft_orders: dict[str, Any] | None = None
    selections: tuple[str, ...] = ()

    def token_values(self) -> dict[str, str]:
        """Values for prefetch tokens: `context.*` primitives and the `user*Id` shortcuts."""
        values = {"context.userId": self.user_id, "context.patientId": self.patient_id}
        if self.encounter_id:
            values["context.encounterId"] = self.encounter_id
        rtype, _, rid = self.user_id.partition("/")
        if rid:
            values[f"user{rtype}Id"] = rid
        return values


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    context: HookContext
    fhir_server: str | None = None
    fhir_authorization: FhirAuthorization | None = None
    prefetch: dict[str, Any] = field(default_factory=dict)


_JSON_SCHEMA_BLANK = re.compile(
    "[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*")
r"""ECMAScript `\s`, the whitespace of the OpenAPI document's `"pattern": "\\S"` (JSON Schema
regexes are ECMA-262).  Python's str.strip() also strips U+001C..U+001F and U+0085, so a
string the published schema calls valid would have been refused."""


def is_blank(value: str) -> bool:
    """True when `value` has nothing but whitespace (as the OpenAPI document defines it)."""
    # A visible ASCII first character settles it without the regex: ids, URLs and hook names.
    if "!" <= value[:1] <= "~":
        return False
    return _JSON_SCHEMA_BLANK.fullmatch(value) is not None


def _require_str(obj: dict[str, Any], key: str, where: str, *, max_len: int,
                 required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and key in obj:
        raise bad_request(f"{where}{key} must not be null (omit it instead)", f"{where}{key}")
    if value is None:
        if required:
            raise bad_request(f"{where}{key} is required", f"{where}{key}")
        return None
    if not isinstance(value, str) or is_blank(value):
        raise bad_request(f"{where}{key} must be a non-empty string", f"{where}{key}")
    if len(value) > max_len:
        raise bad_request(f"{where}{key} is longer than {max_len} characters", f"{where}{key}")
    return value


def parse_hook_request(body: Any, expected_hook: str, *, max_string_length: int = 4096) -> HookRequest:
    """Check a hook call body against CDS Hooks 2.0 and the hook's context definition.

    Unknown members and `extension` objects are tolerated (spec: `extension` is reserved on every
    object); anything required that is missing or of the wrong type raises a 400 `CdsError` naming
    the field.
    """
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    # Each `_plain` test below accepts only what `_require_str` would accept (and then returns
    # as is), in a fraction of its time; anything else takes `_require_str`, which answers it.
    hook = body.get("hook")
    if not (hook.__class__ is str and hook == expected_hook and hook in HOOK_REQUIRED_CONTEXT):
        hook = _require_str(body, "hook", "", max_len=128)
        if hook != expected_hook:
            raise bad_request(f"hook must be {expected_hook!r} for this service", "hook")
    hook_instance = body.get("hookInstance")
    if not _plain(hook_instance, 128):
        hook_instance = _require_str(body, "hookInstance", "", max_len=128)
    fhir_server = body.get("fhirServer")
    if (fhir_server is not None or "fhirServer" in body) and not _plain(fhir_server, 2048):
        fhir_server = _require_str(body, "fhirServer", "", max_len=2048, required=False)
    if fhir_server is not None and not fhir_server.lower().startswith(("http://", "https://")):
        raise bad_request("fhirServer must be an absolute http(s) URL", "fhirServer")

    auth: FhirAuthorization | None = None
    raw_auth = body.get("fhirAuthorization")
    if raw_auth is None and "fhirAuthorization" in body:
        raise bad_request("fhirAuthorization must not be null (omit it instead)", "fhirAuthorization")
    if raw_auth is not None:
        if not isinstance(raw_auth, dict):
            raise bad_request("fhirAuthorization must be an object", "fhirAuthorization")
        if fhir_server is None:
            raise bad_request("fhirServer is required when fhirAuthorization is present", "fhirServer")
        token = _require_str(raw_auth, "access_token", "fhirAuthorization.", max_len=max_string_length)
        token_type = _require_str(raw_auth, "token_type", "fhirAuthorization.", max_len=32)
        if (token_type or "").lower() != "bearer":
            raise bad_request("fhirAuthorization.token_type must be Bearer", "fhirAuthorization.token_type")
        expires_in = raw_auth.get("expires_in")
        # JSON has one number type: 300.0 is an integer too (as JSON Schema says).
        integral = isinstance(expires_in, int) or (isinstance(expires_in, float) and expires_in.is_integer())
        if not integral or isinstance(expires_in, bool):
            raise bad_request("fhirAuthorization.expires_in must be an integer", "fhirAuthorization.expires_in")
        scope = _require_str(raw_auth, "scope", "fhirAuthorization.", max_len=max_string_length)
        subject = _require_str(raw_auth, "subject", "fhirAuthorization.", max_len=256)
        patient = _require_str(raw_auth, "patient", "fhirAuthorization.", max_len=64, required=False)
        if patient is not None and not FHIR_ID.fullmatch(patient):
            raise bad_request("fhirAuthorization.patient must be a FHIR id", "fhirAuthorization.patient")
        auth = FhirAuthorization(access_token=token or "", scope=scope or "", subject=subject or "")

    raw_context = body.get("context")
    if raw_context is None:
        raise bad_request("context is required", "context")
    if not isinstance(raw_context, dict):
        raise bad_request("context must be an object", "context")
    context = _parse_context(raw_context, hook, max_string_length)

    prefetch = body.get("prefetch")
    if prefetch is None and "prefetch" in body:
        raise bad_request("prefetch must not be null (omit it instead)", "prefetch")
    if prefetch is None:
        prefetch = {}
    elif not isinstance(prefetch, dict):
        raise bad_request("prefetch must be an object", "prefetch")
    # Spec: each prefetch value is a FHIR resource (or Bundle), or null for "no data".  (The
    # classes first, in one call: raw JSON, parsed objects and nulls are exactly these classes.)
    if not _PREFETCH_VALUE_CLASSES.issuperset(map(type, prefetch.values())):
        for key, value in prefetch.items():
            if value is not None and not isinstance(value, dict) and not is_raw(value):
                raise bad_request(f"prefetch.{key[:64]} must be a FHIR resource or null", f"prefetch.{key[:64]}")
    _check_extension(body, "")

    return _hook_request(hook, hook_instance or "", context,
                         fhir_server.rstrip("/") if fhir_server else None, auth, prefetch)


def _hook_request(hook: str, hook_instance: str, context: HookContext, fhir_server: str | None,
                  fhir_authorization: FhirAuthorization | None, prefetch: dict[str, Any]) -> HookRequest:
    """`HookRequest(...)` with every field given, its instance dict written directly, as
    `cds_service.frozen.fast_init` does (which `prefetch`'s default factory keeps away):
    the same frozen instance (tests/test_hook_fixed_cost.py compares them)."""
    request = object.__new__(HookRequest)
    fields = request.__dict__
    fields["hook"] = hook
    fields["hook_instance"] = hook_instance
    fields["context"] = context
    fields["fhir_server"] = fhir_server
    fields["fhir_authorization"] = fhir_authorization
    fields["prefetch"] = prefetch
    return request


_PREFETCH_VALUE_CLASSES = frozenset({dict, msgspec.Raw, LazyBundle, type(None)})
"""Classes of a prefetch value that need no further test: a parsed JSON object, raw JSON (a
`msgspec.Raw` or a `wire.LazyBundle`, what `is_raw` accepts), null."""


def _plain(value: Any, max_len: int) -> bool:
    """True for a string `_require_str` accepts without a look at its whitespace: it starts
    with a visible ASCII character (so it is not blank) and has at most `max_len` characters."""
    return value.__class__ is str and "!" <= value[:1] <= "~" and len(value) <= max_len


def _check_extension(obj: dict[str, Any], where: str) -> None:
    """`extension` is reserved on every object and, when present, must be a JSON object."""
    if "extension" in obj and not isinstance(obj["extension"], dict):
        raise bad_request(f"{where}extension must be an object", f"{where}extension")


def _parse_context(raw: dict[str, Any], hook: str, max_len: int) -> HookContext:
    required = HOOK_REQUIRED_CONTEXT[hook]
    _check_extension(raw, "context.")
    user_id = raw.get("userId")
    if not _plain(user_id, 256):
        user_id = _require_str(raw, "userId", "context.", max_len=256)
    rtype, _, rid = (user_id or "").partition("/")
    allowed_types = USER_ID_TYPES if hook == "patient-view" else ORDER_USER_ID_TYPES
    if rtype not in allowed_types or not FHIR_ID.fullmatch(rid):
        raise bad_request(f"context.userId must be a reference to one of {', '.join(allowed_types)}, "
                          "such as Practitioner/123", "context.userId")
    patient_id = raw.get("patientId")
    if not _plain(patient_id, 64):
        patient_id = _require_str(raw, "patientId", "context.", max_len=64)
    if not FHIR_ID.fullmatch(patient_id or ""):
        raise bad_request("context.patientId must be a FHIR id (letters, digits, '-' and '.', at most 64)",
                          "context.patientId")
    encounter_id = raw.get("encounterId")
    if (encounter_id is not None or "encounterId" in raw) and not _plain(encounter_id, 64):
        encounter_id = _require_str(raw, "encounterId", "context.", max_len=64, required=False)
    if encounter_id is not None and not FHIR_ID.fullmatch(encounter_id):
        raise bad_request("context.encounterId must be a FHIR id", "context.encounterId")

    draft_orders = raw.get("draftOrders")
    if "draftOrders" in required or draft_orders is not None:
        if not isinstance(draft_orders, dict) or draft_orders.get("resourceType") != "Bundle":
            raise bad_request("context.draftOrders must be a FHIR Bundle", "context.draftOrders")
        entries = draft_orders.get("entry", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise bad_request("context.draftOrders.entry must be an array of objects",
                              "context.draftOrders.entry")
    selections: tuple[str, ...] = ()
    if "selections" in required:
        raw_sel = raw.get("selections")
        if not isinstance(raw_sel, list) or not all(isinstance(s, str) and 0 < len(s) <= 256
                                                    for s in raw_sel):
            raise bad_request("context.selections must be an array of strings", "context.selections")
        selections = tuple(raw_sel)
    # (user_id, patient_id, encounter_id, draft_orders, selections)
    return HookContext(user_id or "", patient_id or "", encounter_id, draft_orders, selections)


# ---------------------------------------------------------------------------------------------
# Cards (responses)
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    """Base for response models: no unknown fields, no empty strings, no empty containers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _no_empty_values(self) -> "_Strict":
        for name, value in self:
            if value is None:
                continue
            if isinstance(value, str) and not value.strip():
                raise ValueError(f"{name} must not be an empty string (omit it instead)")
            if isinstance(value, (list, tuple, dict)) and len(value) == 0:
                raise ValueError(f"{name} must not be empty (omit it instead)")
        return self

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON: optional members without a value are omitted, never `null`."""
        return self.model_dump(mode="json", exclude_none=True)


class Coding(_Strict):
    system: str
    code: str
    display: str | None = None


class OverrideReason(Coding):
    display: str  # required for overrideReasons (cds-resp-4)


class Source(_Strict):
    label: str
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None

    @field_validator("url", "icon")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an absolute URL")
        return v


class Action(_Strict):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None

    @model_validator(mode="after")
    def _resource_rules(self) -> "Action":
        if self.type in ("create", "update") and self.resource is None:
            raise ValueError(f"{self.type} action needs a resource")
        if self.type == "delete" and (self.resourceId is None or self.resource is not None):
            raise ValueError("delete action needs resourceId and no resource")
        return self


class Suggestion(_Strict):
    label: str
    uuid: str = Field(default_factory=lambda: str(uuid_mod.uuid4()))
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Link(_Strict):
    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> "Link":
        if self.appContext is not None and self.type != "smart":
            raise ValueError("appContext is only allowed on smart links (cds-resp-3)")
        if self.type == "absolute" and not self.url.startswith(("https://", "http://")):
            raise ValueError("absolute links need an absolute URL")
        return self


class Card(_Strict):
    uuid: str = Field(default_factory=lambda: str(uuid_mod.uuid4()))
    summary: str = Field(max_length=139)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[OverrideReason] | None = None
    links: list[Link] | None = None

    @model_validator(mode="after")
    def _selection_rules(self) -> "Card":
        if self.suggestions and self.selectionBehavior is None:
            raise ValueError("selectionBehavior is required when suggestions are present (cds-resp-6)")
        if self.selectionBehavior == "at-most-one" and self.suggestions:
            if sum(1 for s in self.suggestions if s.isRecommended) > 1:
                raise ValueError("at most one suggestion may be isRecommended with at-most-one (cds-resp-1)")
        return self


class CardJson(Protocol):
    """Anything that gives a card's JSON: a `Card`, or the hot path's `cards.RenderedCard`."""

    def to_json(self) -> dict[str, Any]: ...


def cards_response(cards: Sequence[CardJson]) -> dict[str, Any]:
    """The hook's answer: `{"cards": [...]}`."""
    return {"cards": [c.to_json() for c in cards]}
