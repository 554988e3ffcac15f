"""Partial decoding of hook-call bodies: read the envelope, keep the FHIR data as raw JSON.

A hook call is mostly `prefetch`: hundreds or thousands of FHIR resources of which the rules
read a handful.  Parsing all of it into Python dicts (and freeing them again) used to be most of
the cost of a call.  This module decodes with msgspec instead (https://jcristharif.com/msgspec/):

1. `decode_hook_body` decodes the top-level members of the body exactly as before (they are
   small), and the `prefetch` values without turning their resources into objects.  In the
   common case (only the keys of `record.PREFETCH_KEYS`, each search key a Bundle or null) this
   takes one pass over the body: every search key's Bundle becomes a `LazyBundle` (its entries'
   resources kept as `msgspec.Raw`, zero-copy slices of the request bytes, validated as JSON but
   not turned into objects), any other value stays raw.  Any other body is decoded in a second
   way that keeps every `prefetch` value that is a JSON object as a `msgspec.Raw`;
   `open_prefetch_value` later turns such a value into a `LazyBundle` (a well-formed Bundle) or
   into its fully decoded value (a single resource, an OperationOutcome, something malformed).
2. `LazyBundle.head` decodes one resource's *head*: the few top-level fields that decide whether
   the rules can use it (`Head`, the same fields as `facts.HEAD_FIELDS`), as a dict of them when
   a field has an unusual JSON type, None when the resource is not an object.
3. `LazyBundle.resource` (`decode_resource`) decodes one raw resource fully, with orjson as before,
   once the gatherer has decided (from its head) that the rules need it.

The guarantees of the full parse are kept: a body the fast path cannot take as it is (not an
object, nested too deep for msgspec, a number msgspec would read differently...) is declined
(`decode_hook_body` returns None) and the caller parses it the old way, so the same errors are
answered; invalid UTF-8 anywhere is declined too (msgspec does not check the bytes of values it
only skips).  Values are decoded by orjson in every path, so numbers read the same.  One
difference is deliberate: a number outside the range of a double (1e999 is valid JSON grammar,
which orjson refuses as a limitation) inside a resource the rules never read no longer makes the
whole call a 400; inside a resource they read it still does.
"""

from __future__ import annotations

from typing import Any, TypedDict

import msgspec
import orjson

from cds_service.record import PREFETCH_KEYS

RawJson = msgspec.Raw
"""A JSON value kept as its bytes (a zero-copy view of the request body)."""

_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError, TypeError)
_EMPTY_RAW = msgspec.Raw(b"")
_OBJECT_START = ord("{")


class _Entry(msgspec.Struct):
    resource: msgspec.Raw = _EMPTY_RAW


class _BundleShape(msgspec.Struct):
    """The members of a Bundle the gatherer reads; anything else in it is skipped unparsed."""

    resourceType: Any = None
    entry: list[_Entry] | None = None
    link: Any = None


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """The members CDS Hooks 2.0 defines for a hook call, each kept raw (then decoded by orjson,
    so values read exactly as in the full parse).  Any other member, or a `prefetch` that is not
    an object, makes this decoder decline; the general path below then takes the body."""

    hook: msgspec.Raw = _EMPTY_RAW
    hookInstance: msgspec.Raw = _EMPTY_RAW
    fhirServer: msgspec.Raw = _EMPTY_RAW
    fhirAuthorization: msgspec.Raw = _EMPTY_RAW
    context: msgspec.Raw = _EMPTY_RAW
    extension: msgspec.Raw = _EMPTY_RAW
    prefetch: dict[str, msgspec.Raw] | None | msgspec.UnsetType = msgspec.UNSET


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ENVELOPE_FIELDS = _Envelope.__struct_fields__
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_BUNDLE = msgspec.json.Decoder(_BundleShape)

_INSTANCE_KEYS = frozenset({"patient"})
"""Prefetch keys whose template is an instance read (a single resource): kept raw by the
one-pass decoder.  Every other key of `PREFETCH_KEYS` is a search, answered with a Bundle."""
_Prefetch = msgspec.defstruct(
    "_Prefetch",
    [(key, msgspec.Raw, _EMPTY_RAW) if key in _INSTANCE_KEYS
     else (key, _BundleShape | None | msgspec.UnsetType, msgspec.UNSET) for key in PREFETCH_KEYS],
    forbid_unknown_fields=True)
