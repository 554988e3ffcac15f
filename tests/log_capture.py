"""`service_log`: the `cds_service` logger's records and their JSON lines during one test (the
package logger does not propagate to the root logger, so pytest's caplog does not see it)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cds_service.logs import LOGGER_NAME, JsonFormatter


class ServiceLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(JsonFormatter().format(record))

    def events(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == name]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def service_log() -> Iterator[ServiceLog]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, old_level = ServiceLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)
