"""Validation of FHIR R4 resources with fhir.resources' R4B models, with remembered verdicts.

Only the resources the rules use are validated (the facts layer matches codes on raw JSON
first), and the service's own suggested ServiceRequest is validated before it is offered.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import orjson


def _model_for(resource_type: str) -> Any:
    """The fhir.resources R4B model class (imported lazily: only matched resources need it)."""
    if resource_type == "Condition":
        from fhir.resources.R4B.condition import Condition as model
    elif resource_type == "Observation":
        from fhir.resources.R4B.observation import Observation as model
    elif resource_type == "MedicationRequest":
        from fhir.resources.R4B.medicationrequest import MedicationRequest as model
    elif resource_type == "MedicationStatement":
        from fhir.resources.R4B.medicationstatement import MedicationStatement as model
    elif resource_type == "Procedure":
        from fhir.resources.R4B.procedure import Procedure as model
    elif resource_type == "ServiceRequest":
        from fhir.resources.R4B.servicerequest import ServiceRequest as model
    elif resource_type == "Patient":
        from fhir.resources.R4B.patient import Patient as model
    else:
        return None
    return model


class ValidationVerdicts:
    """A bounded, thread-safe memory of R4B validation verdicts, keyed by a digest of the
    resource's canonical JSON.

    EHRs send the same resources again and again (order-select fires on every change of the
    selection; a chart is reopened), and validating with fhir.resources costs far more than the
    rest of the evaluation.  Only a 128-bit digest and a boolean are kept, never record data.
    `size=0` disables it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(resource: dict[str, Any]) -> bytes | None:
        try:
            canonical = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError):  # e.g. an integer beyond 64 bits
            return None
        return hashlib.blake2b(canonical, digest_size=16).digest()

    def get(self, key: bytes) -> bool | None:
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
            return verdict

    def put(self, key: bytes, verdict: bool) -> None:
        with self._lock:
            self._verdicts[key] = verdict
            self._verdicts.move_to_end(key)
            while len(self._verdicts) > self.size:
                self._verdicts.popitem(last=False)


def is_valid_r4b(resource: dict[str, Any], resource_type: str,
                 verdicts: ValidationVerdicts | None = None) -> bool:
    """Whether `resource` validates as the R4B `resource_type` (False for unknown types and
    for any validation failure); `verdicts`, when given and enabled, remembers the answer."""
    use_cache = verdicts is not None and verdicts.size > 0
    digest = ValidationVerdicts.key(resource) if use_cache else None
    if digest is not None:
        known = verdicts.get(digest)  # type: ignore[union-attr]
        if known is not None:
            return known
    model = _model_for(resource_type)
    try:
        valid = model is not None and resource.get("resourceType") == resource_type
        if valid:
            model.model_validate(resource)
    except Exception:  # noqa: BLE001 - any failure (ValidationError, RecursionError...) = invalid
        valid = False
    if digest is not None:
        verdicts.put(digest, valid)  # type: ignore[union-attr]
    return valid
