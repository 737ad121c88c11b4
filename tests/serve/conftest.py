"""Start real Ray Serve with the cpu-default experts once per test session."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def coe_url() -> Iterator[str]:
    import ray
    from ray import serve

    from coe.cli import start_local_serve

    info = start_local_serve("cpu-default", port=_free_port(), num_cpus=2, dashboard=False)
    url = info["url"]
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError("coe did not become ready within 240 s")
        time.sleep(0.5)
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def client(coe_url: str):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"{coe_url}/v1", api_key="unused", max_retries=0, timeout=120)
