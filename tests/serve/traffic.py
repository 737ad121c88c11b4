"""Closed-loop client traffic for the fault tests: counts what was sent, answered, failed cleanly and lost.

* answered: 200 with a complete answer (non-empty choices, a finish_reason; for streams, [DONE] and no error
  event);
* failed cleanly: a 4xx/5xx with OpenAI's error shape;
* lost: no answer by the timeout, a connection reset, a 5xx without the error shape, a 200 that is incomplete.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.serve import api


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    failed_cleanly: int = 0
    lost: int = 0
    by_kind: Counter = field(default_factory=Counter)  # (kind, outcome) -> n
    answered_by: Counter = field(default_factory=Counter)  # expert that answered -> n
    statuses: Counter = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"sent {self.sent}, answered {self.answered}, failed cleanly {self.failed_cleanly}, lost {self.lost}; "
                f"statuses {dict(self.statuses)}; answered by {dict(self.answered_by)}")


def _one(c: httpx.Client, url: str, body: dict[str, Any]) -> tuple[str, str | None, int]:
    """(outcome, expert, status) of one request."""
    try:
        if body.get("stream"):
            with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return _failed(r), r.headers.get("x-coe-expert"), r.status_code
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                ok = lines and lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
                return ("answered" if ok else "lost"), r.headers.get("x-coe-expert"), 200
        r = c.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            return _failed(r), r.headers.get("x-coe-expert"), r.status_code
        choice = r.json()["choices"][0]
        ok = choice["message"]["content"] is not None and choice["finish_reason"] in ("stop", "length")
        return ("answered" if ok else "lost"), r.headers.get("x-coe-expert"), 200
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return "lost", None, 0


def _failed(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return "failed_cleanly" if {"message", "type"} <= set(err) else "lost"
    except (ValueError, KeyError, TypeError):
        return "lost"


def run(url: str, bodies: list[tuple[str, dict[str, Any]]], *, clients: int, seconds: float,
        during: Callable[[], None] | None = None, at: float = 5.0, timeout: float = 120.0) -> Tally:
    """`clients` threads cycle through `bodies` ((kind, body) pairs) for `seconds`; `during` runs `at` s in."""
    tally = Tally()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=timeout, headers=api.auth()) as c:
            while time.monotonic() < stop:
                kind, body = bodies[i % len(bodies)]
                i += clients
                outcome, expert, status = _one(c, url, json.loads(json.dumps(body)))
                with lock:
                    tally.sent += 1
                    setattr(tally, outcome, getattr(tally, outcome) + 1)
                    tally.by_kind[(kind, outcome)] += 1
                    tally.statuses[status] += 1
                    if outcome == "answered" and expert:
                        tally.answered_by[expert] += 1
                    if outcome == "lost" and len(tally.lost_examples) < 5:
                        tally.lost_examples.append(f"{kind}: status {status}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(at)
        during()
    for t in threads:
        t.join()
    return tally
