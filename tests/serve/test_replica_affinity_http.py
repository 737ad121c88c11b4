"""Replica affinity: the turns of one conversation go to one replica of an expert (coe.affinity), and to another
replica when that one dies. An extra app beside the session's: one SmolLM2 expert with two replicas."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.serve import api

PREFIX = "/affinity"


@pytest.fixture(scope="module")
def two_replicas(coe_url: str) -> Iterator[str]:
    from coe.config import AutoscalingConfig

    cfg = api.small_config("coe-affinity")
    e = cfg.experts[0]
    e.autoscaling = AutoscalingConfig(min_replicas=2, max_replicas=2)
    assert e.replica_affinity is None  # the default: on, since the expert has more than one replica
    with api.small_app(coe_url, cfg, PREFIX) as url:
        yield url


def _messages(first: str, turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": first}]
    for i in range(turns - 1):
        msgs += [{"role": "assistant", "content": f"Answer {i}."}, {"role": "user", "content": f"And then {i}?"}]
    return msgs


def _turn(url: str, first: str, turns: int, session: str | None = None) -> str:
    """Send turn `turns` of a conversation (pinned to `general`); the replica that answered."""
    msgs = _messages(first, turns)
    headers = {"x-coe-session": session} if session else {}
    r = api.post(f"{url}/v1/chat/completions", json={"model": "general", "messages": msgs, "max_tokens": 2},
                 headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-coe-replica"]


def _replicas(app: str, deployment: str) -> dict[str, object]:
    import ray

    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in name:
            out[name.rsplit("#", 1)[1]] = ray.get_actor(name, namespace=a["namespace"])
    return out


def _streamed_turn(url: str, first: str, turns: int) -> str:
    """Like _turn, streamed through the openai client: the replica named by the stream's headers."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ["COE_ADMIN_KEY"], max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(model="general", messages=_messages(first, turns),
                                                           max_tokens=2, stream=True)
    chunks = list(raw.parse())
    assert chunks and chunks[0].model == "general"
    return raw.headers["x-coe-replica"]


def test_a_conversation_keeps_its_replica_and_conversations_spread(two_replicas: str) -> None:
    first = f"Tell me about the sea ({uuid.uuid4().hex[:6]})."
    seen = {_turn(two_replicas, first, n) for n in range(1, 5)}
    assert len(seen) == 1, seen
    assert _streamed_turn(two_replicas, first, 5) in seen  # a streamed turn goes there too, and says so
    spread = {_turn(two_replicas, f"Question {uuid.uuid4().hex}", 1) for _ in range(10)}
    assert len(spread) == 2, spread  # ten conversations over two replicas: both used


def test_affinity_falls_back_to_another_replica_when_its_replica_dies(two_replicas: str) -> None:
    import ray

    sid = f"conv-{uuid.uuid4().hex}"
    first = "Tell me about mountains."
    mine = _turn(two_replicas, first, 1, sid)
    assert _turn(two_replicas, first, 2, sid) == mine
    actors = _replicas("coe-affinity", "general")
    assert mine in actors, (mine, list(actors))
    ray.kill(actors[mine])  # Serve replaces it
    other = _turn(two_replicas, first, 3, sid)  # answered (a retry if it was sent to the dead one), elsewhere
    assert other != mine
    deadline = time.time() + 180
    while len(_replicas("coe-affinity", "general")) < 2 and time.time() < deadline:
        time.sleep(1)
    api.wait_ready(two_replicas)
    # The new replica exists before the ingress's request router knows it (Serve's long poll): wait until fresh
    # conversations are answered by two replicas again.
    seen: set[str] = set()
    while len(seen) < 2 and time.time() < deadline:
        seen.add(_turn(two_replicas, f"Question {uuid.uuid4().hex}", 1))
    assert len(seen) == 2, seen
    # With both replicas back, the conversation has one replica again, whichever the hash now picks.
    again = {_turn(two_replicas, first, n, sid) for n in (4, 5, 6)}
    assert len(again) == 1, again
