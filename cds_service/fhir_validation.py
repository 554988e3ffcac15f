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

_dumps = orjson.dumps
_JSONEncodeError = orjson.JSONEncodeError
_sha256 = hashlib.sha256


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


def _digest(resource: dict[str, Any]) -> bytes | None:
    """SHA-256 digest of the resource's JSON: equal digests mean equal JSON text, so equal
    content.  The members are kept in their order (sorting them cost 40% more): the same
    content sent in another order is only validated again, never given another's verdict.
    None when it cannot be serialised (e.g. an integer beyond 64 bits).  Runs for each matched
    resource of every hook call: module-level names, no attribute lookups, and SHA-256 rather
    than BLAKE2b, as current x86 and ARM CPUs compute it in hardware (OpenSSL's SHA extensions:
    ~0.8 µs for a 800-byte resource, BLAKE2b ~1.3 µs)."""
    try:
        text = _dumps(resource)
    except (TypeError, _JSONEncodeError):
        return None
    return _sha256(text).digest()


class ValidationVerdicts:
    """A bounded, thread-safe memory of R4B validation verdicts, keyed by a digest of the
    resource's JSON.

    EHRs send the same resources again and again (order-select fires on every change of the
    selection; a chart is reopened), and validating with fhir.resources costs far more than the
    rest of the evaluation.  Only a 256-bit digest and a boolean are kept, never record data.
    `size=0` disables it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(resource: dict[str, Any]) -> bytes | None:
        """The digest a verdict is remembered under (see `_digest`)."""
        return _digest(resource)

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
    digest = None
    if verdicts is not None and verdicts.size > 0:
        digest = _digest(resource)
        if digest is not None:
            known = verdicts.get(digest)
            if known is not None:
                return known
    return _validate(resource, resource_type, verdicts, digest)


def _validate(resource: dict[str, Any], resource_type: str, verdicts: ValidationVerdicts | None,
              digest: bytes | None) -> bool:
    """Validate with the R4B model (a verdict not remembered) and remember it under `digest`."""
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