_PREFETCH_FIELDS = _Prefetch.__struct_fields__
_OnePass = msgspec.defstruct(
    "_OnePass",
    [(name, msgspec.Raw, _EMPTY_RAW) for name in _ENVELOPE_FIELDS if name != "prefetch"]
    + [("prefetch", _Prefetch | None | msgspec.UnsetType, msgspec.UNSET)],
    forbid_unknown_fields=True)
_ONE_PASS = msgspec.json.Decoder(_OnePass)
"""The envelope and every search key's Bundle entries in one pass (see module doc): any other
member, prefetch key, or a search key's value that is not an object or null makes it decline."""


def _is_object(raw: msgspec.Raw) -> bool:
    """Whether a raw JSON value is an object (msgspec strips the whitespace around values)."""
    return len(raw) > 0 and memoryview(raw)[0] == _OBJECT_START


def _loads(raw: msgspec.Raw) -> Any:
    return orjson.loads(memoryview(raw))


def is_raw(value: Any) -> bool:
    """Whether `value` is a prefetch value still held as raw JSON (always a JSON object): a
    `msgspec.Raw`, or a `LazyBundle` (a Bundle whose resources are raw)."""
    return type(value) is msgspec.Raw or type(value) is LazyBundle


def _prefetch_values(values: dict[str, msgspec.Raw]) -> dict[str, Any]:
    return {k: (v if _is_object(v) else _loads(v)) for k, v in values.items()}


def decode_hook_body(raw: bytes) -> dict[str, Any] | None:
    """The body as a dict whose `prefetch` object values are `RawJson`; None when the fast path
    declines (the caller then parses the body fully, which answers the usual errors)."""
    if not raw.isascii():
        try:
            raw.decode("utf-8")  # strict: rejects invalid bytes and encoded surrogates, as orjson does
        except UnicodeDecodeError:
            return None
    body: dict[str, Any] = {}
    try:
        try:
            one_pass = _ONE_PASS.decode(raw)
        except msgspec.ValidationError:
            one_pass = None  # another member or key, or a search key's value is not a Bundle
        if one_pass is not None and _read_one_pass(one_pass, body):
            return body
        body = {}
        try:
            envelope = _ENVELOPE.decode(raw)
        except msgspec.ValidationError:
            envelope = None  # another member, or a prefetch that is not an object
        if envelope is not None:
            for name in _ENVELOPE_FIELDS:
                value = getattr(envelope, name)
                if name == "prefetch":
                    if value is not msgspec.UNSET:
                        body[name] = None if value is None else _prefetch_values(value)
                elif len(value):
                    body[name] = _loads(value)
            return body
        for key, value in _TOP_LEVEL.decode(raw).items():
            if key == "prefetch" and _is_object(value):
                body[key] = _prefetch_values(_TOP_LEVEL.decode(value))
            else:
                body[key] = _loads(value)
    except (*_DECODE_ERRORS, orjson.JSONDecodeError):
        return None
    return body


def _read_one_pass(decoded: Any, body: dict[str, Any]) -> bool:
    """Fill `body` from the one-pass decoder's result; False when a search key holds an object
    that is not a Bundle (a single resource, an OperationOutcome...): its bytes are gone, so
    the body is decoded the other way."""
    prefetch = decoded.prefetch
    values: dict[str, Any] = {}
    if prefetch is not None and prefetch is not msgspec.UNSET:
        for key in _PREFETCH_FIELDS:
            value = getattr(prefetch, key)
            if type(value) is _BundleShape:
                if value.resourceType != "Bundle":
                    return False
                values[key] = LazyBundle([e.resource for e in value.entry or ()], value.link)
            elif value is None:
                values[key] = None
            elif type(value) is msgspec.Raw:
                if len(value):
                    values[key] = value if _is_object(value) else _loads(value)
    for name in _ENVELOPE_FIELDS:
        if name == "prefetch":
            if prefetch is not msgspec.UNSET:
                body[name] = None if prefetch is None else values
        else:
            value = getattr(decoded, name)
            if len(value):
                body[name] = _loads(value)
    return True


# Typed heads: the same top-level fields as `facts.HEAD_FIELDS`, as msgspec Structs (cheaper to
# build and free than dicts, and untracked by the garbage collector).  A resource in which any
# head field has another JSON type than these is read with a dict head instead.

