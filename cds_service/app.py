"""The app factory: wires settings, knowledge, storage, security and the HTTP blueprints."""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from cds_service.config import Settings
from cds_service.services import EXTENSION_KEY, Services, services  # noqa: F401 (services: re-exported)

GC_THRESHOLDS = (50_000, 20, 100)
"""Young-generation threshold far above CPython's 700: a hook call allocates tens of thousands of
short-lived, acyclic containers (the parsed JSON, freed by reference counting when the request
ends); with the default, collections ran in the middle of requests and promoted live request
data into older generations, whose collections then showed up in the p99 (bench/RESULTS.md)."""


def tune_garbage_collector() -> None:
    """Process-wide GC settings for a long-lived server (called by `create_app`, i.e. in each
    gunicorn worker; the benchmark's baseline app calls it too, so comparisons stay fair).

    Everything loaded at start-up (value sets, card texts, the fhir.resources and pydantic model
    classes: tens of thousands of objects that live as long as the process) is moved out of the
    collector's reach with `gc.freeze()`, the documented remedy for long-lived servers, and the
    thresholds are raised (see `GC_THRESHOLDS`).  Cyclic garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the Flask app. `config` overrides settings read from `CDS_*` environment variables."""
    from cds_service import http, logs
    from cds_service.engine import ClinicalEngine
    from cds_service.patient_data import PatientDataGatherer
    from cds_service.policy import build_policy
    from cds_service.secret_files import ensure_private_dir
    from cds_service.security import RequestVerifier
    from cds_service.store import Store

    settings = Settings.from_env(config)
    logs.configure(settings.log_level)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    if not settings.database_url.strip() or settings.demo_mode or not settings.patient_hash_key:
        # The directory holds the SQLite database and/or generated keys: owner-only.
        ensure_private_dir(Path(settings.data_dir))
    store = Store.open(settings)
    engine = ClinicalEngine.load(settings)
    from cds_service.http.hooks import load_service_definitions

    common = engine.texts.common
    policy = build_policy(settings, store, common["override_reason_system"],
                          frozenset(common["override_reasons"]), frozenset(engine.texts.kinds),
                          frozenset(load_service_definitions(settings.cards_dir)))
    app.extensions[EXTENSION_KEY] = Services(
        settings=settings,
        engine=engine,
        store=store,
        verifier=RequestVerifier(settings, store),
        patient_data=PatientDataGatherer(settings),
        policy=policy,
    )
    http.register(app)
    tune_garbage_collector()
    if settings.auth_disabled:
        logging.getLogger("cds_service").warning(
            "auth_disabled", extra={"event": "auth_disabled",
                                    "detail": "CDS_AUTH_DISABLED=1: JWT verification is OFF (development only)"})
    return app
