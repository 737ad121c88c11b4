"""Shared serving state behind one async interface: the threshold t, loads, quality debt, decisions.

(Usage, keys and limits live in :mod:`coe.auth`.)

Two backends with the same behaviour:

* :class:`InProcessStateStore`: plain dicts and deques, the embedded single-node default;
* :class:`RedisStateStore`: shared by every ingress replica and the controller through Redis.
  Redis is never required for serving: when it is unreachable, no method raises; reads return
  the last value this process knew, quality-debt counts are buffered locally and added
  when Redis is back, and decision records are dropped (counted in ``dropped_decisions``).

Use :func:`make_state_store` to get the right one for a ``COE_REDIS_URL``.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coe.control import ThresholdState

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]


def _json_default(o: Any) -> Any:
    try:
        return float(o)  # numpy scalars and the like
    except (TypeError, ValueError):
        return str(o)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, separators=(",", ":"))


class StateStore(abc.ABC):
    """The shared state every ingress replica and the controller read and write.

    Orders: histories and decision lists are returned oldest first (the latest `n`).
    """

    @abc.abstractmethod
    async def get_threshold(self) -> ThresholdState | None:
        """The last published threshold state (None if none was ever published or seen)."""

    @abc.abstractmethod
    async def publish_threshold(self, state: ThresholdState) -> None:
        """Make `state` the current one and append it to the capped history."""

    @abc.abstractmethod
    async def threshold_history(self, n: int = 100) -> list[ThresholdState]:
        """The latest `n` published states, oldest first."""

    @abc.abstractmethod
    async def put_loads(self, loads: dict[str, dict[str, Any]]) -> None:
        """Store per-expert load snapshots (JSON-safe dicts); each expires after the store's TTL."""

    @abc.abstractmethod
    async def get_loads(self) -> dict[str, dict[str, Any]]:
        """The unexpired per-expert load snapshots."""

    @abc.abstractmethod
    async def add_quality_debt(self, expert: str, amount: float) -> None:
        """Count one routed request to `expert` that gave up `amount` of predicted quality (may be 0)."""

    @abc.abstractmethod
    async def get_quality_debt(self) -> dict[str, Any]:
        """{"total": float, "per_expert": {expert: float}, "requests": int}."""

    @abc.abstractmethod
    async def record_decision(self, record: dict[str, Any]) -> None:
        """Append a routing decision (request_id, expert, scores, t, reason, latency_ms[, prompt]).

        The record is stored as given (plus ``ts`` if absent): leave ``prompt`` out unless
        prompts are to be kept (ControllerConfig.record_prompts).
        """

    async def add_report(self, debt: dict[str, list[float]], decisions: list[dict[str, Any]]) -> None:
        """Write one ingress report's counters: each debt amount (one request each) and each decision record."""
        for expert, amounts in debt.items():
            for a in amounts:
                await self.add_quality_debt(expert, a)
        for d in decisions:
            await self.record_decision(d)

    @abc.abstractmethod
    async def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        """The latest `n` decision records, oldest first."""

    @abc.abstractmethod
    @abc.abstractmethod
    async def get_session(self, key: str) -> str | None:
        """The expert that answered conversation `key` last (None: unknown or expired)."""

    @abc.abstractmethod
    async def put_session(self, key: str, expert: str, ttl_s: float) -> None:
        """Remember that `expert` answered conversation `key`, for `ttl_s` from now."""

    async def close(self) -> None:
        """Release connections (buffered counters are flushed if possible)."""


