"""Conversations through HTTP and the openai client: routed on their recent turns, kept on their expert.

The session service keeps conversations 10 s (conftest), so expiry is seen here.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("resting")

ASK = "Write a Python function that returns the n-th Fibonacci number. ({})"
FOLLOW_UP = "Thanks! Now make it shorter."
GERMAN = "Translate to German: The shop closes at six o'clock today."


def _ask(client: Any, messages: list[dict[str, str]], **kw: Any) -> tuple[str, str, str]:
    """(expert, route reason, answer)."""
    raw = client.chat.completions.with_raw_response.create(model="coe-auto", messages=messages, max_tokens=24,
                                                           temperature=0, **kw)
    answer = raw.parse().choices[0].message.content or ""
    return raw.headers["x-coe-expert"], raw.headers.get("x-coe-route-reason", ""), answer


def test_a_follow_up_stays_and_a_change_of_domain_switches(client: Any) -> None:
    first = {"role": "user", "content": ASK.format(uuid.uuid4().hex[:8])}
    expert, reason, answer = _ask(client, [first])
    assert expert == "code" and "sticky" not in reason, reason
    history = [first, {"role": "assistant", "content": answer or "def fib(n): ..."}]
    # "Now make it shorter" alone looks like chat (or nothing the router knows); as a turn of this conversation it
    # stays with the code expert that answered the question.
    e2, r2, a2 = _ask(client, [*history, {"role": "user", "content": FOLLOW_UP}])
    assert e2 == "code" and r2.startswith("sticky(code)"), r2
    history += [{"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": a2 or "shorter"}]
    e3, r3, _ = _ask(client, [*history, {"role": "user", "content": GERMAN}])
    assert e3 == "translation" and r3.startswith("switch(code->translation,"), r3


def test_the_follow_up_alone_is_routed_elsewhere(client: Any) -> None:
    """Without its conversation the follow-up goes where the router sends a bare line (what routing on the last
    turn did before): this is what stickiness and conversation routing change."""
    expert, reason, _ = _ask(client, [{"role": "user", "content": FOLLOW_UP}])
    assert expert == "general" and reason.startswith("fallback:ood"), (expert, reason)


def test_an_expired_conversation_routes_afresh(client: Any) -> None:
    first = {"role": "user", "content": ASK.format(uuid.uuid4().hex[:8])}
    expert, _, answer = _ask(client, [first])
    assert expert == "code"
    time.sleep(11)  # past the session's 10 s
    _, reason, _ = _ask(client, [first, {"role": "assistant", "content": answer or "x"},
                                 {"role": "user", "content": FOLLOW_UP}])
    assert not reason.startswith(("sticky", "switch")), reason


def test_a_session_header_names_the_conversation(client: Any) -> None:
    sid = f"conv-{uuid.uuid4().hex}"
    q = {"role": "user", "content": ASK.format(uuid.uuid4().hex[:8])}
    expert, _, _ = _ask(client, [q], extra_headers={"x-coe-session": sid})
    assert expert == "code"
    # The same session, a new first message and no history: still the conversation, still its expert.
    e2, r2, _ = _ask(client, [{"role": "user", "content": FOLLOW_UP}], extra_headers={"x-coe-session": sid})
    assert (e2, r2.split(";")[0]) == ("code", "sticky(code)"), r2
    # Another session id is another conversation.
    _, r3, _ = _ask(client, [{"role": "user", "content": FOLLOW_UP}],
                    extra_headers={"x-coe-session": f"conv-{uuid.uuid4().hex}"})
    assert not r3.startswith("sticky"), r3
    with pytest.raises(Exception) as err:
        _ask(client, [q], extra_headers={"x-coe-session": "x" * 300})
    assert getattr(err.value, "status_code", None) == 400


def test_the_route_endpoint_decides_for_the_conversation_without_moving_it(client: Any, coe_url: str) -> None:
    from tests.serve import api

    sid = {"x-coe-session": f"conv-{uuid.uuid4().hex}"}
    expert, _, _ = _ask(client, [{"role": "user", "content": ASK.format(uuid.uuid4().hex[:8])}], extra_headers=sid)
    assert expert == "code"

    def route(text: str) -> dict[str, Any]:
        r = api.post(f"{coe_url}/v1/route", json={"messages": [{"role": "user", "content": text}]}, headers=sid)
        assert r.status_code == 200, r.text
        return r.json()

    d = route(FOLLOW_UP)
    assert (d["expert"], d["reason"].split(";")[0]) == ("code", "sticky(code)"), d
    d = route(GERMAN)
    assert d["expert"] == "translation" and d["reason"].startswith("switch(code->translation,"), d
    # Asking was not a turn: the conversation is still on code.
    e2, r2, _ = _ask(client, [{"role": "user", "content": FOLLOW_UP}], extra_headers=sid)
    assert (e2, r2.split(";")[0]) == ("code", "sticky(code)"), r2
