"""Discovery and hook calls.

The hook call reads top to bottom: authenticate, parse and check the request, gather the
patient's data (prefetch, else the FHIR server), evaluate (facts -> rules -> alert policy ->
cards), record the cards the rules chose (shown or withheld), answer.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Response, g, request
from werkzeug import Request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.utils import get_content_length

from cds_service import metrics, wire
from cds_service.services import Services, services
from cds_service.http.errors import FRONT_ERROR_ENVIRON, front_error, json_response
from cds_service.logs import get_logger, write_event
from cds_service.engine import Evaluation
from cds_service.explain import explain
from cds_service.facts import PatientFacts
from cds_service.policy import PolicyOutcome
from cds_service.rules import Decision
from cds_service.protocol import CdsError, HookRequest, cards_response, invalid_json, parse_hook_request
from cds_service.store import IssuedCard, Store

blueprint = Blueprint("hooks", __name__)
log = get_logger("hooks")

JSON_CONTENT_TYPES = ("application/json", "application/fhir+json")
EXPLANATION_EXTENSION = "org.b12-neck-cds.explanation"
"""Key of the answer's `extension` that carries the explanation (demo and dev modes only)."""


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str
    usage_requirements: str


@lru_cache(maxsize=8)
def load_service_definitions(cards_dir: str) -> dict[str, ServiceDefinition]:
    """The services offered, from `<cards_dir>/services.json` (data a deployment can replace)."""
    raw = json.loads((Path(cards_dir) / "services.json").read_text(encoding="utf-8"))
    return {
        s["id"]: ServiceDefinition(id=s["id"], hook=s["hook"], title=s["title"],
                                   description=s["description"],
                                   usage_requirements=s["usageRequirements"])
        for s in raw["services"]
    }


def service_definitions() -> dict[str, ServiceDefinition]:
    return load_service_definitions(services().settings.cards_dir)


def prefetch_templates(hook: str) -> dict[str, str]:
    s = services()
    return s.patient_data.prefetch_templates(hook, s.engine)


@blueprint.get("/cds-services")
@blueprint.get("/cds-services/")  # some EHRs and the sandbox's URL field add the slash
def discovery() -> Response:
    """CDS Hooks discovery: one service per hook, with the prefetch templates the rules need."""
    entries = []
    for svc in service_definitions().values():
        entries.append({
            "hook": svc.hook,
            "id": svc.id,
            "title": svc.title,
            "description": svc.description,
            "prefetch": prefetch_templates(svc.hook),
            "usageRequirements": svc.usage_requirements,
        })
    return json_response({"services": entries})


@blueprint.post("/cds-services/<service_id>")
def call_service(service_id: str) -> Response:
    """A hook call through Flask's dispatch.  `hook_route.HookRoute`, ahead of Flask, answers
    the calls to known services itself with the same `answer_hook`; Flask gets the rest (an
    unknown service's 404) and what the route leaves to Flask's routing (see there)."""
    s = services()
    svc = load_service_definitions(s.settings.cards_dir).get(service_id)
    if svc is None:
        raise CdsError(404, f"unknown CDS service {service_id[:64]!r}")
    counts: dict[str, object] = {}
    try:
        # The request object itself, not the `request` proxy: every attribute read through the
        # proxy costs a context-variable lookup, and the hook path reads dozens.
        return hook_response(answer_hook(s, svc, request._get_current_object(), counts))  # type: ignore[attr-defined]
    except Exception:
        g.hook_instance = counts.get("hook_instance")  # for the error handlers' lines
        raise


def hook_response(answer: bytes) -> Response:
    """The 200 answer of a hook call (`answer`: the JSON `answer_hook` made)."""
    return Response(answer, status=200, mimetype="application/json")


def answer_hook(s: Services, svc: ServiceDefinition, req: Request, counts: dict[str, object]) -> bytes:
    """A hook call of service `svc`: the JSON answer (status 200), else the exception to answer.
    Counted in the Prometheus metrics and logged (the `hook` line) either way.

    `req` is a plain werkzeug request (no Flask context is needed); `counts` receives the log
    line's fields, `hook_instance` among them once the body is parsed (for the error's line)."""
    started = time.perf_counter()
    status = 500
    try:
        answer = _evaluate_hook(s, svc, req, counts)
        status = 200
        return answer
    except (CdsError, HTTPException) as err:  # werkzeug raises 413 past MAX_CONTENT_LENGTH
        status = (err.status if isinstance(err, CdsError) else err.code) or 500
        raise
    finally:
        elapsed = time.perf_counter() - started
        requests_counted, latency = _hook_metrics(svc.id, status)
        requests_counted.inc()
        latency.observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            counts.update(event="hook", service=svc.id, status=status,
                          duration_ms=round(elapsed * 1000, 2))
            write_event(log, logging.INFO, "hook", counts)


