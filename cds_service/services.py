"""The long-lived objects one app shares between requests, and how a request finds them.

This module sits below both the app factory (`app.py`, which builds a `Services`) and the HTTP
layer (`http/`, which reads it with `services()`), so dependencies point one way: `http/` never
imports the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the real imports happen in create_app, after settings and logging
    from flask import Flask

    from cds_service.config import Settings
    from cds_service.engine import ClinicalEngine
    from cds_service.patient_data import PatientDataGatherer
    from cds_service.policy import AlertPolicy
    from cds_service.security import RequestVerifier
    from cds_service.store import Store

EXTENSION_KEY = "cds"
"""Key of the `Services` in `app.extensions`."""


@dataclass
class Services:
    """Long-lived objects shared by all requests of one app (one per worker process)."""

    settings: Settings
    engine: ClinicalEngine
    store: Store
    verifier: RequestVerifier
    patient_data: PatientDataGatherer
    policy: AlertPolicy
    record_cards: bool = True
    """False only for `b12-cds evaluate --use-store`: read suppressions, write nothing."""


def services(app: Flask | None = None) -> Services:
    """The `Services` of the current (or given) app."""
    from flask import current_app

    return (app or current_app).extensions[EXTENSION_KEY]
