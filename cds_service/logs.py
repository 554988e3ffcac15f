"""Structured JSON logs.

Log lines carry request ids (`hookInstance`), service ids, statuses, durations and counts, never
tokens, JWTs or patient data.  Callers pass only such fields through `extra=`; the formatter
emits a fixed allowlist of attributes, so an accidental `extra={"token": ...}` is dropped, not
printed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

LOGGER_NAME = "cds_service"

# Only these record attributes are ever written.  Anything else passed via `extra` is ignored.
ALLOWED_FIELDS = (
    "event", "hook_instance", "service", "status", "duration_ms", "cards", "card_kinds",
    "reason", "keys_fetched", "keys_failed", "skipped_resources", "fhir_calls", "method",
    "path", "jti", "iss", "kid", "count", "detail", "error_type", "policy", "withheld_by",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts`, `level`, `logger`, `msg`, then the allowed fields a record
    carries, in `ALLOWED_FIELDS` order."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")
        """The last whole second formatted and its text (one tuple: threads swap it atomically)."""

    def format(self, record: logging.LogRecord) -> str:
        # The record's own attributes are what `extra=` set (`getattr(record, name, None)` raised
        # and caught an AttributeError for each absent field, most of the formatter's time).
        return self.line(record.created, record.msecs, record.levelname, record.name,
                         record.getMessage() if not record.args else record.msg, record.__dict__)

    def line(self, created: float, msecs: float, levelname: str, logger: str, msg: object,
             attributes: Mapping[str, object]) -> str:
        """The line for a record with these attributes (`attributes` holds the fields)."""
        second = int(created)
        cached, text = self._second
        if cached != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        entry = {"ts": f"{text}.{int(msecs):03d}Z", "level": levelname.lower(), "logger": logger, "msg": msg}
        for name in _allowed_present(tuple(attributes)):
            value = attributes[name]
            if value is not None:
                entry[name] = value
        return orjson.dumps(entry, default=str).decode()


_ALLOWED_PRESENT: dict[tuple[str, ...], tuple[str, ...]] = {}
"""Attribute names (in a mapping's order) -> those of them in `ALLOWED_FIELDS`, in its order.
A line's attributes are one of a few fixed sets (the hook line's, a record's), so looking
them up replaces testing every allowed name against every line."""


def _allowed_present(names: tuple[str, ...]) -> tuple[str, ...]:
    present = _ALLOWED_PRESENT.get(names)
    if present is None:
        given = set(names)
        present = tuple(name for name in ALLOWED_FIELDS if name in given)
        if len(_ALLOWED_PRESENT) < 1024:  # unusual attribute sets are answered, not kept
            _ALLOWED_PRESENT[names] = present
    return present


def write_event(logger: logging.Logger, level: int, msg: str, fields: dict[str, object]) -> None:
    """`logger.log(level, msg, extra=fields)` with less work, for the line of every hook call
    (`fields` are `ALLOWED_FIELDS` names, none of which is a LogRecord attribute).

    When the line's only destination is the service's own JSON handler (as `configure` sets it
    up, and nothing added since: no other handler on the way, no filter, no custom record
    factory), the line is formatted from `fields` and written under the handler's lock exactly
    as the handler would write the record, without making one: the same text, a fraction of the
    work.  Otherwise a record is made by the record factory (the caller's frame taken directly,
    the fields set in one update) and handled by `logger.handle`, like any other record.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _sole_json_handler(logger, level)
    if handler is not None:
        created = time.time()
        text = handler.formatter.line(  # type: ignore[union-attr]
            created, (created - int(created)) * 1000, logging.getLevelName(level), logger.name, msg, fields)
        with handler.lock:  # type: ignore[union-attr]
            try:
                stream = handler.stream
                stream.write(text + handler.terminator)
                # StreamHandler.flush (the handler is exactly a StreamHandler), its lock held here.
                if stream and hasattr(stream, "flush"):
                    stream.flush()
            except RecursionError:
                raise
            except Exception:
                handler.handleError(_record(logger, level, msg, fields, sys._getframe(1)))
        return
    logger.handle(_record(logger, level, msg, fields, sys._getframe(1)))


def _record(logger: logging.Logger, level: int, msg: str, fields: dict[str, object],
            caller: Any) -> logging.LogRecord:
    code = caller.f_code
    record = logging.getLogRecordFactory()(logger.name, level, code.co_filename, caller.f_lineno, msg, (),
                                           None, code.co_name)
    record.__dict__.update(fields)
    return record


def _sole_json_handler(logger: logging.Logger, level: int) -> logging.StreamHandler | None:
    """The service's JSON handler if a record of `logger` at `level` would reach it and nothing
    else would see the record (what `Logger.handle` and `callHandlers` check), else None."""
    if logger.disabled or logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or not getattr(handler, "_cds_json", False):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if (found is None or level < found.level or found.filters or type(found) is not logging.StreamHandler
            or type(found.formatter) is not JsonFormatter):
        return None
    return found  # type: ignore[return-value]


def configure(level: str = "INFO") -> logging.Logger:
    """Install the JSON formatter on the package logger (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not any(getattr(h, "_cds_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._cds_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
