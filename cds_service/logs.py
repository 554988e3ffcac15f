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
        second = int(record.created)
        cached, text = self._second
        if cached != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        entry = {
            "ts": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage() if not record.args else record.msg,
        }
        # The record's own attributes (what `extra=` set): `getattr(record, name, None)` raised
        # and caught an AttributeError for each absent field, most of the formatter's time.
        attributes = record.__dict__
        for name in ALLOWED_FIELDS:
            value = attributes.get(name)
            if value is not None:
                entry[name] = value
        return orjson.dumps(entry, default=str).decode()


def write_event(logger: logging.Logger, level: int, msg: str, fields: dict[str, object]) -> None:
    """`logger.log(level, msg, extra=fields)` with less work, for a line written on every hook
    call: the caller's frame is taken directly instead of searched for on the stack, and the
    fields are set on the record in one update instead of one checked assignment each (they are
    `ALLOWED_FIELDS` names, none of which is a LogRecord attribute).  The record is made by the
    record factory and handled by `logger.handle`, so levels, filters, handlers and
    propagation treat it as any other record."""
    if not logger.isEnabledFor(level):
        return
    caller = sys._getframe(1)
    code = caller.f_code
    record = logging.getLogRecordFactory()(logger.name, level, code.co_filename, caller.f_lineno, msg, (),
                                           None, code.co_name)
    record.__dict__.update(fields)
    logger.handle(record)


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
