"""`coe-auto` through the trained RouterDC router: headers, POST /v1/route, per-request thresholds, batching."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serve import api

pytestmark = pytest.mark.usefixtures("resting")  # these tests assume the resting t = 0

CODE_Q = "Write a Python function that merges two sorted lists."
PRICE = {"general": 0.0002, "code": 0.0003, "translation": 0.0001}  # cpu-default's prices


def _route(url: str, **body: object) -> httpx.Response:
    return api.post(f"{url}/v1/route", json={"messages": [{"role": "user", "content": CODE_Q}], **body}, timeout=30)


def test_route_returns_the_decision_without_generating(coe_url: str) -> None:
    r = _route(coe_url)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["expert"] == "code"
    assert set(d["scores"]) == set(PRICE)
    assert 0.0 <= d["confidence"] <= 1.0
    assert d["ood"] is False
    assert d["threshold"] == 0.0
    assert d["reason"] == "best_predicted_quality"
    assert d["route_ms"] > 0


def test_higher_threshold_picks_a_cheaper_expert_and_cap_protects_premium(coe_url: str) -> None:
    best = _route(coe_url).json()
    gap = best["scores"]["code"] - best["scores"]["general"]
    assert gap > 0
    # Within t of the best, the cheapest expert wins: general is cheaper than code.
    loose = _route(coe_url, coe={"quality_threshold": min(1.0, gap + 0.01)}).json()
    assert PRICE[loose["expert"]] < PRICE["code"]
    assert loose["reason"].startswith("cheaper_within_threshold")
    by_name = _route(coe_url, model=f"coe-auto@{min(1.0, gap + 0.01):.4f}").json()
    assert by_name["expert"] == loose["expert"]
    capped = _route(coe_url, coe={"quality_threshold": min(1.0, gap + 0.01), "max_quality_threshold": 0.0}).json()
    assert capped["expert"] == "code" and capped["threshold"] == 0.0


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


def test_concurrent_decisions_are_batched(coe_url: str) -> None:
    async def burst() -> list[dict]:
        async with httpx.AsyncClient(timeout=60, headers=api.auth()) as c:
            rs = await asyncio.gather(*[
                c.post(f"{coe_url}/v1/route", json={"prompt": f"Translate \"hello number {i}\" into German."})
                for i in range(24)])
        return [r.json() for r in rs]

    out = asyncio.run(burst())
    assert all(d["expert"] == "translation" for d in out), out
    assert max(d["batch_size"] for d in out) > 1
