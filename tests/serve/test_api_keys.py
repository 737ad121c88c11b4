"""API keys, limits and budgets over HTTP, with the official openai client, on the real service and Redis.

Most tests use the session's service (one ingress replica, keys required). The shared-limit, revocation and
Redis-outage tests use a second application, `coe-limits` at /limits, with two ingress replicas in front of
one SmolLM2 expert, so that a limit or a revocation has to hold across replicas through Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from tests.redis_server import RedisServer
from tests.serve import api

pytestmark = pytest.mark.serve

LIMITS_PREFIX = "/limits"


def _client(url: str, key: str | None, prefix: str = "") -> OpenAI:
    return OpenAI(base_url=f"{url}{prefix}/v1", api_key=key or "", max_retries=0, timeout=120)


def _ask(c: OpenAI, model: str = "coe-auto", content: str = "Say hi", max_tokens: int = 2):  # noqa: ANN202
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0.0)


def _create(url: str, prefix: str = "", **body: object) -> dict:
    r = api.post(f"{url}{prefix}/v1/coe/keys", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _coe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coe.cli", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_probes_stay_open_and_everything_else_needs_a_key(coe_url: str) -> None:
    assert httpx.get(f"{coe_url}/health").status_code == 200
    assert httpx.get(f"{coe_url}/ready").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/coe/state"), ("POST", "/v1/route"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/coe/keys"),
                         ("GET", "/v1/coe/usage")]:
        r = httpx.request(method, f"{coe_url}{path}", json={"messages": [{"role": "user", "content": "x"}]},
                          headers={"x-request-id": "req-auth-1"})
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["request_id"] == "req-auth-1", path
    for path in ("/docs", "/openapi.json", "/redoc"):  # off unless server.docs is set
        assert httpx.get(f"{coe_url}{path}").status_code == 404


def test_openai_client_errors_for_bad_keys(coe_url: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(coe_url, "coe-not-a-real-key"))
    with pytest.raises(openai.AuthenticationError):
        _client(coe_url, "coe-not-a-real-key").models.list()
    key = _create(coe_url, team="ads", experts=["translation"])
    c = _client(coe_url, key["key"])
    with pytest.raises(openai.PermissionDeniedError):
        _ask(c, model="code")
    assert [m.id for m in c.models.list().data] == ["coe-auto", "translation"]
    r = _ask(c, content="Write a Python function that reverses a list")  # coe-auto: only among its experts
    assert r.headers["x-coe-expert"] == "translation"
    assert r.headers["x-coe-route-reason"].startswith("team_restricted(code)")
    for path in ("/v1/coe/keys", "/v1/coe/usage"):  # admin endpoints refuse a team key
        r = httpx.get(f"{coe_url}{path}", headers=api.auth(key["key"]))
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    # a revoked key is refused at once by the replica that revoked it
    assert api.delete(f"{coe_url}/v1/coe/keys/{key['id']}").json()["revoked"] is True
    with pytest.raises(openai.AuthenticationError):
        _ask(c)


def test_rate_limit_429_with_retry_after_and_remaining_headers(coe_url: str) -> None:
    key = _create(coe_url, team="batch", rpm=2, tpm=100_000)["key"]
    c = _client(coe_url, key)
    r = _ask(c, model="general")
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    route = api.post(f"{coe_url}/v1/route", headers=api.auth(key), timeout=30,
                     json={"messages": [{"role": "user", "content": "hi"}]})  # a routing decision counts too
    assert route.status_code == 200 and route.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as e:
        _ask(c, model="general")
    h = e.value.response.headers
    assert int(h["retry-after"]) >= 1 and h["x-ratelimit-remaining-requests"] == "0"
    assert e.value.body["type"] == "rate_limit_error"  # type: ignore[index]


def test_budget_stops_a_team_at_its_limit(coe_url: str) -> None:
    key = _create(coe_url, team="interns", budget_usd=0.000001, period="day")["key"]
    c = _client(coe_url, key)
    answered, refused = 0, None
    for _ in range(5):
        try:
            _ask(c, model="general", max_tokens=4)  # ~40 tokens x $0.0002/1k = $0.000008 > the budget
            answered += 1
        except openai.RateLimitError as err:
            refused = err
            break
    assert refused is not None and answered in (1, 2)  # spend is charged once the answer is known
    assert refused.body["type"] == "insufficient_quota"  # type: ignore[index]
    usage = api.get(f"{coe_url}/v1/coe/usage", params={"team": "interns"}).json()["teams"]["interns"]
    assert usage["requests"] == answered and usage["budget"]["spent_usd"] >= 0.000001
    assert usage["experts"]["general"]["requests"] == answered


def test_keys_and_usage_cli(coe_url: str) -> None:
    r = _coe("keys", "create", "--team", "cli-team", "--rpm", "50", "--experts", "general,code", "--json",
             "--url", coe_url)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert set(made) == {"id", "key", "team"} and made["team"] == "cli-team"
    r = _coe("keys", "create", "--team", "cli-team", "--budget-usd", "5", "--period", "month", "--url", coe_url)
    assert r.returncode == 0 and r.stdout.strip().startswith("coe-") and len(r.stdout.split()) == 1
    second = r.stdout.strip()
    _ask(_client(coe_url, made["key"]), model="general")
    r = _coe("keys", "list", "--url", coe_url)
    assert r.returncode == 0 and made["id"] in r.stdout and "cli-team" in r.stdout and "$5/month" in r.stdout
    assert made["key"] not in r.stdout and second not in r.stdout
    r = _coe("usage", "--team", "cli-team", "--url", coe_url)
    assert r.returncode == 0 and "cli-team" in r.stdout and "general" in r.stdout, r.stdout
    r = _coe("keys", "revoke", made["id"], "--url", coe_url)
    assert r.returncode == 0 and "revoked" in r.stdout
    with pytest.raises(openai.AuthenticationError):
        _ask(_client(coe_url, made["key"]), model="general")
    env = {k: v for k, v in os.environ.items() if k != "COE_ADMIN_KEY"}
    r = subprocess.run([sys.executable, "-m", "coe.cli", "keys", "list", "--url", coe_url], capture_output=True,
                       text=True, timeout=60, env=env, check=False)
    assert r.returncode == 1 and "no admin key" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# two ingress replicas sharing Redis


@pytest.fixture(scope="module")
def limits_url(coe_url: str) -> Iterator[str]:
    """A second app: two ingress replicas (2 s key cache) in front of one SmolLM2 expert, same Redis."""
    from coe.config import AutoscalingConfig

    cfg = api.small_config("coe-limits")
    cfg.server.ingress_autoscaling = AutoscalingConfig(min_replicas=2, max_replicas=2)
    cfg.auth.key_cache_s = 2.0
    cfg.auth.outage_grace_s = 120.0
    with api.small_app(coe_url, cfg, LIMITS_PREFIX):
        yield coe_url


def _hammer(url: str, key: str, seconds: float, clients: int) -> tuple[int, int, list[float]]:
    """`clients` threads send requests for `seconds`: (answered, refused with 429, answer times)."""
    ok, refused, times = [0], [0], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run() -> None:
        with httpx.Client(timeout=60, headers=api.auth(key)) as c:
            while time.monotonic() < stop:
                r = c.post(f"{url}{LIMITS_PREFIX}/v1/chat/completions", json={
                    "model": "general", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
                with lock:
                    if r.status_code == 200:
                        ok[0] += 1
                        times.append(time.monotonic())
                    else:
                        assert r.status_code == 429 and "retry-after" in r.headers, r.text
                        refused[0] += 1
                if r.status_code == 429:
                    time.sleep(0.1)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok[0], refused[0], times


def test_a_rate_limit_holds_across_two_ingress_replicas(limits_url: str) -> None:
    rpm, seconds = 60, 20.0
    key = _create(limits_url, LIMITS_PREFIX, team="shared", rpm=rpm)["key"]
    from ray import serve

    ingress = serve.status().applications["coe-limits"].deployments["CoeIngress"]
    assert ingress.replica_states.get("RUNNING") == 2
    ok, refused, _ = _hammer(limits_url, key, seconds, clients=4)
    expected = rpm + rpm * seconds / 60  # a full bucket, then the refill rate
    print(f"shared limit: {ok} answered, {refused} refused in {seconds:.0f} s at rpm={rpm} "
          f"(expected {expected:.0f}; two independent buckets would allow ~{2 * expected:.0f})")
    assert refused > 0
    assert abs(ok - expected) <= 0.1 * expected, (ok, expected)


def test_revocation_reaches_every_replica_within_the_cache_window(limits_url: str) -> None:
    made = _create(limits_url, LIMITS_PREFIX, team="revoked-team")
    c = _client(limits_url, made["key"], LIMITS_PREFIX)
    for _ in range(6):  # cached by both replicas
        _ask(c, model="general", max_tokens=1)
    assert api.delete(f"{limits_url}{LIMITS_PREFIX}/v1/coe/keys/{made['id']}").status_code == 200
    t0 = time.monotonic()
    refused_at = None
    while time.monotonic() - t0 < 10:
        statuses = []
        for _ in range(6):
            try:
                _ask(c, model="general", max_tokens=1)
                statuses.append(200)
            except openai.AuthenticationError:
                statuses.append(401)
        if all(s == 401 for s in statuses):
            refused_at = time.monotonic() - t0
            break
    assert refused_at is not None and refused_at <= 2.0 + 1.5, refused_at  # key_cache_s = 2 s (+ request time)


def test_redis_stopped_during_traffic_keeps_verified_keys_and_refuses_unknown(
        limits_url: str, serve_redis: RedisServer) -> None:
    made = _create(limits_url, LIMITS_PREFIX, team="outage", rpm=600)
    unknown = _create(limits_url, LIMITS_PREFIX, team="never-seen")["key"]  # in Redis, never used by a replica
    c = _client(limits_url, made["key"], LIMITS_PREFIX)
    # Both ingress replicas must have verified the key before the outage. Requests go to either replica at
    # random: 6 left both unvisited by one replica about 3% of the time (a CI failure); 40 leave 2^-39.
    for _ in range(40):
        _ask(c, model="general", max_tokens=1)
    serve_redis.stop()
    try:
        t0 = time.monotonic()
        answered = 0
        while time.monotonic() - t0 < 5:  # past the 2 s key cache: every replica has to fall back
            r = _ask(c, model="general", max_tokens=1)
            assert r.headers["x-ratelimit-limit-requests"] == "600"  # local buckets (on_store_failure: local)
            answered += 1
        assert answered >= 5
        with pytest.raises(openai.AuthenticationError) as e:
            _ask(_client(limits_url, unknown, LIMITS_PREFIX), model="general", max_tokens=1)
        assert "could not be verified" in e.value.message
    finally:
        serve_redis.start()
    deadline = time.time() + 30  # once Redis is back (empty: nothing persisted), keys are read from it again
    while time.time() < deadline:
        try:
            _ask(c, model="general", max_tokens=1)
        except openai.AuthenticationError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("a key that the restarted (empty) Redis does not hold was still accepted after 30 s")
