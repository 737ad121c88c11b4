"""What Prometheus scrapes from a running coe: the real Ray metrics port of the session's service.

Every coe and Ray Serve series the Grafana dashboard (coe/k8s/dashboard.py) queries must be exported, with the
labels its queries group by; the vLLM panels' series come from vLLM's own stat logger (tests/gpu).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx

from coe.k8s.dashboard import queried_metrics
from coe.metrics import EXPORTED
from tests.serve import api

SERIES_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ")


def _scrape(url: str) -> dict[str, list[str]]:
    """Series name -> label strings of its samples."""
    out: dict[str, list[str]] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        m = SERIES_RE.match(line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2) or "")
    return out


def _traffic(url: str) -> None:
    """Routed, pinned, streamed and failing requests, and one far from every expert (a fallback)."""
    chat = f"{url}/v1/chat/completions"
    for model in ("coe-auto", "general"):
        r = api.post(chat, json={"model": model, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]},
                     timeout=120)
        assert r.status_code == 200, r.text
    with httpx.stream("POST", chat, headers=api.auth(), timeout=120, json={
            "model": "coe-auto", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Give me a short tip for public speaking."}]}) as r:
        assert r.status_code == 200
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    r = api.post(chat, json={"model": "coe-auto", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "zqxj vbnm ploq 8842 ;; kkrt"}]}, timeout=120)
    assert r.status_code == 200 and "fallback:" in r.headers["x-coe-route-reason"], r.headers
    assert api.post(chat, json={"model": "no-such-expert", "messages": [{"role": "user", "content": "hi"}]}
                    ).status_code == 404


def test_every_dashboard_series_is_exported(coe_service: dict[str, Any]) -> None:
    url, metrics_url = coe_service["url"], coe_service["metrics_url"]
    assert metrics_url, "start_local_serve gave no metrics URL"
    _traffic(url)
    wanted = {m for m in queried_metrics() if not m.startswith("ray_vllm_")}
    assert wanted <= set(EXPORTED), sorted(wanted - set(EXPORTED))  # the dashboard queries only documented series
    per_expert = ("ray_coe_requests_total", "ray_coe_ttft_ms_bucket", "ray_coe_expert_ttft_ms_bucket",
                  "ray_coe_completion_tokens_total", "ray_coe_request_latency_ms_bucket")

    def problems(series: dict[str, list[str]]) -> list[str]:
        out = [f"not exported: {m}" for m in sorted(wanted) if m not in series]
        # The labels the panels group by (the traffic above touched `general` and `code`, routed and pinned).
        out += [f"{m} has no expert label" for m in per_expert
                if m in series and not any('expert="' in labels for labels in series[m])]
        if not any('routed="true"' in labels for labels in series.get("ray_coe_requests_total", [])):
            out.append("no routed requests counted")
        if not any('deployment="general"' in labels for labels in series.get("ray_serve_deployment_replica_healthy",
                                                                               [])):
            out.append("no replica gauge for general")
        return out

    deadline = time.time() + 90  # Ray's metrics agent exports what the replicas report every few seconds
    while True:
        found = problems(_scrape(metrics_url))
        if not found or time.time() > deadline:
            break
        time.sleep(2)
    assert not found, f"the dashboard's series as a running coe exports them: {found}"


def test_dashboard_json_is_the_rendered_one() -> None:
    from pathlib import Path

    from coe.k8s.dashboard import dashboard

    committed = json.loads((Path(__file__).resolve().parents[2] / "k8s/base/grafana/coe-dashboard.json").read_text())
    assert committed == dashboard()
    assert all(t["expr"] for p in committed["panels"] for t in p.get("targets", []))
