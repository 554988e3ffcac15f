"""facts._status_codes reads a one-coding status without its loop: it must give exactly the set
the reference derivation (tests/reference_facts.py) gives, for every shape a client may send."""

import pytest

from cds_service.facts import _status_codes
from tests.reference_facts import _status_codes as reference_status_codes


class _Str(str):
    pass


SHAPES = [
    None, "active", [], {}, {"coding": None}, {"coding": "active"}, {"coding": []},
    {"coding": [{"code": "active"}]},
    {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
    {"coding": [{"code": ""}]}, {"coding": [{"code": "   "}]}, {"coding": [{"code": " active "}]},
    {"coding": [{"code": None}]}, {"coding": [{"code": 1}]}, {"coding": [{"code": ["active"]}]},
    {"coding": [{}]}, {"coding": ["active"]}, {"coding": [None]},
    {"coding": [{"code": _Str("active")}]},
    {"coding": [{"code": "active"}, {"code": "recurrence"}]},
    {"coding": [{"code": "active"}, {"code": ""}, "x", {"code": "active"}]},
]


@pytest.mark.parametrize("concept", SHAPES)
def test_status_codes_as_the_reference(concept):
    got = _status_codes(concept)
    assert got == reference_status_codes(concept)
    assert isinstance(got, set)


def test_one_coding_answer_is_not_shared():
    # a fresh set per call: a caller that changes it cannot change the next call's answer
    concept = {"coding": [{"code": "active"}]}
    first = _status_codes(concept)
    first.add("changed")
    assert _status_codes(concept) == {"active"}
