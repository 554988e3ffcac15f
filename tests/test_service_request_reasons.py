"""The suggested ServiceRequest's reason: the neck-pain records it is for (reasonReference, each
once, in record order), else the text "Neck pain".  A single entry is read without the
de-duplication loop (cards._service_request): both paths must answer the same."""

from types import SimpleNamespace

import pytest

from cds_service.cards import build_service_request
from cds_service.facts import Evidence


def _ev(rid):
    return Evidence("neck-pain", "Cervicalgia", "Condition", rid)


def _reasons(*ids):
    facts = SimpleNamespace(patient_id="p1", neck_pain=tuple(_ev(i) for i in ids))
    context = SimpleNamespace(encounter_id=None, user_id="Practitioner/u1")
    sr = build_service_request(loinc="2132-9", display="Cobalamin", text="Vitamin B12", facts=facts,
                               context=context, intent="proposal")
    assert sr is not None
    return sr.get("reasonReference"), sr.get("reasonCode")


@pytest.mark.parametrize("ids, expected", [
    (("np-1",), ([{"reference": "Condition/np-1"}], None)),
    ((None,), (None, [{"text": "Neck pain"}])),
    (("np-1", "np-1"), ([{"reference": "Condition/np-1"}], None)),
    ((None, "np-2"), ([{"reference": "Condition/np-2"}], None)),
    (("np-2", "np-1", "np-2"), ([{"reference": "Condition/np-2"}, {"reference": "Condition/np-1"}], None)),
    ((None, None), (None, [{"text": "Neck pain"}])),
])
def test_reasons(ids, expected):
    assert _reasons(*ids) == expected
