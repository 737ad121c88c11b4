"""httpx calls to the test service with the session's admin key (the service runs with keys required)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
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


def wait_resting(url: str, timeout: float = 60.0) -> None:
    """Wait until the controller's t and this ingress replica's t are 0 and no expert is penalised for load."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = get(f"{url}/v1/coe/state", timeout=10).json()
        ctrl = (st.get("controller") or {}).get("threshold")
        mine = st.get("threshold")  # what this ingress replica applies (refreshed once per interval)
        if (ctrl is not None and mine is not None and ctrl["t"] == 0.0 and mine["t"] == 0.0
                and not mine["penalties"]):  # no expert still penalised for recent load
            return
        time.sleep(0.5)
    raise RuntimeError(f"the controller's t did not return to rest within {timeout:.0f} s")


def small_config(name: str, experts: tuple[str, ...] = ("general",), *, embedding_router: bool = True):  # noqa: ANN201
    """A small cpu-default variant for an extra app next to the session's: the named experts at 0.1 CPU each, a
    0.02-CPU ingress, the controller off, and (by default) the embedding router with `general` as fallback."""
    from coe.config import EmbeddingRouterConfig, load_config

    cfg = load_config("cpu-default")
    chosen = [cfg.expert(e).model_copy(deep=True) for e in experts]
    for e in chosen:
        e.resources.num_cpus = 0.1
    cfg.experts = chosen
    cfg.app_name = name
    if embedding_router:
        cfg.router = EmbeddingRouterConfig(fallback_expert="general")
    cfg.controller.enabled = False
    cfg.server.ingress_num_cpus = 0.02
    return cfg


@contextlib.contextmanager
def small_app(coe_url: str, cfg: Any, prefix: str) -> Iterator[str]:
    """Deploy `cfg` as its own app at `prefix` in the session's Serve, wait until ready, delete it afterwards."""
    from ray import serve

    from deployments.app import build_from_config

    serve.run(build_from_config(cfg), name=cfg.app_name, route_prefix=prefix, blocking=False)
    try:
        wait_ready(f"{coe_url}{prefix}")
        yield f"{coe_url}{prefix}"
    finally:
        serve.delete(cfg.app_name)
