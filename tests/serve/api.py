"""httpx calls to the test service with the session's admin key (the service runs with keys required)."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx


def auth(key: str | None = None) -> dict[str, str]:
    """The Authorization header for `key` (default: the session's admin key)."""
    return {"authorization": f"Bearer {key or os.environ['COE_ADMIN_KEY']}"}


def _headers(kw: dict[str, Any]) -> dict[str, Any]:
    kw["headers"] = {**auth(), **(kw.get("headers") or {})}
    return kw


def get(url: str, **kw: Any) -> httpx.Response:
    return httpx.get(url, **_headers(kw))


def post(url: str, **kw: Any) -> httpx.Response:
    return httpx.post(url, **_headers(kw))


def delete(url: str, **kw: Any) -> httpx.Response:
    return httpx.delete(url, **_headers(kw))


def stream(method: str, url: str, **kw: Any):  # noqa: ANN201 - httpx's context manager
    return httpx.stream(method, url, **_headers(kw))


def wait_ready(url: str, timeout: float = 240.0) -> None:
    """Poll `url`/ready (open, no key) until it answers 200; RuntimeError after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not become ready within {timeout:.0f} s")
        time.sleep(0.5)
