"""`coe serve` as a newcomer runs it (scripts/serve): its own Ray, Ray Serve's direct ingress, a metrics port.

Runs the real command in a subprocess (its own local Ray cluster, beside the session's), on free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    port, metrics = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("coe-serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("COE_ADMIN_KEY", "COE_REDIS_URL", "RAY_ADDRESS")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "coe.cli", "serve", "--port", str(port), "--metrics-port",
                                 str(metrics)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while "coe is serving at" not in log.read_text():
            assert proc.poll() is None, f"coe serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"coe serve not up after 600 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        text = log.read_text()
        proxy = re.search(r"Serve's proxy: (http://127\.0\.0\.1:\d+)", text)
        yield {"url": url, "proxy_url": proxy.group(1) if proxy else None, "log": text, "metrics": metrics}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # coe serve shuts Serve and its Ray down on SIGTERM
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_serves_through_direct_ingress_and_the_proxy(served: dict[str, Any]) -> None:
    assert f"coe is serving at {served['url']}/v1 (ready" in served["log"], served["log"][-2000:]
    assert served["proxy_url"] and served["proxy_url"] != served["url"], served["log"][-2000:]
    body = {"model": "coe-auto", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}
    for base in (served["url"], served["proxy_url"]):
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"x-request-id": "req-direct-1"},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "req-direct-1"  # Serve's request id, echoed on both paths
        assert r.headers["x-coe-expert"] in {"general", "code", "translation"}
        assert r.json()["usage"]["completion_tokens"] >= 1
    with httpx.stream("POST", f"{served['url']}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        frames = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and json.loads(frames[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    r = httpx.post(f"{served['url']}/v1/chat/completions", json={**body, "model": "nope"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["request_id"]


def test_metrics_port_is_the_one_asked_for(served: dict[str, Any]) -> None:
    assert f"Prometheus metrics: http://127.0.0.1:{served['metrics']}/metrics" in served["log"]
    deadline = time.time() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=10).text
        if "ray_coe_requests_total" in text or time.time() > deadline:
            break
        time.sleep(2)
    assert "ray_coe_requests_total" in text and "ray_serve_deployment_replica_healthy" in text
