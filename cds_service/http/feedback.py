"""CDS Hooks feedback (`POST /cds-services/{id}/feedback`) and the acceptance report.

A feedback body is checked completely before anything is stored: the first invalid entry
answers 400 with an OperationOutcome whose `expression` names the entry and field
(`feedback[2].outcome`), and nothing of that request is written.  Valid bodies are stored in one
transaction (idempotently) and answered `200 {}`.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, Response, request

from cds_service.services import services
from cds_service.http.errors import json_response
from cds_service.http.hooks import read_json_body, service_definitions
from cds_service.logs import get_logger
from cds_service.protocol import CdsError, bad_request, is_blank
from cds_service.store import timestamp_text

blueprint = Blueprint("feedback", __name__)
log = get_logger("feedback")

OUTCOMES = ("accepted", "overridden")
MAX_ENTRIES = 500
"""Feedback entries accepted in one POST (a clinician acts on a handful of cards at a time)."""
MAX_SUGGESTIONS = 100
MAX_ID_LENGTH = 128
"""Card and suggestion ids (our own are UUIDs, 36 characters)."""
MAX_SYSTEM_LENGTH = 2048
MAX_CODE_LENGTH = 256
MAX_DISPLAY_LENGTH = 1024

FUTURE_SKEW_SECONDS = 300
"""How far in the future (by this server's clock) an `outcomeTimestamp` may be: EHR clocks
drift, but feedback describes something a clinician already did."""

# RFC 3339 section 5.6 date-time, restricted to UTC (`Z` or a zero offset) as CDS Hooks requires.
# re.ASCII: RFC 3339's DIGIT is 0-9 only; without it `\d` (and int()) accept e.g. Arabic-Indic digits.
_RFC3339_UTC = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]00:00)$", re.ASCII)
_RFC3339_ANY_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?[+-]\d{2}:\d{2}$", re.ASCII)
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$", re.ASCII)


@blueprint.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> Response:
    """Store clinicians' feedback on cards issued by `service_id`."""
    s = services()
    s.verifier.verify(request)
    if service_id not in service_definitions():
        raise CdsError(404, f"unknown CDS service {service_id[:64]!r}")
    body = read_json_body(request, max_depth=s.settings.max_json_depth)
    entries = validate_feedback(body, max_comment_length=s.settings.max_string_length)
    result = s.store.save_feedback(service_id, entries, suppression_days=s.policy.periods.days)
    log.info("feedback", extra={
        "event": "feedback", "service": service_id, "status": 200, "count": result.stored,
        "detail": f"duplicates={result.duplicates} unknown_cards={len(result.unknown_cards)}"})
    return json_response({})


@blueprint.get("/admin/feedback-report")
def feedback_report() -> Response:
    """The acceptance report (`?since=YYYY-MM-DD` limits it to cards issued since): JSON, or an
    HTML page with charts when the client prefers text/html (a browser).

    Needs an admin token, not merely a hook-capable one (`RequestVerifier.verify_admin`)."""
    s = services()
    s.verifier.verify_admin(request)
    unknown = sorted(set(request.args) - {"since"})
    if unknown:
        raise bad_request("unknown query parameter; only 'since' is supported", unknown[0][:64])
    since = parse_since(request.args.get("since"))
    report = s.store.feedback_report(since)
    if request.accept_mimetypes.best_match(("application/json", "text/html")) == "text/html":
        from cds_service.reports.html import render_feedback_html  # matplotlib: loaded only when asked

        return Response(render_feedback_html(report, s.settings), mimetype="text/html")
    return json_response(report)


def parse_since(value: str | None) -> date | None:
    """A `YYYY-MM-DD` date or None; 400 naming `since` otherwise."""
    if value is None:
        return None
    try:
        if not _ISO_DATE.match(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise bad_request("since must be a date (YYYY-MM-DD)", "since") from None


def validate_feedback(body: Any, *, max_comment_length: int = 4096,
                      now: datetime | None = None) -> list[dict[str, Any]]:
    """Check a feedback body against CDS Hooks 2.0 (cds-fb-1..3) and return its entries, cleaned.

    Raises a 400 `CdsError` naming the first offending field, e.g. `feedback[2].outcome`.
    Cleaned entries keep only the members the store uses; `outcomeTimestamp` is rewritten in
    the store's fixed-width UTC form (`2021-12-11T10:05:31.000000Z`), so equal instants compare
    equal for idempotency.
    A timestamp more than `FUTURE_SKEW_SECONDS` after `now` (default: this server's clock) is
    rejected.  Unknown members (including `extension`) are tolerated, as the spec requires.
    """
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    raw = _present(body, "feedback", "")
    if not isinstance(raw, list) or not raw:
        raise bad_request("feedback must be a non-empty array", "feedback")
    if len(raw) > MAX_ENTRIES:
        raise bad_request(f"feedback has more than {MAX_ENTRIES} entries", "feedback")
    latest = (now or datetime.now(timezone.utc)) + timedelta(seconds=FUTURE_SKEW_SECONDS)
    return [_validate_entry(entry, f"feedback[{i}]", max_comment_length, latest)
            for i, entry in enumerate(raw)]


def _validate_entry(entry: Any, where: str, max_comment_length: int, latest: datetime) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise bad_request(f"{where} must be an object", where)
    _check_extension(entry, where)
    card = _string(entry, "card", where, MAX_ID_LENGTH)
    outcome = _string(entry, "outcome", where, 32)
    if outcome not in OUTCOMES:
        raise bad_request(f"{where}.outcome must be 'accepted' or 'overridden'", f"{where}.outcome")
    cleaned: dict[str, Any] = {"card": card, "outcome": outcome}

    suggestions = _optional(entry, "acceptedSuggestions", where)
    if outcome == "accepted":
        if suggestions is None:
            raise bad_request(f"{where}.acceptedSuggestions is required when outcome is accepted",
                              f"{where}.acceptedSuggestions")
        cleaned["acceptedSuggestions"] = _suggestions(suggestions, f"{where}.acceptedSuggestions")
    elif suggestions is not None:
        raise bad_request(f"{where}.acceptedSuggestions is only allowed when outcome is accepted",
                          f"{where}.acceptedSuggestions")

    override = _optional(entry, "overrideReason", where)
    if override is not None:
        if outcome != "overridden":
            raise bad_request(f"{where}.overrideReason is only allowed when outcome is overridden",
                              f"{where}.overrideReason")
        cleaned["overrideReason"] = _override_reason(override, f"{where}.overrideReason",
                                                     max_comment_length)

    timestamp = _string(entry, "outcomeTimestamp", where, 64)
    cleaned["outcomeTimestamp"] = _utc_timestamp(timestamp, f"{where}.outcomeTimestamp", latest)
    return cleaned


def _suggestions(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"{where} must be a non-empty array of {{\"id\": ...}} objects", where)
    if len(value) > MAX_SUGGESTIONS:
        raise bad_request(f"{where} has more than {MAX_SUGGESTIONS} items", where)
    ids: list[dict[str, str]] = []
    for i, item in enumerate(value):
        item_where = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{item_where} must be an object with an id", item_where)
        _check_extension(item, item_where)
        ids.append({"id": _string(item, "id", item_where, MAX_ID_LENGTH)})
    return ids


def _override_reason(value: Any, where: str, max_comment_length: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object", where)
    _check_extension(value, where)
    cleaned: dict[str, Any] = {}
    reason = _optional(value, "reason", where)
    if reason is not None:
        reason_where = f"{where}.reason"
        if not isinstance(reason, dict):
            raise bad_request(f"{reason_where} must be a Coding object", reason_where)
        _check_extension(reason, reason_where)
        coding = {"system": _string(reason, "system", reason_where, MAX_SYSTEM_LENGTH),
                  "code": _string(reason, "code", reason_where, MAX_CODE_LENGTH)}
        if _optional(reason, "display", reason_where) is not None:
            coding["display"] = _string(reason, "display", reason_where, MAX_DISPLAY_LENGTH)
        cleaned["reason"] = coding
    if _optional(value, "userComment", where) is not None:
        cleaned["userComment"] = _string(value, "userComment", where, max_comment_length)
    if not cleaned:
        raise bad_request(f"{where} needs a reason, a userComment or both", where)
    return cleaned


def _present(obj: dict[str, Any], key: str, where: str) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in obj:
        raise bad_request(f"{path} is required", path)
    if obj[key] is None:
        raise bad_request(f"{path} must not be null", path)
    return obj[key]


def _optional(obj: dict[str, Any], key: str, where: str) -> Any:
    """The member's value, None when absent; an explicit null is an error (spec: omit instead)."""
    if key in obj and obj[key] is None:
        raise bad_request(f"{where}.{key} must be omitted rather than null", f"{where}.{key}")
    return obj.get(key)


def _string(obj: dict[str, Any], key: str, where: str, max_len: int) -> str:
    value = _present(obj, key, where)
    path = f"{where}.{key}"
    if not isinstance(value, str) or is_blank(value):
        raise bad_request(f"{path} must be a non-empty string", path)
    if len(value) > max_len:
        raise bad_request(f"{path} is longer than {max_len} characters", path)
    return value


def _check_extension(obj: dict[str, Any], where: str) -> None:
    if "extension" in obj and not isinstance(obj["extension"], dict):
        raise bad_request(f"{where}.extension must be an object", f"{where}.extension")


def _utc_timestamp(value: str, where: str, latest: datetime) -> str:
    """Check an RFC 3339 UTC date-time not after `latest`; return it in the store's fixed-width
    UTC form."""
    match = _RFC3339_UTC.match(value)
    if not match:
        if _RFC3339_ANY_OFFSET.match(value):
            raise bad_request(f"{where} must be in UTC (end with Z)", where)
        raise bad_request(f"{where} must be an RFC 3339 date-time in UTC, e.g. 2021-12-11T10:05:31Z",
                          where)
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    micros = int((match.group(7) or ".0")[1:7].ljust(6, "0"))
    if second == 60:  # a leap second is valid RFC 3339; keep it ordered just before the next minute
        second, micros = 59, 999_999
    try:
        moment = datetime(year, month, day, hour, minute, second, micros, tzinfo=timezone.utc)
    except ValueError:
        raise bad_request(f"{where} is not a valid date-time", where) from None
    if moment > latest:
        raise bad_request(f"{where} is in the future (more than {FUTURE_SKEW_SECONDS} s after "
                          "this server's clock)", where)
    return timestamp_text(moment)
