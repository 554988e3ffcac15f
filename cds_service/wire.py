"""Partial decoding of hook-call bodies: read the envelope, keep the FHIR data as raw JSON.

A hook call is mostly `prefetch`: hundreds or thousands of FHIR resources of which the rules
read a handful.  Parsing all of it into Python dicts (and freeing them again) used to be most of
the cost of a call.  This module decodes with msgspec instead (https://jcristharif.com/msgspec/):

1. `decode_hook_body` decodes the top-level members of the body exactly as before (they are
   small), but every `prefetch` value that is a JSON object stays a `msgspec.Raw`: a zero-copy
   slice of the request bytes, validated as JSON but not turned into objects.
2. `open_prefetch_value` turns one such value into a `LazyBundle` (its entries' resources still
   raw, each with a *head*: the few top-level fields that decide whether the rules can use the
   resource, see `facts.HEAD_FIELDS`) or, for anything that is not a well-formed Bundle, into the
   fully decoded value (a single resource, an OperationOutcome, something malformed).
3. `decode_resource` decodes one raw resource fully, with orjson as before, once the gatherer
   has decided (from its head) that the rules need it.

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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

import msgspec
import orjson

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


def _is_object(raw: msgspec.Raw) -> bool:
    """Whether a raw JSON value is an object (msgspec strips the whitespace around values)."""
    return len(raw) > 0 and memoryview(raw)[0] == _OBJECT_START


def _loads(raw: msgspec.Raw) -> Any:
    return orjson.loads(memoryview(raw))


def is_raw(value: Any) -> bool:
    """Whether `value` is a prefetch value still held as raw JSON (always a JSON object)."""
    return type(value) is msgspec.Raw


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


# Typed heads: the same top-level fields as `facts.HEAD_FIELDS`, as msgspec Structs (cheaper to
# build and free than dicts, and untracked by the garbage collector).  A Bundle in which any head
# field has another JSON type than these is read with the dict heads instead.

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


class _TypedEntry(msgspec.Struct, gc=False):
    resource: Head | None = None


class _TypedBundle(msgspec.Struct):
    resourceType: Any = None
    entry: list[_TypedEntry] | None = None
    link: Any = None


_TYPED_BUNDLE = msgspec.json.Decoder(_TypedBundle)


def head_as_dict(head: Head) -> dict[str, Any]:
    """A typed head as a dict head (members that were absent or null left out, at every level)."""
    return _drop_nulls(msgspec.to_builtins(head))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


class LazyBundle:
    """A prefetched Bundle whose resources are still raw.

    `heads[i]` is the head of entry i's resource (None when the entry has no resource), and
    `resource(i)` its full value, decoded on demand.  The heads are typed (`Head`) when `typed`,
    else dicts of the decoder's fields.  A well-formed Bundle is read in two passes over its
    bytes: every head at once, then (only when a resource is asked for) the entries' raw slices."""

    __slots__ = ("heads", "link", "typed", "_raw", "_raws")

    def __init__(self, heads: list[Any], link: Any, raw: msgspec.Raw | None,
                 raws: list[msgspec.Raw] | None = None, *, typed: bool = False) -> None:
        self.heads = heads
        self.link = link
        self.typed = typed
        self._raw = raw
        self._raws = raws

    def resource(self, index: int) -> Any:
        """Entry `index`'s resource, fully decoded (None for an entry without one).  Raises
        `orjson.JSONDecodeError` as the full parse of the body would have."""
        if self._raws is None:
            shape = _BUNDLE.decode(memoryview(self._raw))  # the same bytes decoded before: cannot fail
            self._raws = [e.resource for e in shape.entry or ()]
        raw = self._raws[index]
        return _loads(raw) if len(raw) else None


class HeadDecoder:
    """Decodes resource heads: dicts of only the given top-level fields."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = tuple(fields)
        head_type = TypedDict("ResourceHead", {name: Any for name in self.fields}, total=False)  # type: ignore[misc]

        entry_head = msgspec.defstruct("EntryHead", [("resource", head_type | None, None)])
        bundle_heads = msgspec.defstruct("BundleHeads", [
            ("resourceType", Any, None), ("entry", list[entry_head] | None, None), ("link", Any, None)])

        self._decoder = msgspec.json.Decoder(head_type)
        self._bundle = msgspec.json.Decoder(bundle_heads)

    def head(self, raw: msgspec.Raw) -> dict[str, Any] | None:
        """The head of `raw`; None when `raw` is not a JSON object or its head fields cannot be
        decoded the way the full parse would (the caller then decodes it fully)."""
        if not _is_object(raw):
            return None
        try:
            return self._decoder.decode(memoryview(raw))
        except _DECODE_ERRORS:
            return None

    def bundle(self, raw: msgspec.Raw) -> LazyBundle | None:
        """A Bundle's heads in one pass, typed when every head field has its usual JSON type;
        None when `raw` is not a Bundle whose entries all have an object (or no) resource with
        decodable head fields."""
        view = memoryview(raw)
        try:
            typed = _TYPED_BUNDLE.decode(view)
        except _DECODE_ERRORS:
            typed = None
        if typed is not None:
            if typed.resourceType != "Bundle" or typed.entry is None:
                return None
            return LazyBundle([e.resource for e in typed.entry], typed.link, raw, typed=True)
        try:
            shape = self._bundle.decode(view)
        except _DECODE_ERRORS:
            return None
        if shape.resourceType != "Bundle" or shape.entry is None:
            return None
        return LazyBundle([e.resource for e in shape.entry], shape.link, raw)


def open_prefetch_value(raw: msgspec.Raw, heads: HeadDecoder) -> LazyBundle | Any:
    """A `LazyBundle` for a well-formed Bundle, else the fully decoded value.

    Raises `orjson.JSONDecodeError` when the value is not valid JSON for orjson (the caller
    answers 400, as the full parse did)."""
    bundle = heads.bundle(raw)
    if bundle is not None:
        return bundle
    try:
        shape = _BUNDLE.decode(memoryview(raw))
    except _DECODE_ERRORS:
        shape = None
    if shape is None or shape.resourceType != "Bundle" or shape.entry is None:
        return _loads(raw)
    # Some entry's resource is not an object, or has a head msgspec reads otherwise: heads one
    # by one (None for those; the gatherer decodes them fully and judges them as before).
    raws = [e.resource for e in shape.entry]
    return LazyBundle([heads.head(r) if len(r) else None for r in raws], shape.link, None, raws)


def decode_resource(raw: msgspec.Raw) -> Any:
    """The full value of a raw resource (None for an entry without one).  Raises
    `orjson.JSONDecodeError` as the full parse of the body would have."""
    if not len(raw):
        return None
    return _loads(raw)
