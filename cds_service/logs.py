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
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage() if not record.args else record.msg,
        }
        for name in ALLOWED_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        return orjson.dumps(entry, default=str).decode()


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
