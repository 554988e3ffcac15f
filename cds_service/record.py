"""The patient's data as gathered for one hook call: raw FHIR JSON, grouped by resource type.

`patient_data.gather()` produces a `PatientRecord` (from prefetch, else the FHIR server);
`facts.derive_facts()` consumes it.  Resources stay raw JSON dicts here: code matching runs on the
raw JSON and only the resources the rules actually use are validated with fhir.resources R4B
(see facts.py), which keeps large records cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cds_service.frozen import fast_init

Resource = dict[str, Any]

# Prefetch keys published in discovery (patient_data.py holds their templates).  Card text can
# name a key that could not be obtained ("medications could not be checked"): the wording for
# each key lives in cards/common.json under "unavailable_data".
PREFETCH_KEYS: tuple[str, ...] = (
    "patient",
    "conditions",
    "labResults",
    "findings",
    "findingValues",
    "medicationRequests",
    "medicationStatements",
    "procedures",
    "serviceRequests",
)
REQUIRED_KEYS: frozenset[str] = frozenset({"patient", "conditions"})


@fast_init
@dataclass(frozen=True)
class PatientRecord:
    """Everything the rules may look at for one patient."""

    patient: Resource | None
    conditions: tuple[Resource, ...] = ()
    observations: tuple[Resource, ...] = ()
    medication_requests: tuple[Resource, ...] = ()
    medication_statements: tuple[Resource, ...] = ()
    procedures: tuple[Resource, ...] = ()
    service_requests: tuple[Resource, ...] = ()
    medications: tuple[Resource, ...] = ()
    """Medication resources (e.g. `_include`d by a MedicationRequest search) that a
    `medicationReference` may point to."""
    draft_orders: tuple[Resource, ...] = ()
    """Resources from `context.draftOrders` (order-select / order-sign)."""
    unavailable: frozenset[str] = frozenset()
    """Prefetch keys whose data could not be obtained (neither prefetched nor fetched)."""

    @classmethod
    def from_resources(cls, resources: list[Resource], *, draft_orders: list[Resource] = (),
                       unavailable: frozenset[str] = frozenset()) -> "PatientRecord":
        """Group a flat list of resources by type (duplicates by type+id are dropped)."""
        # Runs over every resource of every hook call: plain loops, local names, no helpers.
        seen: set[str] = set()
        groups: dict[str, list[Resource]] = {}
        patient: Resource | None = None
        for res in resources:
            if type(res) is not dict:
                continue
            rtype = res.get("resourceType")
            if type(rtype) is not str:
                continue  # malformed: no usable type (a list or object here must not crash us)
            rid = res.get("id")
            if type(rid) is str:
                key = f"{rtype}/{rid}"
                if key in seen:
                    continue
                seen.add(key)
            if rtype == "Patient":
                patient = patient or res
            else:
                group = groups.get(rtype)
                if group is None:
                    groups[rtype] = group = []
                group.append(res)
        return cls(
            patient=patient,
            conditions=tuple(groups.get("Condition", ())),
            observations=tuple(groups.get("Observation", ())),
            medication_requests=tuple(groups.get("MedicationRequest", ())),
            medication_statements=tuple(groups.get("MedicationStatement", ())),
            procedures=tuple(groups.get("Procedure", ())),
            service_requests=tuple(groups.get("ServiceRequest", ())),
            medications=tuple(groups.get("Medication", ())),
            draft_orders=tuple(r for r in draft_orders if isinstance(r, dict)) if draft_orders else (),
            unavailable=unavailable,
        )
