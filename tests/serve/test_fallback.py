"""Failed expert calls before the first byte: timeouts, retries on the next candidate, the stuck replica replaced.

A second application, `coe-faults` at /faults: `code` is a real SmolLM2 replica made to hang before its first
token (llama_cpp.debug_stall_s, deaf to cancellation, as a stuck replica is) with short timeouts, `general` is a
healthy one and the fallback. The embedding router sends code questions to `code`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.serve import api

pytestmark = pytest.mark.serve

PREFIX = "/faults"
CODE_Q = "Write a Python function that reverses a linked list."


@pytest.fixture(scope="module")
def faults_url(coe_url: str) -> Iterator[str]:
    cfg = api.small_config("coe-faults", ("general", "code"))
    code = cfg.expert("code")
    code.llama_cpp.debug_stall_s = 600.0  # type: ignore[union-attr]
    code.timeouts.ttft_s, code.timeouts.total_s = 1.5, 3.0
    cfg.server.max_ongoing_requests, cfg.server.max_queued_requests = 2, 1  # admits 3 at once
    with api.small_app(coe_url, cfg, PREFIX) as url:
        yield url


def _code_replicas() -> set[str]:
    """Live replicas of coe-faults' `code` (Serve names each replica's actor after its replica id)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "coe-faults#code#" in a["name"]}


def test_a_hung_expert_times_out_and_the_request_is_answered_by_the_next_candidate(faults_url: str) -> None:
    before = _code_replicas()
    assert len(before) == 1
    t0 = time.monotonic()
    r = api.post(f"{faults_url}/v1/chat/completions", timeout=60, json={
        "model": "coe-auto", "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 4})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.headers["x-coe-expert"] == "general"
    assert "retry_after_failure(code)" in r.headers["x-coe-route-reason"]
    assert 3.0 <= took < 20, took  # code's total timeout, then general's answer
    assert r.json()["choices"][0]["message"]["content"] is not None

    # streaming: the first token's timeout fires, and the stream comes from general
    with api.stream("POST", f"{faults_url}/v1/chat/completions", timeout=60, json={
            "model": "coe-auto", "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 4,
            "stream": True}) as s:
        assert s.status_code == 200 and s.headers["x-coe-expert"] == "general"
        assert "retry_after_failure(code)" in s.headers["x-coe-route-reason"]
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[1][6:])["model"] == "general"

    # pinned: retried on the same expert (no other replica), then a 504 in the OpenAI error shape
    r = api.post(f"{faults_url}/v1/chat/completions", timeout=60, json={
        "model": "code", "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 4})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout" and r.headers["x-coe-expert"] == "code"

    # the stuck replica fails its health check (no token for more than ttft_s) and Serve replaces it
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = _code_replicas()
        if now and not (now & before):
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"the stuck replica {before} was not replaced within 120 s")


def test_a_full_ingress_answers_429_with_retry_after_at_once(faults_url: str) -> None:
    """The ingress holds max_ongoing + max_queued requests (3 here); the rest are refused at once, not queued."""
    import concurrent.futures as cf

    def ask(_: int) -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        r = api.post(f"{faults_url}/v1/chat/completions", timeout=60, json={
            "model": "code", "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 2})
        return r.status_code, time.monotonic() - t0, r.headers.get("retry-after")

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))  # `code` hangs: the first three hold their slots for seconds
    refused = [(took, ra) for status, took, ra in results if status == 429]
    assert len(refused) >= 3, results
    assert all(took < 2.0 and ra == "1" for took, ra in refused), refused


def test_a_missing_router_artifact_starts_degraded(coe_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """coe-auto goes to the fallback expert, pinned models work, /ready says the router is degraded."""
    cfg = api.small_config("coe-degraded", embedding_router=False)  # the RouterDC config, its artifact missing
    cfg.router.artifact = str(tmp_path_factory.mktemp("no-router") / "missing")
    with api.small_app(coe_url, cfg, "/degraded") as url:
        ready = api.get(f"{url}/ready").json()
        assert ready["ready"] is True and ready["router"]["status"] == "degraded"
        for model in ("coe-auto", "general"):
            r = api.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": CODE_Q}], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-coe-expert"] == "general", r.text
        assert r.headers.get("x-coe-route-reason") is None  # pinned
        r = api.post(f"{url}/v1/route", timeout=30, json={"messages": [{"role": "user", "content": CODE_Q}]})
        assert r.json()["reason"] == "fallback:router_unavailable"