class InProcessStateStore(StateStore):
    """State in this process only: the embedded single-node default. Safe for one event loop."""

    def __init__(
        self,
        *,
        decision_stream_max: int = 100_000,
        history_max: int = 1000,
        loads_ttl_s: float = 10.0,
        max_sessions: int = 100_000,
        clock: Clock = time.time,
    ) -> None:
        self.loads_ttl_s = loads_ttl_s
        self._clock = clock
        self._threshold: ThresholdState | None = None
        self._history: deque[ThresholdState] = deque(maxlen=history_max)
        self._loads: dict[str, tuple[dict[str, Any], float]] = {}
        self._debt_total = 0.0
        self._debt_requests = 0
        self._debt: dict[str, float] = {}
        self._decisions: deque[str] = deque(maxlen=decision_stream_max)
        self.dropped_decisions = 0
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def get_session(self, key: str) -> str | None:
        hit = self._sessions.get(key)
        if hit is None:
            return None
        if hit[1] <= self._clock():
            del self._sessions[key]
            return None
        self._sessions.move_to_end(key)
        return hit[0]

    async def put_session(self, key: str, expert: str, ttl_s: float) -> None:
        self._sessions[key] = (expert, self._clock() + ttl_s)
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    async def get_threshold(self) -> ThresholdState | None:
        return None if self._threshold is None else ThresholdState.from_dict(self._threshold.to_dict())

    async def publish_threshold(self, state: ThresholdState) -> None:
        copy = ThresholdState.from_dict(state.to_dict())
        self._threshold = copy
        self._history.append(copy)

    async def threshold_history(self, n: int = 100) -> list[ThresholdState]:
        items = list(self._history)[-n:] if n > 0 else []
        return [ThresholdState.from_dict(s.to_dict()) for s in items]

    async def put_loads(self, loads: dict[str, dict[str, Any]]) -> None:
        expires = self._clock() + self.loads_ttl_s
        for expert, snap in loads.items():
            self._loads[expert] = (json.loads(_dumps(snap)), expires)

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        now = self._clock()
        for expert in [e for e, (_, exp) in self._loads.items() if exp <= now]:
            del self._loads[expert]
        return {e: json.loads(_dumps(d)) for e, (d, _) in self._loads.items()}

    async def add_quality_debt(self, expert: str, amount: float) -> None:
        self._debt_total += float(amount)
        self._debt_requests += 1
        self._debt[expert] = self._debt.get(expert, 0.0) + float(amount)

    async def get_quality_debt(self) -> dict[str, Any]:
        return {"total": self._debt_total, "per_expert": dict(self._debt), "requests": self._debt_requests}

    async def record_decision(self, record: dict[str, Any]) -> None:
        rec = dict(record)
        rec.setdefault("ts", self._clock())
        self._decisions.append(_dumps(rec))

    async def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        items = list(self._decisions)[-n:] if n > 0 else []
        return [json.loads(s) for s in items]

    async def close(self) -> None:
        return None


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<redis url>"