@lru_cache(maxsize=256)
def _hook_metrics(service_id: str, status: int) -> tuple[Any, Any]:
    """The request counter and latency histogram of one (service, status): prometheus-client's
    `labels()` takes a lock and builds the key on every call.  Only known services get here (the
    404 above comes first) and statuses are few, so the cache stays small."""
    return (metrics.REQUESTS.labels(service_id, str(status)),
            metrics.LATENCY.labels(service_id, str(status)))


def _evaluate_hook(s: Services, svc: ServiceDefinition, req: Request, counts: dict[str, object]) -> bytes:
    """The hook call proper: the answer's JSON (`counts`: the log line's fields, filled in here)."""
    s.verifier.verify(req)
    body = read_json_body(req, max_depth=s.settings.max_json_depth, lazy_prefetch=True)
    hook_request = parse_hook_request(body, svc.hook, max_string_length=s.settings.max_string_length)
    counts["hook_instance"] = hook_request.hook_instance

    gathered = s.patient_data.gather(hook_request, s.patient_data.prefetch_templates(svc.hook, s.engine),
                                     needed=s.engine.resource_needed, needed_head=s.engine.head_needed)
    context = hook_request.context

    def policy(decision: Decision, facts: PatientFacts, now: datetime) -> PolicyOutcome | None:
        return s.policy.decide(decision, facts, svc.id, svc.hook, context.patient_id,
                               context.encounter_id, now)

    evaluation = s.engine.evaluate(gathered.record, hook_request, policy=policy)
    if s.record_cards:
        _record_issued(svc.id, hook_request, evaluation, s.store)

    if gathered.fhir_calls:  # the all-prefetch case adds nothing (no write to the metric files)
        metrics.FHIR_CALLS.inc(gathered.fhir_calls)
    if gathered.failed_keys:
        metrics.FHIR_FAILURES.inc(len(gathered.failed_keys))
    verdict = evaluation.policy
    counts.update(
        cards=len(evaluation.cards),
        card_kinds=sorted(set(evaluation.card_kinds.values())) or None,
        reason=evaluation.reason,
        policy=verdict.delivery if verdict else None,
        withheld_by=verdict.log_detail() if verdict else None,
        keys_fetched=list(gathered.fetched_keys) or None,
        keys_failed=list(gathered.failed_keys) or None,
        fhir_calls=gathered.fhir_calls or None,
        skipped_resources=(gathered.skipped_resources + evaluation.skipped_resources) or None,
    )
    answer = cards_response(evaluation.cards)
    if s.settings.demo_mode or s.settings.dev_mode:  # patient data: never in production answers
        explanation = explain(evaluation, unavailable_wording=s.engine.texts.common.get("unavailable_data"))
        explanation["data_sources"] = {
            "prefetched": sorted(k for k in hook_request.prefetch if k not in gathered.fetched_keys
                                 and k not in gathered.failed_keys),
            "fetched_from_fhir_server": list(gathered.fetched_keys),
            "fhir_calls": gathered.fhir_calls,
        }
        answer["extension"] = {EXPLANATION_EXTENSION: explanation}
    return orjson.dumps(answer)


def _record_issued(service_id: str, hook_request: HookRequest, evaluation: Evaluation,
                   store: Store) -> None:
    """Remember each card the rules chose, so feedback can be tied to its kind and the report
    can count what the policy withheld (the patient id is hashed)."""
    verdict = evaluation.policy
    situation = verdict.situation.to_json() if verdict is not None else None
    kinds = evaluation.card_kinds
    # IssuedCard(card_uuid, kind, suggestion_uuids, delivery, situation): positional, the
    # field order tests/test_hook_fixed_cost.py pins (keywords cost more on every call).
    issued = [IssuedCard(card_uuid, kinds.get(card_uuid, "unknown"), card.suggestion_uuids, "shown", situation)
              for card in evaluation.cards for card_uuid in (card.uuid,)]
    if verdict is not None and not verdict.shown and evaluation.decision.kind:
        cause = verdict.cause.withheld_by() if verdict.cause else {}
        issued.append(IssuedCard(str(uuid.uuid4()), evaluation.decision.kind, (), verdict.delivery,
                                 situation, json.dumps(cause, separators=(",", ":"))))
    if not issued:
        return
    context = hook_request.context
    store.record_issued_cards(service_id, hook_request.hook_instance, context.patient_id, issued,
                              encounter_id=context.encounter_id)
    for card in issued:
        _cards_counter(card.kind, card.delivery).inc()


