"""Cascade and Skeleton Graph Decoding through the HTTP API and the openai client, on real Ray Serve and the real
CPU experts (cpu-default: the cascade is calibrated on the committed profile's train split)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.serve import api

pytestmark = pytest.mark.serve

EXPERTS = {"general", "code", "translation"}
CODE = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n```python\n"
        "def double(x):\n    '''Return twice x.\n    >>> double(2)\n    4\n    >>> double(-3)\n    -6\n    '''\n```")
COMPOSITE = "(a) What is 15 + 27? (b) Translate to French: good night."


def _sse(lines: list[str]) -> list[dict[str, Any]]:
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_cascade_through_the_openai_client(client) -> None:  # noqa: ANN001
    raw = client.chat.completions.with_raw_response.create(
        model="coe-auto", messages=[{"role": "user", "content": CODE}], max_tokens=96, temperature=0,
        extra_body={"coe": {"strategy": "cascade"}})
    resp = raw.parse()
    info = raw.http_response.json()["coe"]
    assert raw.headers["x-coe-strategy"] == "cascade"
    steps = info["steps"]
    assert 1 <= len(steps) <= 3 and {s["expert"] for s in steps} <= EXPERTS
    assert [s["expert"] for s in steps] == info["candidates"][: len(steps)]
    assert resp.model == raw.headers["x-coe-expert"] == steps[-1]["expert"]
    for s in steps[:-1]:  # every step but the answering one escalated, and says why
        assert s["decision"] == "escalated" and s["why"]
    assert steps[-1]["decision"].startswith("accepted")
    if len(steps) > 1 or "verif" in steps[0].get("why", ""):
        assert any("verifier" in s for s in steps)  # the prompt's doctests were run against the answer
    assert resp.choices[0].message.content.strip()
    assert resp.usage.total_tokens >= sum(s["tokens"] for s in steps if "tokens" in s)


def test_cascade_request_step_limit(client) -> None:  # noqa: ANN001
    raw = client.chat.completions.with_raw_response.create(
        model="coe-auto", messages=[{"role": "user", "content": CODE}], max_tokens=48, temperature=0,
        extra_body={"coe": {"strategy": "cascade", "max_steps": 1}})
    info = raw.http_response.json()["coe"]
    assert len(info["steps"]) == 1 and info["candidates"] == [info["routed"]]
    assert info["steps"][0]["decision"].startswith("accepted (last candidate")


def test_cascade_streams_only_the_accepted_answer(coe_url: str) -> None:
    body = {"model": "coe-auto", "messages": [{"role": "user", "content": CODE}], "max_tokens": 96,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "coe": {"strategy": "cascade"}}
    with api.stream("POST", f"{coe_url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["x-coe-strategy"] == "cascade"
        chunks = _sse(list(r.iter_lines()))
    finishing = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["coe"]["strategy"] == "cascade"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text.strip()
    assert {c["model"] for c in chunks} == {finishing[0]["coe"]["steps"][-1]["expert"]}
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_sgd_answers_a_composite_request_node_by_node(coe_url: str, stream: bool) -> None:
    # cpu-default lists the parts' answers (compose: concat); the streamed variant asks for the composer model.
    coe = {"strategy": "sgd", **({"sgd_compose": "model"} if stream else {})}
    body = {"model": "coe-auto", "messages": [{"role": "user", "content": COMPOSITE}], "max_tokens": 96,
            "temperature": 0, "coe": coe, "stream": stream}
    headers, info, text = _post(coe_url, body, stream)
    assert text.strip()
    assert headers["x-coe-strategy"] == "sgd"
    planner = info["steps"][0]
    assert planner["role"] == "planner" and planner["how"] == "parts" and planner["valid"] is True
    nodes = [s for s in info["steps"] if s["role"] == "node"]
    assert [n["question"] for n in nodes] == ["What is 15 + 27?", "Translate to French: good night."]
    assert nodes[1]["expert"] == "translation"  # each part went to its own expert
    assert {n["expert"] for n in nodes} <= EXPERTS
    a, b = nodes
    assert b["start_ms"] < a["start_ms"] + a["ms"]  # independent parts decoded at the same time
    composer = info["steps"][-1]
    assert composer["role"] == "composer"
    if stream:
        assert composer["expert"] == "general" and composer["how"] == "streamed"
        assert headers["x-coe-expert"] == "general"
    else:  # concat: each part under its label, the parts' own answers
        assert composer["how"] == "concat" and headers["x-coe-expert"] == "coe-auto"
        assert text.startswith("(a) What is 15 + 27?") and "(b) Translate to French: good night." in text


def test_sgd_with_the_model_planner(coe_url: str) -> None:
    body = {"model": "coe-auto", "messages": [{"role": "user", "content": "What is 15 + 27, and how do you say "
                                               "good night in French?"}], "max_tokens": 64, "temperature": 0,
            "coe": {"strategy": "sgd", "sgd_planner": "model"}}
    headers, info, text = _post(coe_url, body, False)
    assert text.strip()
    planner = info["steps"][0]
    assert planner["role"] == "planner" and planner["how"] == "model" and planner["expert"] == "general"
    assert planner["tokens"] > 0
    if info.get("fell_back_to") == "route":  # the plan was refused: routed instead, and the response says why
        assert headers["x-coe-strategy"] == "route" and info["why"] and planner["valid"] is False
        return
    assert headers["x-coe-strategy"] == "sgd" and planner["valid"] is True
    nodes = [s for s in info["steps"] if s["role"] == "node"]
    assert len(nodes) == len(info["plan"]["nodes"]) >= 2 and {n["expert"] for n in nodes} <= EXPERTS
    for edge in info["plan"]["edges"]:  # a node starts after the node it depends on
        a = next(n for n in nodes if n["node"] == edge["from"])
        b = next(n for n in nodes if n["node"] == edge["to"])
        assert b["start_ms"] >= a["start_ms"] + a["ms"] - 1


def test_sgd_parts_planner_refuses_a_single_question(coe_url: str) -> None:
    body = {"model": "coe-auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "coe": {"strategy": "sgd", "sgd_planner": "parts"}}
    headers, info, text = _post(coe_url, body, False)
    assert headers["x-coe-strategy"] == "route" and info["fell_back_to"] == "route" and "enumerate" in info["why"]
    assert headers["x-coe-expert"] in EXPERTS and text.strip()


def _post(coe_url: str, body: dict[str, Any], stream: bool) -> tuple[Any, dict[str, Any], str]:
    if stream:
        with api.stream("POST", f"{coe_url}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            headers = r.headers
            chunks = _sse(list(r.iter_lines()))
        info = next(c["coe"] for c in chunks if "coe" in c)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        return headers, info, text
    r = api.post(f"{coe_url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.headers, r.json()["coe"], r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, param", [
    ({"model": "general", "coe": {"strategy": "cascade"}}, "coe.strategy"),
    ({"model": "coe-auto", "coe": {"strategy": "beam"}}, "coe.strategy"),
    ({"model": "coe-auto", "coe": {"strategy": "cascade", "sgd_planner": "model"}}, "coe.sgd_planner"),
    ({"model": "coe-auto", "coe": {"strategy": "sgd", "budget_usd": 0.01}}, "coe.budget_usd"),
    ({"model": "coe-auto", "coe": {"sgd_compose": "concat"}}, "coe.sgd_compose"),
    ({"model": "coe-auto", "coe": {"strategy": "cascade", "max_steps": 0}}, "coe.max_steps"),
])
def test_bad_strategy_requests_are_400(coe_url: str, body: dict[str, Any], param: str) -> None:
    r = api.post(f"{coe_url}/v1/chat/completions",
                 json={**body, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
