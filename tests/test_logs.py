"""The JSON log lines: the fields each hook call and each error writes, and the formatter itself
(allowlisted fields only, in a fixed order, timestamps exact to the millisecond)."""

from __future__ import annotations

import json
import logging
import time
from datetime import date

import pytest

from cds_service.demo_data import demo_resources
from cds_service.logs import ALLOWED_FIELDS, JsonFormatter
from tests.log_capture import service_log  # noqa: F401 (fixture)
from tests.servers import hook_body

PV = "/cds-services/b12-neck-pain-patient-view"
PATIENT = "demo-metformin-chronic"


def searchset(resources):
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


def demo_prefetch(pid: str) -> dict:
    res = demo_resources(pid, date.today())
    by_type = lambda t: [r for r in res if r["resourceType"] == t]  # noqa: E731
    return {"patient": by_type("Patient")[0], "conditions": searchset(by_type("Condition")),
            "medicationRequests": searchset(by_type("MedicationRequest")),
            **{k: searchset([]) for k in ("labResults", "findings", "findingValues", "medicationStatements",
                                          "procedures", "serviceRequests")}}


def lines(service_log, event: str) -> list[dict]:
    return [json.loads(line) for line in service_log.lines if json.loads(line).get("event") == event]


def test_a_hook_call_logs_its_request_id_outcome_and_timing_never_patient_data(client, service_log):
    body = hook_body(patient_id=PATIENT, prefetch=demo_prefetch(PATIENT))
    resp = client.post(PV, json=body)
    assert resp.status_code == 200 and len(resp.get_json()["cards"]) == 1
    [line] = lines(service_log, "hook")
    assert list(line) == ["ts", "level", "logger", "msg", "event", "hook_instance", "service", "status",
                          "duration_ms", "cards", "card_kinds", "reason", "policy"]
    assert line["level"] == "info" and line["logger"] == "cds_service.hooks" and line["msg"] == "hook"
    assert line["hook_instance"] == body["hookInstance"] and line["service"] == "b12-neck-pain-patient-view"
    assert line["status"] == 200 and line["cards"] == 1 and line["card_kinds"] == ["b12-test"]
    assert line["policy"] == "shown"
    assert isinstance(line["duration_ms"], float) and 0 < line["duration_ms"] < 10_000
    assert PATIENT not in service_log.text and "Metformin" not in service_log.text
    assert lines(service_log, "client_error") == []


def test_a_refused_hook_call_logs_the_hook_line_and_the_reason(client, service_log):
    resp = client.post(PV, data=b"{not json", content_type="application/json", headers={"Origin": "https://x.org"})
    assert resp.status_code == 400
    [hook] = lines(service_log, "hook")
    assert list(hook) == ["ts", "level", "logger", "msg", "event", "service", "status", "duration_ms"]
    assert hook["status"] == 400
    [error] = lines(service_log, "client_error")
    assert list(error) == ["ts", "level", "logger", "msg", "event", "status", "reason", "method", "path"]
    assert error["level"] == "warning" and error["status"] == 400 and error["method"] == "POST"
    assert error["path"] == PV and error["reason"].startswith("request body is not valid JSON")


def test_the_formatter_writes_only_allowed_fields_in_a_fixed_order():
    logger = logging.getLogger("cds_service.test")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "something %s", ("odd",), None, extra={
        "token": "eyJ-secret", "withheld_by": "suppression", "event": "e", "count": 0, "detail": None,
        "keys_fetched": ("a", "b"), "duration_ms": 1.5, "error_type": ValueError})
    entry = json.loads(JsonFormatter().format(record))
    assert list(entry) == ["ts", "level", "logger", "msg", "event", "duration_ms", "keys_fetched", "count",
                           "error_type", "withheld_by"]
    assert [f for f in ALLOWED_FIELDS if f in entry] == list(entry)[4:]
    assert entry["msg"] == "something %s"  # never formatted with arguments
    assert entry["keys_fetched"] == ["a", "b"] and entry["count"] == 0 and entry["error_type"] == str(ValueError)
    assert "eyJ-secret" not in json.dumps(entry)


def test_timestamps_are_exact_across_seconds_in_any_order():
    """The formatter reuses the text of the last second it wrote: records from other threads
    may come in out of order, and each must still carry its own time."""
    formatter = JsonFormatter()
    logger = logging.getLogger("cds_service.test")
    base = 1_790_000_000.0
    for created in (base + 0.0004, base + 0.999, base + 1.0, base + 0.5, base + 86_400.25, base + 1.001, base + 1.001):
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["ts"] == expected


