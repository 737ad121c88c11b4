"""The load-aware controller in the running service: load raises t, idle brings it back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor


from tests.serve import api


def _state(url: str) -> dict:
    return api.get(f"{url}/v1/coe/state", timeout=10).json()


def _t(url: str) -> float:
    th = (_state(url).get("controller") or {}).get("threshold")
    return float(th["t"]) if th else -1.0


def _wait_for(cond, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


def test_concurrent_load_raises_t_and_idle_brings_it_back(coe_url: str, router) -> None:  # noqa: ANN001
    assert _wait_for(lambda: _t(coe_url) == 0.0, 40), _state(coe_url)
    t_max = _state(coe_url)["controller"]["t_max"]
    prompts = [f"Write a Python function that returns the sum of the first {i} square numbers." for i in range(32)]
    # coe-auto traffic whose best expert (code, in the measured profile) has cheaper ones within t_max: the
    # controller's signal is the load of the experts a higher t relieves. Once code is full, the overflow rule
    # spills the rest at once, but never beyond t_max of a request's best.
    allowed = []
    for d in router.route_batch(prompts, threshold=0.0):
        assert d.expert == "code", d
        allowed.append({e for e, q in d.scores.items() if q >= d.scores[d.expert] - t_max})
        assert len(allowed[-1]) > 1, d

    def one(i: int) -> int:
        r = api.post(f"{coe_url}/v1/chat/completions", timeout=300, json={
            "model": "coe-auto", "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 48,
            "temperature": 0})
        assert r.headers.get("x-coe-expert") in allowed[i], r.headers
        return r.status_code

    seen: list[float] = []
    routed_t: list[float] = []
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(32)]
        while not all(f.done() for f in futures):
            seen.append(_t(coe_url))
            d = api.post(f"{coe_url}/v1/route", timeout=30,
                           json={"prompt": "Write a Python function that merges two sorted lists."}).json()
            routed_t.append(d["threshold"])
            time.sleep(0.5)
        assert all(f.result() == 200 for f in futures)
    assert max(seen) > 0.0, seen
    assert max(routed_t) > 0.0, "coe-auto requests must use the controller's raised t"
    st = _state(coe_url)["controller"]
    assert st["t_min"] <= max(seen) <= st["t_max"]
    # Idle: back to the resting t within the cooldown plus (t_max - t_min) / max_step periods.
    assert _wait_for(lambda: _t(coe_url) == 0.0, 30), _state(coe_url)
    assert len(st["history"]) > 5


def test_premium_requests_are_never_degraded_by_the_cap(coe_url: str) -> None:
    d = api.post(f"{coe_url}/v1/route", timeout=30, json={
        "prompt": "Write a Python function that merges two sorted lists.", "coe": {"max_quality_threshold": 0}}).json()
    assert d["threshold"] == 0.0


def test_status_prints_threshold_and_loads(coe_url: str) -> None:
    from coe.cli import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["status", "--url", coe_url])
    out = buf.getvalue()
    assert "threshold t = " in out
    assert "in flight" in out and "general" in out


def test_a_requests_own_threshold_is_not_quality_debt(coe_url: str, resting: None) -> None:
    """Quality given up because the request asked for it (coe-auto@t) is not charged to the load controller."""
    before = _state(coe_url)["controller"]["quality_debt"]
    r = api.post(f"{coe_url}/v1/chat/completions", timeout=120, json={
        "model": "coe-auto@1.0", "messages": [{"role": "user", "content": "Write a Python function that merges "
                                               "two sorted lists."}], "max_tokens": 2})
    assert r.status_code == 200
    assert r.headers["x-coe-route-reason"].startswith("cheaper_within_threshold")  # it did give quality up
    time.sleep(3.0)  # the ingress reports once per control interval
    assert _state(coe_url)["controller"]["quality_debt"]["total"] == before["total"]