@lru_cache(maxsize=256)
def _cards_counter(kind: str, delivery: str) -> Any:
    """The counter a card of `kind` delivered so adds one to: `cds_cards_issued_total{kind}` when
    shown, `cds_cards_withheld_total{kind, delivery}` when withheld (as `_hook_metrics`: `labels()`
    locks and builds its key on every call).  Kinds are the rules' ids and deliveries four, so
    the cache stays small."""
    if delivery == "shown":
        return metrics.CARDS_ISSUED.labels(kind)
    return metrics.CARDS_WITHHELD.labels(kind, delivery)


def read_json_body(req: Request, *, max_depth: int, lazy_prefetch: bool = False) -> Any:
    """Parse a JSON request body: 415 if not JSON, 413 if too large, 400 if malformed or too deep.

    With `lazy_prefetch` (hook calls), the values of `prefetch` that are JSON objects stay raw
    JSON (`cds_service.wire`): the gatherer decodes only the resources the rules can use.

    The depth limit covers the request envelope (everything except the contents of `prefetch`
    values, which can be megabytes of FHIR data: walking them would cost more than parsing).
    Prefetch contents are bounded by orjson's own 1024-level limit and are never walked
    recursively by this service.
    """
    # `req.mimetype` parses `req.headers.get("Content-Type", "")`, which is the environ's
    # CONTENT_TYPE: the same parse of the same text, remembered per text (a few distinct ones).
    if _mimetype(req.environ.get("CONTENT_TYPE", "")) not in JSON_CONTENT_TYPES:
        raise CdsError(415, "request body must be application/json")
    raw = read_body(req)
    body = wire.decode_hook_body(raw) if lazy_prefetch else None
    if body is None:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            raise invalid_json(err) from None
    if isinstance(body, dict) and envelope_depth(body, max_depth) > max_depth:
        raise CdsError(400, f"request JSON is nested deeper than {max_depth} levels")
    return body


@lru_cache(maxsize=64)
def _mimetype(content_type: str) -> str:
    """What werkzeug's `Request.mimetype` gives for a `Content-Type` header (its own parse)."""
    return (parse_options_header(content_type)[0] or "").lower()


def envelope_depth(body: dict[str, Any], limit: int) -> int:
    """`json_depth(envelope, limit) > limit` exactly when `envelope_depth(body, limit) > limit`,
    where the envelope is `body` without `prefetch` and, when `prefetch` is an object, with
    that object's values as nulls (their contents are bounded by orjson's own limit, see
    `read_json_body`), without building that envelope.  An object's depth is 1 + its deepest
    value's (a container's; scalars add nothing)."""
    deepest = 0
    for key, value in body.items():
        if key == "prefetch":
            if not isinstance(value, dict):
                continue  # left out of the envelope
            depth = 1  # an object of nulls
        elif isinstance(value, (dict, list)):
            depth = json_depth(value, limit - 1)  # exact up to limit - 1, else above it
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest >= limit:
                break  # the envelope is already deeper than `limit`
    return 1 + deepest


def read_body(req: Request) -> bytes:
    """The whole body, at most `MAX_CONTENT_LENGTH` bytes whatever the framing: 413 above it.

    werkzeug checks a declared `Content-Length`; a chunked body (no length) it would silently
    cut at the limit, so that case is read here with one byte more than allowed.  (Under
    `b12-cds serve` the front, cds_service.asgi, has already done the same in the event loop.)
    """
    environ = req.environ
    refused = environ.get(FRONT_ERROR_ENVIRON)
    if refused:
        raise front_error(refused)
    limit = req.max_content_length
    # `req.content_length`, from the environ values its headers read (EnvironHeaders).
    length = get_content_length(environ.get("CONTENT_LENGTH"), environ.get("HTTP_TRANSFER_ENCODING"))
    if length is not None and "wsgi.input_terminated" not in environ:
        # What `get_data` does here (werkzeug's get_input_stream + LimitedStream), in one read
        # instead of 64 KiB chunks copied twice: a third of the reading of a 300 KiB body.
        if limit is not None and length > limit:
            raise RequestEntityTooLarge()
        return _read_declared(environ["wsgi.input"], length)
    if length is not None or limit is None:
        return req.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    if not req.environ.get("wsgi.input_terminated"):
        return b""  # no length and a server that does not end the stream: nothing safe to read
    stream = req.environ["wsgi.input"]
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise CdsError(413, "request body too large")
    return b"".join(chunks)


def _read_declared(stream: Any, length: int) -> bytes:
    """`length` bytes of `stream`; `ClientDisconnected` (400) when it ends or fails sooner, as
    werkzeug's `LimitedStream` for a declared `Content-Length`."""
    chunks: list[bytes] = []
    size = 0
    while size < length:
        try:
            chunk = stream.read(length - size)
        except (OSError, ValueError):
            raise ClientDisconnected() from None
        if not chunk:
            raise ClientDisconnected()
        chunks.append(chunk)
        size += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of `value`, counting stops once `limit` is exceeded (iterative, no recursion)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return deepest