def test_write_event_makes_the_record_logger_log_would(service_log):
    """The hook line's shortcut: the same record attributes, caller and levels as `logger.info`."""
    import inspect

    from cds_service.logs import write_event

    logger = logging.getLogger("cds_service.test")
    fields = {"event": "e", "hook_instance": "h-1", "duration_ms": 0.5}
    logger.info("line", extra=fields); line_info = inspect.currentframe().f_lineno  # noqa: E702
    write_event(logger, logging.INFO, "line", fields); line_event = inspect.currentframe().f_lineno  # noqa: E702
    via_info, via_event = service_log.records
    assert via_event.lineno == line_event and via_info.lineno == line_info
    assert {k: v for k, v in vars(via_event).items() if k not in ("lineno", "created", "msecs", "relativeCreated")} \
        == {k: v for k, v in vars(via_info).items() if k not in ("lineno", "created", "msecs", "relativeCreated")}
    assert via_event.funcName == "test_write_event_makes_the_record_logger_log_would"
    assert json.loads(service_log.lines[1])["hook_instance"] == "h-1"

    logger.setLevel(logging.WARNING)  # below the level: nothing
    try:
        write_event(logger, logging.INFO, "line", fields)
    finally:
        logger.setLevel(logging.NOTSET)
    logger.addFilter(lambda record: False)  # a filter refuses it: nothing
    try:
        write_event(logger, logging.INFO, "line", fields)
    finally:
        logger.filters.clear()
    assert len(service_log.records) == 2


class SoleJsonHandler:
    """The package logger as `logs.configure` leaves it in production: its JSON handler only
    (pytest attaches its own capture handlers; they are taken off for the block), writing to a
    StringIO."""

    def __enter__(self):
        import io

        self.package = logging.getLogger("cds_service")
        self.saved = list(self.package.handlers)
        (self.handler,) = [h for h in self.saved if getattr(h, "_cds_json", False)]
        self.package.handlers[:] = [self.handler]
        self.stream = io.StringIO()
        self.saved_stream = self.handler.setStream(self.stream)
        return self

    def __exit__(self, *exc):
        self.handler.setStream(self.saved_stream)
        self.package.handlers[:] = self.saved

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


FIELDS = {"event": "hook", "service": "svc", "status": 200, "hook_instance": "h-2", "duration_ms": 1.25,
          "cards": 1, "card_kinds": ["b12-test"], "reason": None, "policy": "shown"}


def test_write_event_to_the_sole_json_handler_writes_the_line_without_a_record(client, monkeypatch):
    from cds_service import logs

    logger = logs.get_logger("hooks")
    with SoleJsonHandler() as sole:
        logger.info("hook", extra=FIELDS)
        monkeypatch.setattr(logs, "_record", lambda *a: pytest.fail("a record was made"))
        logs.write_event(logger, logging.INFO, "hook", FIELDS)
        logs.write_event(logger, logging.DEBUG, "hook", FIELDS)  # below the level: nothing
        via_info, via_event = sole.lines()
        assert via_info.pop("ts")[:16] == via_event.pop("ts")[:16]
        assert list(via_event) == list(via_info) and via_event == via_info
        # A real hook call writes its line this way too.
        assert client.post(PV, data=b"{", content_type="application/json").status_code == 400
        hook = [line for line in sole.lines()[2:] if line["event"] == "hook"]
        assert [(line["status"], line["service"]) for line in hook] == [(400, "b12-neck-pain-patient-view")]


@pytest.mark.parametrize("change", ["other handler", "handler filter", "logger filter", "handler level",
                                    "logger disabled", "record factory"])
def test_write_event_leaves_the_shortcut_whenever_someone_else_could_see_the_record(change, monkeypatch):
    from cds_service import logs

    logger = logs.get_logger("hooks")
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record)

    def refuse(record):
        seen.append(record)
        return False

    with SoleJsonHandler() as sole:
        if change == "other handler":
            logger.addHandler(Collect())
        elif change == "handler filter":
            sole.handler.addFilter(refuse)
        elif change == "logger filter":
            logger.addFilter(refuse)
        elif change == "handler level":
            monkeypatch.setattr(sole.handler, "level", logging.WARNING)
        elif change == "logger disabled":  # what logging.config does to loggers it was not told about
            monkeypatch.setattr(logger, "disabled", True)
        elif change == "record factory":
            factory = logging.getLogRecordFactory()
            monkeypatch.setattr(logging, "_logRecordFactory", lambda *a, **k: seen.append(1) or factory(*a, **k))
        try:
            logs.write_event(logger, logging.INFO, "hook", FIELDS)
        finally:
            logger.handlers.clear(), logger.filters.clear(), sole.handler.filters.clear()
        records_seen, lines_written = {"other handler": (1, 1), "handler filter": (1, 0), "logger filter": (1, 0),
                                       "handler level": (0, 0), "logger disabled": (0, 0),
                                       "record factory": (1, 1)}[change]
        assert len(seen) == records_seen and len(sole.lines()) == lines_written


def test_write_event_survives_a_broken_stream(monkeypatch):
    from cds_service import logs

    class Broken:
        def write(self, text):
            raise OSError("disk full")

        def flush(self):
            pass

    errors: list[logging.LogRecord] = []
    with SoleJsonHandler() as sole:
        sole.handler.setStream(Broken())
        monkeypatch.setattr(sole.handler, "handleError", errors.append)
        logs.write_event(logs.get_logger("hooks"), logging.INFO, "hook", FIELDS)
    (record,) = errors
    assert record.hook_instance == "h-2" and record.funcName == "test_write_event_survives_a_broken_stream"