class RedisStateStore(StateStore):
    """State in Redis, shared by all replicas; every key starts with `prefix`.

    Keys: ``{prefix}threshold`` (JSON string), ``{prefix}threshold:history`` (capped list),
    ``{prefix}loads`` (hash, expert -> JSON with its expiry; the hash has a TTL too),
    ``{prefix}quality_debt`` (hash) and
    ``{prefix}decisions`` (stream, MAXLEN ~ decision_stream_max).

    Faults: a call that finds Redis unreachable uses the local fallback, logs one warning per
    outage, and for `retry_after_s` after it every call uses the fallback at once (no network
    wait). The first call after that tries Redis again; on success, buffered counters are added
    (one MULTI/EXEC) and one info line is logged.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "coe:",
        decision_stream_max: int = 100_000,
        history_max: int = 1000,
        *,
        loads_ttl_s: float = 10.0,
        socket_timeout_s: float = 0.5,
        retry_after_s: float = 1.0,
        max_connections: int = 32,
        clock: Clock = time.time,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        self.prefix = prefix
        self.decision_stream_max = decision_stream_max
        self.history_max = history_max
        self.loads_ttl_s = loads_ttl_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._url = _redact(url)
        # No client-side retries: a failure goes straight to the fallback and the backoff below.
        # A bounded pool: a burst waits up to socket_timeout_s for a connection instead of opening hundreds.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            decode_responses=True,
            health_check_interval=0,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._op_budget_s = 3 * socket_timeout_s
        self._k_threshold = f"{prefix}threshold"
        self._k_history = f"{prefix}threshold:history"
        self._k_loads = f"{prefix}loads"
        self._k_debt = f"{prefix}quality_debt"
        self._k_decisions = f"{prefix}decisions"
        # Connection state.
        self._down = False
        self._retry_at = 0.0
        self._flush_lock = asyncio.Lock()
        # Last known values (fallbacks) and buffered counters.
        self._threshold: ThresholdState | None = None
        self._history: deque[ThresholdState] = deque(maxlen=history_max)
        self._loads: dict[str, tuple[dict[str, Any], float]] = {}
        self._debt: dict[str, Any] = {"total": 0.0, "per_expert": {}, "requests": 0}
        self._decisions: list[dict[str, Any]] = []
        self._pending_debt: dict[str, list[float]] = {}  # expert -> [amount, requests]
        self.dropped_decisions = 0
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # written while Redis was down

    # -- fault handling -----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the store is using its fallback after a failure."""
        return not self._down

    async def _run(self, op: Callable[[Any], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run `op(redis)` (after flushing buffered counters); (False, None) if Redis failed."""
        if self._down and time.monotonic() < self._retry_at:
            return False, None
        try:
            async with asyncio.timeout(self._op_budget_s):
                if self._pending_debt:
                    await self._flush()
                result = await op(self._redis)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as err:
            await self._mark_down(err)
            return False, None
        except RedisError as err:  # a command error, not an outage: fall back without raising
            log.warning("redis command failed at %s: %s", self._url, err)
            return False, None
        if self._down:
            self._down = False
            log.info("redis at %s is reachable again; shared state restored", self._url)
        return True, result

    async def _mark_down(self, err: BaseException) -> None:
        self._retry_at = time.monotonic() + self.retry_after_s
        if not self._down:
            self._down = True
            log.warning(
                "redis at %s unreachable (%s: %s); using local state, buffering counters, retrying every %.1fs",
                self._url,
                type(err).__name__,
                err,
                self.retry_after_s,
            )
        try:  # drop idle connections to a restarted server so the next try reconnects cleanly
            await self._redis.connection_pool.disconnect(inuse_connections=False)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.debug("redis: dropping idle connections failed: %s", exc)

    async def _flush(self) -> None:
        """Add the counters buffered during an outage, all or nothing (MULTI/EXEC)."""
        async with self._flush_lock:
            debt, self._pending_debt = self._pending_debt, {}
            if not debt:
                return
            try:
                pipe = self._redis.pipeline(transaction=True)
                pipe.hincrbyfloat(self._k_debt, "total", sum(a for a, _ in debt.values()))
                pipe.hincrby(self._k_debt, "requests", int(sum(r for _, r in debt.values())))
                for expert, (amount, _) in debt.items():
                    pipe.hincrbyfloat(self._k_debt, f"expert:{expert}", float(amount))
                await pipe.execute()
            except BaseException:
                for expert, vals in debt.items():
                    self._buffer(self._pending_debt, expert, vals)
                raise
            log.debug(
                "redis: added counters buffered during the outage (%d experts' debt)",
                len(debt),
            )

    @staticmethod
    def _buffer(pending: dict[str, list[float]], key: str, vals: list[float]) -> None:
        cur = pending.setdefault(key, [0.0] * len(vals))
        for i, v in enumerate(vals):
            cur[i] += v

    # -- threshold ----------------------------------------------------------------------------

    async def get_threshold(self) -> ThresholdState | None:
        ok, raw = await self._run(lambda r: r.get(self._k_threshold))
        if ok and raw:
            try:
                self._threshold = ThresholdState.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError) as err:
                log.warning("redis: ignoring a malformed threshold state: %s", err)
        return self._threshold

    async def publish_threshold(self, state: ThresholdState) -> None:
        state = ThresholdState.from_dict(state.to_dict())
        self._threshold = state
        self._history.append(state)
        raw = _dumps(state.to_dict())

        async def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=True)
            pipe.set(self._k_threshold, raw)
            pipe.lpush(self._k_history, raw)
            pipe.ltrim(self._k_history, 0, self.history_max - 1)
            return await pipe.execute()

        await self._run(op)

    async def threshold_history(self, n: int = 100) -> list[ThresholdState]:
        if n <= 0:
            return []
        ok, raw = await self._run(lambda r: r.lrange(self._k_history, 0, n - 1))
        if not ok or raw is None:
            return list(self._history)[-n:]
        return [ThresholdState.from_dict(json.loads(s)) for s in reversed(raw)]

    # -- loads --------------------------------------------------------------------------------

    async def put_loads(self, loads: dict[str, dict[str, Any]]) -> None:
        if not loads:
            return
        expires = self._clock() + self.loads_ttl_s
        mapping: dict[str, str] = {}
        for expert, snap in loads.items():
            self._loads[expert] = (json.loads(_dumps(snap)), expires)
            mapping[expert] = _dumps({"data": snap, "exp": expires})

        async def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self._k_loads, mapping=mapping)
            pipe.pexpire(self._k_loads, max(1, int(self.loads_ttl_s * 1000)))
            return await pipe.execute()

        await self._run(op)

    async def get_loads(self) -> dict[str, dict[str, Any]]:
        now = self._clock()

        async def op(r: Any) -> dict[str, tuple[dict[str, Any], float]]:
            raw = await r.hgetall(self._k_loads)
            fresh: dict[str, tuple[dict[str, Any], float]] = {}
            stale: list[str] = []
            for expert, value in raw.items():
                try:
                    entry = json.loads(value)
                    data, exp = entry["data"], float(entry["exp"])
                except (ValueError, KeyError, TypeError):
                    stale.append(expert)
                    continue
                if exp > now:
                    fresh[expert] = (data, exp)
                else:
                    stale.append(expert)
            if stale:
                await r.hdel(self._k_loads, *stale)
            return fresh

        ok, fresh = await self._run(op)
        if ok and fresh is not None:
            self._loads = fresh
        return {e: json.loads(_dumps(d)) for e, (d, exp) in self._loads.items() if exp > now}

    # -- quality debt -------------------------------------------------------------------------

    async def get_session(self, key: str) -> str | None:
        """From Redis; while it is down, from this replica's memory (what it wrote itself)."""
        ok, val = await self._run(lambda r: r.get(f"{self.prefix}session:{key}"))
        if ok:
            return val
        hit = self._sessions.get(key)
        return hit[0] if hit is not None and hit[1] > self._clock() else None

    async def put_session(self, key: str, expert: str, ttl_s: float) -> None:
        ok, _ = await self._run(lambda r: r.set(f"{self.prefix}session:{key}", expert, px=max(1, int(ttl_s * 1000))))
        if not ok:
            self._sessions[key] = (expert, self._clock() + ttl_s)
            self._sessions.move_to_end(key)
            while len(self._sessions) > 10_000:
                self._sessions.popitem(last=False)

    async def add_quality_debt(self, expert: str, amount: float) -> None:
        async def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=True)
            pipe.hincrbyfloat(self._k_debt, "total", float(amount))
            pipe.hincrby(self._k_debt, "requests", 1)
            pipe.hincrbyfloat(self._k_debt, f"expert:{expert}", float(amount))
            return await pipe.execute()

        ok, _ = await self._run(op)
        if not ok:
            self._buffer(self._pending_debt, expert, [float(amount), 1])

    async def get_quality_debt(self) -> dict[str, Any]:
        ok, raw = await self._run(lambda r: r.hgetall(self._k_debt))
        if ok and raw is not None:
            self._debt = {
                "total": float(raw.get("total", 0.0)),
                "requests": int(raw.get("requests", 0)),
                "per_expert": {
                    k[len("expert:") :]: float(v) for k, v in raw.items() if k.startswith("expert:")
                },
            }
        out = {
            "total": self._debt["total"],
            "per_expert": dict(self._debt["per_expert"]),
            "requests": self._debt["requests"],
        }
        for expert, (amount, req) in self._pending_debt.items():
            out["total"] += amount
            out["requests"] += int(req)
            out["per_expert"][expert] = out["per_expert"].get(expert, 0.0) + amount
        return out

    # -- decisions ----------------------------------------------------------------------------

    async def add_report(self, debt: dict[str, list[float]], decisions: list[dict[str, Any]]) -> None:
        """One report in one pipeline (one round trip however many decisions and amounts it carries)."""
        debt = {e: list(a) for e, a in debt.items() if a}
        if not debt and not decisions:
            return
        now = self._clock()
        raws = [_dumps({**d, "ts": d.get("ts", now)}) for d in decisions]

        async def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=True)  # all or nothing: a timed-out report is not counted twice
            if debt:
                pipe.hincrbyfloat(self._k_debt, "total", float(sum(sum(a) for a in debt.values())))
                pipe.hincrby(self._k_debt, "requests", sum(len(a) for a in debt.values()))
                for expert, amounts in debt.items():
                    pipe.hincrbyfloat(self._k_debt, f"expert:{expert}", float(sum(amounts)))
            for raw in raws:
                pipe.xadd(self._k_decisions, {"d": raw}, maxlen=self.decision_stream_max, approximate=True)
            return await pipe.execute()

        ok, _ = await self._run(op)
        if not ok:
            for expert, amounts in debt.items():
                self._buffer(self._pending_debt, expert, [float(sum(amounts)), len(amounts)])
            self.dropped_decisions += len(raws)

    async def record_decision(self, record: dict[str, Any]) -> None:
        rec = dict(record)
        rec.setdefault("ts", self._clock())
        raw = _dumps(rec)
        ok, _ = await self._run(
            lambda r: r.xadd(
                self._k_decisions, {"d": raw}, maxlen=self.decision_stream_max, approximate=True
            )
        )
        if not ok:
            self.dropped_decisions += 1

    async def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        ok, raw = await self._run(lambda r: r.xrevrange(self._k_decisions, count=n))
        if ok and raw is not None:
            self._decisions = [json.loads(fields["d"]) for _, fields in reversed(raw)]
        return [dict(d) for d in self._decisions[-n:]]

    # -- lifecycle ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._pending_debt:
            await self._run(lambda r: r.ping())  # flushes the buffer if Redis is reachable
            if self._pending_debt:
                log.warning("redis: closing with counters that could not be written (Redis unreachable)")
        try:
            await self._redis.aclose()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("redis: close failed: %s", exc)


def make_state_store(
    redis_url: str | None,
    *,
    decision_stream_max: int = 100_000,
    history_max: int = 1000,
    loads_ttl_s: float = 10.0,
    **redis_kw: Any,
) -> StateStore:
    """A :class:`RedisStateStore` when `redis_url` is given (e.g. COE_REDIS_URL), else in-process.

    `redis_kw` (prefix, socket_timeout_s, retry_after_s, clock) go to the Redis store only.
    """
    if redis_url:
        return RedisStateStore(
            redis_url,
            decision_stream_max=decision_stream_max,
            history_max=history_max,
            loads_ttl_s=loads_ttl_s,
            **redis_kw,
        )
    clock = redis_kw.get("clock")
    return InProcessStateStore(
        decision_stream_max=decision_stream_max,
        history_max=history_max,
        loads_ttl_s=loads_ttl_s,
        **({"clock": clock} if clock else {}),
    )
