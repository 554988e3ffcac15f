"""PLACEHOLDER (owned by the patient-data helper; replaced wholesale)."""
from cds_service.record import PatientRecord


class GatherResult:
    def __init__(self, record):
        self.record = record
        self.fetched_keys = ()
        self.failed_keys = ()
        self.skipped_resources = 0


class PatientDataGatherer:
    def __init__(self, settings):
        self.settings = settings

    def prefetch_templates(self, hook, engine):
        return {"patient": "Patient/{{context.patientId}}"}

    def gather(self, request, templates):
        res = [v for v in request.prefetch.values() if isinstance(v, dict)]
        flat = []
        for r in res:
            if r.get("resourceType") == "Bundle":
                flat += [e.get("resource") for e in r.get("entry", []) if isinstance(e, dict)]
            else:
                flat.append(r)
        return GatherResult(PatientRecord.from_resources(flat))
