"""Reading a laboratory value the way FHIR feeds really send it, and converting its unit.

A B12, active-B12 or MMA result reaches us as `valueQuantity` (with or without a comparator,
with a UCUM code, a unit text, both or neither), `valueInteger`, or `valueString` holding the
comparator, the number and the unit in one text ("<150", "< 150 pg/mL", ">2000", "245 ng/L",
"0,36 umol/L").  `read_value` turns any of these into a `ReadValue` that keeps what the
laboratory reported (comparator, the number as written, the unit as written) next to the
number it means; `to_canonical` converts it with the analyte's `LabUnits` (conversion factors
are data in the analyte's ValueSet file, with their source: see knowledge.py).

Design choices (docs/rules.md, "Reading laboratory values"):
- A decimal comma is read only when it cannot be a thousands separator: one or two digits after
  it ("0,36" = 0.36) and no dot in the number.  "1,355" is ambiguous (1.355 or 1355) and is not
  read; neither is a range ("150-200"), a text ("haemolysed") or anything else.
- Units are compared case-insensitively, without spaces, with "µ"/"μ"/"mc" spelt "u"
  ("µmol/L", "mcmol/l" and "umol/L" are one unit).  Case-insensitive comparison is safe for the
  units these analytes use (no "M" mega- prefix is plausible).
- The reported precision is kept: the number's text is what the laboratory wrote (JSON 245 is
  "245", 245.0 is "245.0", 0.36 is "0.36"), and arithmetic uses `Decimal` so 0.18 ng/mL is
  exactly 180 ng/L at a band limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cds_service.frozen import fast_init

COMPARATORS = ("<=", ">=", "<", ">")
_COMPARATOR_SPELLINGS = {"≤": "<=", "≥": ">=", "=<": "<=", "=>": ">="}
_STRING_VALUE = re.compile(
    r"^\s*(?P<cmp><=|>=|=<|=>|<|>|≤|≥)?\s*(?P<num>[+-]?(?:\d+(?:[.,]\d+)?|[.,]\d+))\s*(?P<unit>[A-Za-zµμ%].*?)?\s*$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d{1,2}$")


@fast_init
@dataclass(frozen=True)
class ReadValue:
    """A result value as reported, and the number it means."""

    number: Decimal
    """The numeric value (comparator not applied)."""
    text: str
    """The number as the laboratory wrote it ("245", "245.0", "0.36", "0,36")."""
    comparator: str | None = None
    """One of COMPARATORS, or None for an exact value."""
    unit: str | None = None
    """The unit to show: the Quantity's human `unit`, else its UCUM `code`, else the unit text of a
    string value (as written)."""
    unit_candidates: tuple[str, ...] = ()
    """Every unit spelling the record gave (UCUM code first), tried in order for conversion."""


@dataclass(frozen=True)
class LabUnits:
    """Unit knowledge for one analyte (from its ValueSet file)."""

    canonical: str
    """The unit rules compare in (B12 ng/L, active B12 pmol/L, MMA nmol/L)."""
    factors: dict[str, Decimal]
    """normalize_unit(unit) -> multiplier to the canonical unit."""
    plausible_low: Decimal | None = None
    """Smallest plausible value in the canonical unit (inclusive); below it a value is not read."""
    plausible_high: Decimal | None = None
    """Largest plausible value in the canonical unit (inclusive)."""
    default_units: dict[str, str] | None = None
    """LOINC code -> unit assumed when a result has no unit at all (the code's own UCUM unit)."""


def normalize_unit(unit: str) -> str:
    """Canonical spelling of a unit for lookups: no spaces, lower case, micro as "u"."""
    text = _NORMALIZED_UNITS.get(unit)
    if text is None:
        text = "".join(unit.split()).lower().replace("µ", "u").replace("μ", "u")
        if text.startswith("mc"):
            text = "u" + text[2:]
        if len(unit) <= 32:  # units are short and few; anything else is not kept
            if len(_NORMALIZED_UNITS) >= 1024:
                _NORMALIZED_UNITS.clear()
            _NORMALIZED_UNITS[unit] = text
    return text


_NORMALIZED_UNITS: dict[str, str] = {}
"""Memo of `normalize_unit` (each result's unit is normalised on every hook call)."""


def parse_number(text: str) -> Decimal | None:
    """The number in `text` ("245", "0.36", "0,36"), None when it is not one unambiguous number."""
    text = text.strip()
    if "," in text:
        if "." in text or not _DECIMAL_COMMA.match(text):
            return None  # "1,355" may be 1.355 or 1355: not read
        text = text.replace(",", ".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def read_value(element: Any) -> ReadValue | None:
    """The value of an Observation (or Observation.component) however it is sent, else None.

    Looks at valueQuantity, then valueInteger, then valueString.  Never raises."""
    if type(element) is not dict:
        return None
    qty = element.get("valueQuantity")
    if type(qty) is dict:
        raw = qty.get("value")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            return None
        text = str(raw) if isinstance(raw, int) else repr(float(raw))
        # (`parse_number` of a JSON integer's text is its Decimal: no spaces, comma or infinity)
        number = Decimal(text) if type(raw) is int else parse_number(text)
        if number is None:
            return None
        comparator = qty.get("comparator")
        comparator = _COMPARATOR_SPELLINGS.get(comparator, comparator) if type(comparator) is str else None
        if comparator not in COMPARATORS:
            comparator = None
        code, unit = _str(qty.get("code")), _str(qty.get("unit"))
        candidates = (code, unit) if code and unit else (code,) if code else (unit,) if unit else ()
        return ReadValue(number, text, comparator, unit or code, candidates)
    raw = element.get("valueInteger")
    if type(raw) is int:
        return ReadValue(Decimal(raw), str(raw))
    text = _str(element.get("valueString"))
    if text is not None:
        return parse_value_string(text)
    return None


def parse_value_string(text: str) -> ReadValue | None:
    """A value written as text: optional comparator, one number, optional unit
    ("< 150 pg/mL", ">2000", "245 ng/L", "0,36 umol/L").  None for anything else."""
    m = _STRING_VALUE.match(text)
    if not m:
        return None
    number = parse_number(m.group("num"))
    if number is None:
        return None
    cmp = m.group("cmp")
    comparator = _COMPARATOR_SPELLINGS.get(cmp, cmp) if cmp else None
    unit = m.group("unit")
    unit = unit.strip() if unit else None
    return ReadValue(number, m.group("num"), comparator, unit, (unit,) if unit else ())


def unit_factor(value: ReadValue, units: LabUnits, loinc: str | None = None) -> tuple[Decimal, str] | None:
    """(factor to the canonical unit, unit it was found under) for `value`, else None.

    With no unit at all, the LOINC code's own unit is assumed when the analyte defines one (a
    mass-concentration B12 code means pg/mL); a unit that is present but unknown is never
    guessed."""
    for candidate in value.unit_candidates:
        factor = units.factors.get(normalize_unit(candidate))
        if factor is not None:
            return factor, candidate
    if not value.unit_candidates and loinc and units.default_units:
        default = units.default_units.get(loinc)
        if default is not None:
            factor = units.factors.get(normalize_unit(default))
            if factor is not None:
                return factor, default
    return None


def to_canonical(value: ReadValue, units: LabUnits, loinc: str | None = None) -> Decimal | None:
    """`value` in the analyte's canonical unit, None when the unit is unknown."""
    found = unit_factor(value, units, loinc)
    return value.number * found[0] if found else None


def is_plausible(canonical: Decimal, units: LabUnits) -> bool:
    """Whether a converted value lies in the analyte's plausible range (limits inclusive)."""
    if units.plausible_low is not None and canonical < units.plausible_low:
        return False
    if units.plausible_high is not None and canonical > units.plausible_high:
        return False
    return True


def format_number(value: Decimal) -> str:
    """A converted value for display: whole numbers without decimals, else up to 2 decimals
    (trailing zeros dropped)."""
    rounded = value.quantize(Decimal(1)) if abs(value) >= 10 else value.quantize(Decimal("0.01"))
    text = format(rounded.normalize(), "f")
    return text


def _str(value: Any) -> str | None:
    return value.strip() if type(value) is str and value.strip() else None
