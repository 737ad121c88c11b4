"""An expert replica's process killed under load: nothing is lost, coe-auto requests go to another expert.

Eight clients send coe-auto and pinned requests (some streaming) for 60 s; 10 s in, the `code` expert's replica
process is killed with SIGKILL. Requests routed to `code` that had not started streaming are retried on the next
candidate (then the fallback, `general`); pinned `code` requests get a clean error or wait for Serve's
replacement replica; nothing may be lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.serve import api, traffic

pytestmark = pytest.mark.serve

CODE_Q = "Write a Python function that reverses a linked list."
CHAT_Q = "Give me three tips for sleeping better."


def _replica_pids(deployment: str) -> list[int]:
    """Processes of this session's `coe` app replicas of `deployment` (Ray titles them ray::ServeReplica:...)."""
    title = f"ServeReplica:coe:{deployment}".encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and title in cmd:
            out.append(int(proc.name))
    return out


def test_expert_killed_under_load_loses_nothing(coe_url: str, resting: None) -> None:
    pids = _replica_pids("code")
    assert len(pids) == 1, pids
    killed: list[float] = []

    def kill() -> None:
        os.kill(pids[0], signal.SIGKILL)  # a process of this test session's own Ray cluster
        killed.append(time.monotonic())

    msg = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    bodies = [
        ("auto-code", {"model": "coe-auto", "messages": msg(CODE_Q), "max_tokens": 8, "temperature": 0}),
        ("auto-chat", {"model": "coe-auto", "messages": msg(CHAT_Q), "max_tokens": 8, "temperature": 0}),
        ("auto-code-stream", {"model": "coe-auto", "messages": msg(CODE_Q), "max_tokens": 8, "stream": True}),
        ("pinned-code", {"model": "code", "messages": msg(CODE_Q), "max_tokens": 8}),
        ("pinned-general", {"model": "general", "messages": msg(CHAT_Q), "max_tokens": 8}),
    ]
    t = traffic.run(coe_url, bodies, clients=8, seconds=60, during=kill, at=10)
    print(f"\nexpert 'code' killed under load: {t.line()}\n  by kind: {dict(t.by_kind)}")
    assert killed and t.sent > 50
    assert t.lost == 0, t.lost_examples
    for kind in ("auto-code", "auto-chat", "pinned-general"):  # never streaming yet: all answered
        assert t.by_kind[(kind, "failed_cleanly")] == 0, (kind, t.by_kind)
    assert t.answered_by["general"] > 0
    # Serve replaced the replica, and it serves again
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = api.post(f"{coe_url}/v1/chat/completions", timeout=120,
                     json={"model": "code", "messages": msg(CODE_Q), "max_tokens": 4})
        if r.status_code == 200 and _replica_pids("code") and _replica_pids("code") != pids:
            break
        time.sleep(2)
    else:
        pytest.fail("Serve's replacement replica of 'code' never answered")
    api.wait_resting(coe_url, timeout=120)  # leave the service at rest for the tests after this one
