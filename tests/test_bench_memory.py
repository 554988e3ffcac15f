"""The memory benchmark's EHR-shaped prefetch (bench/memory.py) is what the service would decide
on the plain one: the extra narrative, identifiers, local codes and references change the
request's size, not its meaning, so its memory numbers are for a real hook call."""

from __future__ import annotations

import orjson

from bench.common import HOOK_PATH, card_problems, normalise_cards
from bench.inproc import make_service_app
from bench.memory import ehr_shaped_body


def test_ehr_shaped_prefetch_is_larger_and_gives_the_same_cards(tmp_path) -> None:
    shaped, plain, count = ehr_shaped_body(300)
    assert count == 300
    assert 1.5 * len(plain) < len(shaped) < 3 * len(plain)
    resources = [e["resource"] for v in orjson.loads(shaped)["prefetch"].values()
                 if isinstance(v, dict) and v.get("resourceType") == "Bundle" for e in v["entry"]]
    assert all(r["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml">') for r in resources)
    client = make_service_app(str(tmp_path)).test_client()
    answers = [client.post(HOOK_PATH, data=body, content_type="application/json") for body in (plain, shaped)]
    assert [a.status_code for a in answers] == [200, 200]
    assert not card_problems(answers[1].data)
    assert normalise_cards(answers[0].data) == normalise_cards(answers[1].data)
