"""Operational endpoints: health for load balancers, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response

from cds_service import metrics
from cds_service.services import services
from cds_service.http.errors import json_response

blueprint = Blueprint("ops", __name__)

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


@blueprint.get("/healthz")
def healthz() -> Response:
    """Liveness and readiness: the knowledge is loaded and the database answers."""
    s = services()
    checks = {"knowledge": "ok", "database": "ok"}
    status = 200
    try:
        s.store.ping()
    except Exception:  # any storage failure makes the instance unready
        checks["database"] = "unavailable"
        status = 503
    return json_response({"status": "ok" if status == 200 else "unavailable", "checks": checks}, status)


@blueprint.get("/metrics")
def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, mimetype=content_type.split(";")[0], content_type=content_type)


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    return json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))


@blueprint.get("/openapi.json")
def openapi() -> Response:
    return json_response(openapi_document())
