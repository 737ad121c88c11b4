"""Faults in the running service: Redis killed and restarted, the controller replica killed.

Both keep `coe-auto` answering with the last known t; shared state comes back on its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.redis_server import RedisServer
from tests.serve import api, traffic

PROMPT = "Write a Python function that merges two sorted lists."


def _ask(url: str, i: int) -> httpx.Response:
    return api.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "coe-auto", "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}], "max_tokens": 4,
        "temperature": 0})


def _controller(url: str) -> dict:
    return api.get(f"{url}/v1/coe/state", timeout=15).json().get("controller") or {}


def _wait_for(cond, timeout: float, every: float = 0.5) -> bool:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return True
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(every)
    return False


def _published_version(server: RedisServer) -> int | None:
    import redis

    r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=2)
    try:
        raw = r.get("coe:threshold")
    except redis.RedisError:
        return None
    finally:
        r.close()
    return None if raw is None else int(json.loads(raw)["version"])


def _log_lines(needle: str) -> list[str]:
    """Lines containing `needle` in this Ray session's logs (every worker, every Serve replica)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # noqa: SLF001 - the session's own logs
    found = []
    for f in logs.rglob("*"):
        if f.is_file() and f.suffix in (".log", ".err", ".out"):
            try:
                found += [ln for ln in f.read_text(errors="replace").splitlines() if needle in ln]
            except OSError:
                continue
    return found


def test_redis_killed_and_restarted_while_serving(coe_url: str, serve_redis: RedisServer) -> None:
    assert _wait_for(lambda: _published_version(serve_redis) is not None, 30), "the controller never wrote to Redis"
    needle = f"redis at {serve_redis.url} unreachable"
    before = len(_log_lines(needle))

    t_before = _controller(coe_url)["threshold"]["t"]
    seen: dict[str, object] = {}

    def outage() -> None:
        serve_redis.stop()  # SIGKILL: a crash, nothing saved
        time.sleep(6)  # a few control intervals, so every process meets the outage under traffic
        st = _controller(coe_url)
        seen["controller"] = st
        serve_redis.start()  # same port, empty: the controller must write its state again

    msg = [{"role": "user", "content": PROMPT}]
    bodies = [("auto", {"model": "coe-auto", "messages": msg, "max_tokens": 4, "temperature": 0}),
              ("auto-stream", {"model": "coe-auto", "messages": msg, "max_tokens": 4, "stream": True}),
              ("pinned", {"model": "general", "messages": msg, "max_tokens": 4})]
    t = traffic.run(coe_url, bodies, clients=8, seconds=15, during=outage, at=3)
    print(f"\nRedis killed and restarted under traffic: {t.line()}")
    assert t.lost == 0 and t.failed_cleanly == 0 and t.answered == t.sent > 20, t.line()
    st = seen["controller"]
    assert isinstance(st, dict) and "error" not in st and st["threshold"]["t"] >= 0.0  # stepping on local state
    assert st["threshold"]["version"] > 0 and t_before >= 0.0
    assert _wait_for(lambda: _published_version(serve_redis) is not None, 60), "state never came back to Redis"
    assert _ask(coe_url, 99).status_code == 200

    # One clear warning per process that met the outage (the controller, the ingress), not one per request.
    assert _wait_for(lambda: len(_log_lines(needle)) > before, 20), "no warning was logged for the outage"
    per_process = len(_log_lines(needle)) - before
    assert 1 <= per_process <= 4, _log_lines(needle)[-8:]


def test_controller_replica_killed_routing_continues(coe_url: str, serve_redis: RedisServer) -> None:
    import ray

    st = _controller(coe_url)
    version = st["threshold"]["version"]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "CoeController" in a["name"]]
    assert len(names) == 1, names
    old = names[0]
    ray.kill(ray.get_actor(old["name"], namespace=old["namespace"]), no_restart=True)

    # Routing goes on with the last t while Serve replaces the replica.
    for i in range(4):
        r = _ask(coe_url, 100 + i)
        assert r.status_code == 200, r.text
        assert r.headers.get("x-coe-threshold") is not None

    def replaced() -> bool:
        live = [a for a in ray.util.list_named_actors(all_namespaces=True) if "CoeController" in a["name"]]
        now = _controller(coe_url)
        return bool(live) and live[0]["name"] != old["name"] and "threshold" in now and "error" not in now

    assert _wait_for(replaced, 120, every=1.0), _controller(coe_url)
    # The new replica resumes from the last state in Redis, so its versions go on from the old one's (a fresh
    # start would count from 0). It may answer once before its first step.
    assert _controller(coe_url)["threshold"]["version"] >= version
    assert _wait_for(lambda: _controller(coe_url)["threshold"]["version"] > version, 30, every=0.5), (
        _controller(coe_url),
        version,
    )
    assert _ask(coe_url, 200).status_code == 200
