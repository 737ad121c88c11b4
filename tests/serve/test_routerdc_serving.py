"""`coe-auto` through the RouterDC router trained on cpu-default's measured profile: the service decides as the
artifact does offline, headers, POST /v1/route, per-request thresholds, batching."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve import api

pytestmark = pytest.mark.usefixtures("resting")  # these tests assume the resting t = 0

PRICE = {"general": 0.0002, "code": 0.0003, "translation": 0.0001}  # cpu-default's prices
# Requests shaped like the profile's suites (so not out of distribution) and one of each domain.
CODE_Q = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n```python\n"
          "def merge_sorted(a: list, b: list) -> list:\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n```")
GERMAN_Q = "Translate to German: The shop closes at six o'clock today."


def _route(url: str, content: str = CODE_Q, **body: object) -> httpx.Response:
    return api.post(f"{url}/v1/route", json={"messages": [{"role": "user", "content": content}], **body}, timeout=30)


def test_route_returns_the_artifacts_decision_without_generating(coe_url: str, router) -> None:  # noqa: ANN001
    r = _route(coe_url)
    assert r.status_code == 200, r.text
    d = r.json()
    offline = router.route(CODE_Q, threshold=0.0)
    assert d["expert"] == offline.expert == "code"  # HumanEval-like: the code expert measured best there
    assert d["scores"] == pytest.approx(offline.scores, abs=1e-3) and set(d["scores"]) == set(PRICE)
    assert 0.0 <= d["confidence"] <= 1.0
    assert d["ood"] is False
    assert d["threshold"] == 0.0
    assert d["reason"] == "best_predicted_quality"
    assert d["route_ms"] > 0


def test_higher_threshold_picks_a_cheaper_expert_and_cap_protects_premium(coe_url: str) -> None:
    best = _route(coe_url).json()
    cheaper = {e: q for e, q in best["scores"].items() if PRICE[e] < PRICE[best["expert"]]}
    assert cheaper, best
    gap = best["scores"][best["expert"]] - max(cheaper.values())
    assert gap > 0
    t = min(1.0, gap + 0.01)
    # Within t of the best, the cheapest expert wins.
    loose = _route(coe_url, coe={"quality_threshold": t}).json()
    within = [e for e, q in best["scores"].items() if q >= best["scores"][best["expert"]] - t]
    assert loose["expert"] == min(within, key=PRICE.__getitem__) != best["expert"]
    assert loose["reason"].startswith("cheaper_within_threshold")
    by_name = _route(coe_url, model=f"coe-auto@{t:.4f}").json()
    assert by_name["expert"] == loose["expert"]
    capped = _route(coe_url, coe={"quality_threshold": t, "max_quality_threshold": 0.0}).json()
    assert capped["expert"] == best["expert"] and capped["threshold"] == 0.0


def test_route_rejects_bad_thresholds_and_pinned_models(coe_url: str) -> None:
    assert _route(coe_url, model="coe-auto@2").status_code == 400
    assert _route(coe_url, model="coe-auto@x").status_code == 400
    assert _route(coe_url, coe={"quality_threshold": -1}).status_code == 400
    assert _route(coe_url, model="coe-auto@0.1", coe={"quality_threshold": 0.2}).status_code == 400
    assert _route(coe_url, model="code").status_code == 400


def test_chat_headers_carry_the_decision(coe_url: str) -> None:
    r = api.post(f"{coe_url}/v1/chat/completions", timeout=120, json={
        "model": "coe-auto", "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 4})
    assert r.status_code == 200
    assert r.headers["x-coe-expert"] == "code"
    assert r.headers["x-coe-threshold"] == "0"
    assert r.headers["x-coe-route-reason"] == "best_predicted_quality"
    assert 0.0 <= float(r.headers["x-coe-confidence"]) <= 1.0


def test_concurrent_decisions_are_batched_and_match_the_artifact(coe_url: str, router) -> None:  # noqa: ANN001
    prompts = [f"Translate to German: The shop closes at {i} o'clock today." for i in range(1, 25)]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(timeout=60, headers=api.auth()) as c:
            rs = await asyncio.gather(*[c.post(f"{coe_url}/v1/route", json={"prompt": p}) for p in prompts])
        return [r.json() for r in rs]

    out = asyncio.run(burst())
    offline = router.route_batch(prompts, threshold=0.0)
    assert all(d.expert == "translation" for d in offline)  # the translation expert measured best
    t_max = api.get(f"{coe_url}/v1/coe/state", timeout=10).json()["controller"]["t_max"]
    for d, o in zip(out, offline):
        assert d["scores"] == pytest.approx(o.scores, abs=1e-3)
        if d["reason"].startswith("overflow"):  # a burst beyond translation's capacity spills within t_max
            assert d["scores"]["translation"] - d["scores"][d["expert"]] <= t_max + 1e-9, d
        else:
            assert d["expert"] == "translation" and d["reason"] == "best_predicted_quality", d
    assert sum(d["expert"] == "translation" for d in out) >= 4
    assert max(d["batch_size"] for d in out) > 1


def test_a_repeated_text_skips_the_encoder_and_gets_the_same_decision(coe_url: str) -> None:
    text = CODE_Q.replace("sorted list.", f"sorted list (run {time.time_ns()}).")  # new to this replica
    first = api.post(f"{coe_url}/v1/route", json={"messages": [{"role": "user", "content": text}]}).json()
    again = api.post(f"{coe_url}/v1/route", json={"messages": [{"role": "user", "content": text}]}).json()
    assert "cached" not in first and again["cached"] is True and again["batch_size"] == 0
    assert (again["expert"], again["reason"]) == (first["expert"], first["reason"])
    assert again["scores"] == pytest.approx(first["scores"], abs=1e-6)
    # The decision is made afresh: a request's own t still applies to a cached text.
    loose = api.post(f"{coe_url}/v1/route", json={"model": "coe-auto@1", "messages": [
        {"role": "user", "content": text}]}).json()
    assert loose["cached"] is True and loose["threshold"] == 1.0
    assert loose["expert"] == "translation"  # t = 1 admits every expert: the cheapest answers