class Coding(msgspec.Struct, gc=False):
    system: str | None = None
    code: str | None = None
    display: str | None = None


class Concept(msgspec.Struct, gc=False):
    """A CodeableConcept's codings and text."""

    coding: list[Coding] | None = None
    text: str | None = None


class Reference(msgspec.Struct, gc=False):
    reference: str | None = None
    display: str | None = None


class Component(msgspec.Struct, gc=False):
    code: Concept | None = None


class Head(msgspec.Struct, gc=False):
    """The head of a resource (see `facts.HEAD_FIELDS`, which names the same fields)."""

    resourceType: str | None = None
    id: str | None = None
    subject: Reference | None = None
    patient: Reference | None = None
    code: Concept | None = None
    valueCodeableConcept: Concept | None = None
    component: list[Component] | None = None
    medicationCodeableConcept: Concept | None = None
    medicationReference: Reference | None = None


HEAD_DECODER = msgspec.json.Decoder(Head)
"""`typed_head`'s decoder; loops that run per resource call its `decode` themselves."""
_DictHead = TypedDict("_DictHead", {name: Any for name in Head.__struct_fields__}, total=False)  # type: ignore[misc]
_DICT_HEAD = msgspec.json.Decoder(_DictHead)


def head_as_dict(head: Head) -> dict[str, Any]:
    """A typed head as a dict head (members that were absent or null left out, at every level)."""
    return _drop_nulls(msgspec.to_builtins(head))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def typed_head(raw: msgspec.Raw) -> Head | None:
    """The typed head of a raw resource; None when it is not an object or a head field has
    another JSON type than `Head` says (`dict_head` then)."""
    try:
        return HEAD_DECODER.decode(raw)
    except _DECODE_ERRORS:
        return None


def dict_head(raw: msgspec.Raw) -> dict[str, Any] | None:
    """The head fields of a raw resource as a dict; None when it is not a JSON object or its head
    fields cannot be decoded the way the full parse would (the caller then decodes it fully)."""
    if not _is_object(raw):
        return None
    try:
        return _DICT_HEAD.decode(raw)
    except _DECODE_ERRORS:
        return None


HEAD_DECODE_ERRORS = _DECODE_ERRORS
"""What `HEAD_DECODER.decode` can raise on a raw resource."""


class LazyBundle:
    """A prefetched Bundle whose resources are still raw: `raws[i]` is entry i's resource (empty
    for an entry without one), `link` the Bundle's `link` member as msgspec read it.

    The Bundle's other members (`type`, `total`...) are not kept: the gatherer reads none."""

    __slots__ = ("raws", "link")

    def __init__(self, raws: list[msgspec.Raw], link: Any) -> None:
        self.raws = raws
        self.link = link

    def head(self, index: int) -> Head | dict[str, Any] | None:
        """Entry `index`'s head: typed, else a dict (`dict_head`), else None (no resource, or not
        an object: decode it fully to judge it)."""
        raw = self.raws[index]
        return typed_head(raw) or dict_head(raw)

    @property
    def heads(self) -> list[Head | dict[str, Any] | None]:
        """Every entry's head (`head`)."""
        return [self.head(i) for i in range(len(self.raws))]

    def resource(self, index: int) -> Any:
        """Entry `index`'s resource, fully decoded (None for an entry without one).  Raises
        `orjson.JSONDecodeError` as the full parse of the body would have."""
        return decode_resource(self.raws[index])


def open_prefetch_value(raw: msgspec.Raw) -> LazyBundle | Any:
    """A `LazyBundle` for a Bundle with a list of entries, else the fully decoded value.

    Raises `orjson.JSONDecodeError` when the value is not valid JSON for orjson (the caller
    answers 400, as the full parse did)."""
    try:
        shape = _BUNDLE.decode(memoryview(raw))
    except _DECODE_ERRORS:
        shape = None  # e.g. an entry that is not an object: the full decode reads it
    if shape is None or shape.resourceType != "Bundle" or shape.entry is None:
        return _loads(raw)
    return LazyBundle([e.resource for e in shape.entry], shape.link)


def decode_resource(raw: msgspec.Raw) -> Any:
    """The full value of a raw resource (None for an entry without one).  Raises
    `orjson.JSONDecodeError` as the full parse of the body would have."""
    if not len(raw):
        return None
    return _loads(raw)
