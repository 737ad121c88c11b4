"""API keys, per-key rate limits and per-team budgets, held in the state store.

* A key belongs to a team. It is random (256 bits), shown once at creation and stored only as its SHA-256
  (compared in constant time), with its team, creation time, optional expiry, allowed experts and limits.
* An admin key (COE_ADMIN_KEY / COE_ADMIN_KEY_FILE) manages keys; authentication is on whenever it is set.
* Limits: requests and tokens per minute per key, as token buckets (one Lua script per check in Redis, so
  they hold across ingress replicas); a spend budget per team and period (day, week or calendar month, UTC),
  charged with each answer's real tokens times the expert's price.
* Usage is counted once per request, per team, expert and month; the counters expire.

Two stores with the same behaviour: :class:`RedisAuthStore` (shared; COE_REDIS_URL) and
:class:`InProcessAuthStore` (one ingress replica). :class:`Authenticator` is what the ingress calls: it
caches verified keys for ``auth.key_cache_s`` and decides what a Redis outage does (``auth.on_store_failure``).
"""

from __future__ import annotations

import abc
import asyncio
import calendar
import contextlib
import hashlib
import hmac
import inspect
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from coe.config import AuthConfig
from coe.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    StoreUnavailableError,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Period = Literal["day", "week", "month"]
PERIODS: tuple[str, ...] = ("day", "week", "month")
OPEN_TEAM = "anonymous"  # the team of every request while authentication is off
ADMIN_TEAM = "admin"  # the admin key's usage is counted under this team
KEY_PREFIX = "coe-"
_TEAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BUCKET_TTL_MS = 120_000  # a full bucket needs no key: idle buckets expire after two minutes


class StoreDown(Exception):
    """The store could not be reached (internal: the Authenticator decides what that means)."""


@contextlib.contextmanager
def _store_needed() -> Iterator[None]:
    """Key management needs the store: an outage is a 503 with Retry-After."""
    try:
        yield
    except StoreDown:
        raise StoreUnavailableError("the key store is unreachable; retry later", headers={"retry-after": "1"}) from None


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: the only form a key is stored in."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh API key (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def period_id(period: str, now: float) -> str:
    """The UTC period `now` falls in: 2026-12-03 (day), 2026-W49 (ISO week) or 2026-12 (month)."""
    d = datetime.fromtimestamp(now, tz=timezone.utc)
    if period == "day":
        return d.strftime("%Y-%m-%d")
    if period == "week":
        y, w, _ = d.isocalendar()
        return f"{y}-W{w:02d}"
    return d.strftime("%Y-%m")


def period_end(period: str, now: float) -> float:
    """When the UTC period `now` falls in ends (epoch seconds)."""
    d = datetime.fromtimestamp(now, tz=timezone.utc)
    day0 = datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()
    if period == "day":
        return day0 + 86400
    if period == "week":
        return day0 + (7 - d.weekday()) * 86400
    return day0 + (calendar.monthrange(d.year, d.month)[1] - d.day + 1) * 86400


def validate_team(name: str) -> str:
    """A team name: 1-64 of letters, digits, '_', '.', '-' (starting with a letter or digit)."""
    if not isinstance(name, str) or not _TEAM_RE.match(name):
        raise InvalidRequestError("team must be 1-64 characters of letters, digits, '_', '.' and '-'",
                                  param="team")
    return name


@dataclass
class TeamRecord:
    """A team's spend budget (None: unlimited) per period."""

    name: str
    budget_usd: float | None = None
    period: str = "month"


@dataclass
class KeyRecord:
    """A stored key: never the key itself, only its hash."""

    id: str
    team: str
    key_hash: str
    created_at: float
    expires_at: float | None = None
    experts: list[str] | None = None  # None: every expert
    rpm: int | None = None
    tpm: int | None = None
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        """What listing shows: no key, and only the first 8 hex digits of its hash."""
        d = asdict(self)
        d["hash_prefix"] = d.pop("key_hash")[:8]
        return d

    @classmethod
    def from_json(cls, raw: str) -> KeyRecord:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Principal:
    """Who a request is from, with everything admission needs (cached per replica)."""

    team: str
    key_id: str | None = None
    admin: bool = False
    experts: frozenset[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    period: str = "month"
    expires_at: float | None = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.budget_usd is not None)

    def may_use(self, expert: str) -> bool:
        return self.experts is None or expert in self.experts


@dataclass
class Admission:
    """The outcome of one limit check."""

    allowed: bool
    reason: str = "ok"  # ok | rate | budget
    retry_after_s: float = 0.0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    spent_usd: float = 0.0


@dataclass
class Charge:
    """What one answered request cost (requests > 1 only for counters replayed after an outage)."""

    team: str
    key_id: str | None
    expert: str
    tokens: int
    cost_usd: float
    tpm: int | None
    month: str
    spend_key: str | None  # "<period>:<period id>" of the team's budget, None without one
    spend_ttl_s: int
    usage_ttl_s: int
    requests: int = 1
    now: float = field(default_factory=time.time)


# ---------------------------------------------------------------------------------------------------------------
# token buckets (the in-process store and the Lua script implement the same arithmetic)


def bucket_level(tokens: float | None, ts: float | None, capacity: float, now: float) -> float:
    """A bucket of `capacity` per minute, refilled continuously; an absent bucket is full."""
    if tokens is None or ts is None:
        return capacity
    return min(capacity, tokens + max(0.0, now - ts) * capacity / 60.0)


class AuthStore(abc.ABC):
    """Keys, teams, limits and usage. Redis-backed methods raise :class:`StoreDown` when Redis is unreachable."""

    @abc.abstractmethod
    async def put_key(self, rec: KeyRecord) -> None: ...

    @abc.abstractmethod
    async def get_key(self, key_hash: str) -> tuple[KeyRecord | None, TeamRecord | None]:
        """The key with this hash and its team's record (None, None if unknown)."""

    @abc.abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, now: float) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def put_team(self, team: TeamRecord) -> None: ...

    @abc.abstractmethod
    async def get_teams(self) -> dict[str, TeamRecord]: ...

    @abc.abstractmethod
    async def admit(self, p: Principal, now: float) -> Admission:
        """Check the key's buckets and the team's budget; take one request from the request bucket if allowed."""

    @abc.abstractmethod
    async def charge(self, charges: list[Charge]) -> None:
        """Debit tokens from the token buckets, add spend and usage."""

    @abc.abstractmethod
    async def usage(self, month: str, team: str | None = None) -> dict[str, dict[str, Any]]:
        """{team: {requests, tokens, cost_usd, experts: {expert: {requests, tokens, cost_usd}}}} for a month."""

    @abc.abstractmethod
    async def spent(self, team: str, spend_key: str) -> float: ...

    async def close(self) -> None:
        return None


def _usage_row() -> dict[str, Any]:
    return {"requests": 0, "tokens": 0, "cost_usd": 0.0}


class InProcessAuthStore(AuthStore):
    """Everything in this process: one ingress replica without Redis (and the local fallback during outages)."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, KeyRecord] = {}  # hash -> record
        self._teams: dict[str, TeamRecord] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, ts)
        self._spend: dict[str, tuple[float, float]] = {}  # team|spend_key -> (usd, expires_at)
        self._usage: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}  # (month, team) -> (row, expires)

    async def put_key(self, rec: KeyRecord) -> None:
        self._keys[rec.key_hash] = KeyRecord(**asdict(rec))

    async def get_key(self, key_hash: str) -> tuple[KeyRecord | None, TeamRecord | None]:
        rec = self._keys.get(key_hash)
        if rec is None:
            return None, None
        return KeyRecord(**asdict(rec)), self._teams.get(rec.team)

    async def list_keys(self) -> list[KeyRecord]:
        return sorted((KeyRecord(**asdict(r)) for r in self._keys.values()), key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str, now: float) -> KeyRecord | None:
        for rec in self._keys.values():
            if rec.id == key_id:
                if rec.revoked_at is None:
                    rec.revoked_at = now
                return KeyRecord(**asdict(rec))
        return None

    async def put_team(self, team: TeamRecord) -> None:
        self._teams[team.name] = TeamRecord(**asdict(team))

    async def get_teams(self) -> dict[str, TeamRecord]:
        return {n: TeamRecord(**asdict(t)) for n, t in self._teams.items()}

    def _set(self, name: str, level: float, now: float) -> None:
        """Store a bucket's level; its clock never moves back (a replayed charge carries an older time)."""
        prev = self._buckets.get(name)
        self._buckets[name] = (level, max(now, prev[1]) if prev else now)

    def _level(self, name: str, cap: float, now: float) -> float:
        lv, ts = self._buckets.get(name, (None, None))  # type: ignore[assignment]
        return bucket_level(lv, ts, cap, now)

    async def spent(self, team: str, spend_key: str) -> float:
        usd, exp = self._spend.get(f"{team}|{spend_key}", (0.0, math.inf))
        return usd if exp > self._clock() else 0.0

    async def admit(self, p: Principal, now: float) -> Admission:
        spent = 0.0
        if p.budget_usd is not None:
            spent = await self.spent(p.team, f"{p.period}:{period_id(p.period, now)}")
            if spent >= p.budget_usd:
                return Admission(False, "budget", period_end(p.period, now) - now, spent_usd=spent)
        rr = self._level(f"{p.key_id}:r", p.rpm, now) if p.rpm else None
        rt = self._level(f"{p.key_id}:t", p.tpm, now) if p.tpm else None
        retry = 0.0
        if rr is not None and rr < 1:
            retry = max(retry, (1 - rr) * 60.0 / p.rpm)  # type: ignore[operator]
        if rt is not None and rt <= 0:
            retry = max(retry, (1 - rt) * 60.0 / p.tpm)  # type: ignore[operator]
        if retry > 0:
            return Admission(False, "rate", retry, _floor(rr), _floor(rt), spent)
        if rr is not None:
            rr -= 1
            self._set(f"{p.key_id}:r", rr, now)
        if rt is not None:
            self._set(f"{p.key_id}:t", rt, now)
        return Admission(True, "ok", 0.0, _floor(rr), _floor(rt), spent)

    async def charge(self, charges: list[Charge]) -> None:
        for c in charges:
            if c.tpm and c.key_id:
                name = f"{c.key_id}:t"
                self._set(name, self._level(name, c.tpm, c.now) - c.tokens, c.now)
            if c.spend_key:
                k = f"{c.team}|{c.spend_key}"
                usd, exp = self._spend.get(k, (0.0, c.now + c.spend_ttl_s))
                self._spend[k] = (usd + c.cost_usd, exp)
            row, exp = self._usage.get((c.month, c.team), ({**_usage_row(), "experts": {}}, c.now + c.usage_ttl_s))
            _add_usage(row, c)
            self._usage[(c.month, c.team)] = (row, exp)

    async def usage(self, month: str, team: str | None = None) -> dict[str, dict[str, Any]]:
        now = self._clock()
        return {t: json.loads(json.dumps(row)) for (m, t), (row, exp) in sorted(self._usage.items())
                if m == month and exp > now and (team is None or t == team)}


def _add_usage(row: dict[str, Any], c: Charge) -> None:
    for target in (row, row["experts"].setdefault(c.expert, _usage_row())):
        target["requests"] += c.requests
        target["tokens"] += c.tokens
        target["cost_usd"] += c.cost_usd


def _floor(x: float | None) -> int | None:
    return None if x is None else max(0, math.floor(x))


# ---------------------------------------------------------------------------------------------------------------
# Redis

# KEYS: request bucket, token bucket, team spend. ARGV: now (s), rpm, tpm, budget (-1: none), bucket ttl (ms).
# Returns {allowed, reason, retry_after_s, remaining_requests, remaining_tokens, spent} (numbers as strings).
_ADMIT_LUA = """
local now = tonumber(ARGV[1])
local rpm, tpm, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'l', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil or ts == nil then return cap end
  return math.min(cap, l + math.max(0, now - ts) * cap / 60)
end
local function stamp(key)  -- never move a bucket's clock back (a replayed charge, a replica's slow clock)
  local ts = tonumber(redis.call('HGET', key, 'ts'))
  if ts ~= nil and ts > now then return ts end
  return now
end
local spent = 0
if budget >= 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent >= budget then return {0, 'budget', '0', '-1', '-1', tostring(spent)} end
end
local rr, rt, retry = -1, -1, 0
if rpm > 0 then
  rr = level(KEYS[1], rpm)
  if rr < 1 then retry = math.max(retry, (1 - rr) * 60 / rpm) end
end
if tpm > 0 then
  rt = level(KEYS[2], tpm)
  if rt <= 0 then retry = math.max(retry, (1 - rt) * 60 / tpm) end
end
if retry > 0 then return {0, 'rate', tostring(retry), tostring(rr), tostring(rt), tostring(spent)} end
if rpm > 0 then
  rr = rr - 1
  redis.call('HSET', KEYS[1], 'l', tostring(rr), 'ts', tostring(stamp(KEYS[1])))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if tpm > 0 then
  redis.call('HSET', KEYS[2], 'l', tostring(rt), 'ts', tostring(stamp(KEYS[2])))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1, 'ok', '0', tostring(rr), tostring(rt), tostring(spent)}
"""

# KEYS: token bucket, team spend, usage hash, month's team set.
# ARGV: now, tpm, tokens, cost, expert, requests, spend ttl (s), usage ttl (s), team, bucket ttl (ms).
_CHARGE_LUA = """
local now, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, expert, requests = ARGV[4], ARGV[5], tonumber(ARGV[6])
if tpm > 0 then
  local v = redis.call('HMGET', KEYS[1], 'l', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil or ts == nil then l = tpm else l = math.min(tpm, l + math.max(0, now - ts) * tpm / 60) end
  redis.call('HSET', KEYS[1], 'l', tostring(l - tokens), 'ts', tostring(math.max(now, ts or now)))
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]))
end
if KEYS[2] ~= '' then
  redis.call('INCRBYFLOAT', KEYS[2], cost)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
end
redis.call('HINCRBY', KEYS[3], 'requests', requests)
redis.call('HINCRBY', KEYS[3], 'tokens', tokens)
redis.call('HINCRBYFLOAT', KEYS[3], 'cost_usd', cost)
redis.call('HINCRBY', KEYS[3], 'e:' .. expert .. ':requests', requests)
redis.call('HINCRBY', KEYS[3], 'e:' .. expert .. ':tokens', tokens)
redis.call('HINCRBYFLOAT', KEYS[3], 'e:' .. expert .. ':cost_usd', cost)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[8]))
redis.call('SADD', KEYS[4], ARGV[9])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
return 1
"""

# KEYS: the key record. ARGV: team key prefix. Returns {key json or false, team json or false}.
_GET_KEY_LUA = """
local k = redis.call('GET', KEYS[1])
if not k then return {false, false} end
local team = cjson.decode(k)['team']
return {k, redis.call('GET', ARGV[1] .. team)}
"""


class RedisAuthStore(AuthStore):
    """Keys, limits and usage in Redis under ``{prefix}auth:``, ``{prefix}rl:``, ``{prefix}spend:`` and
    ``{prefix}usage:``. Every limit check is one script call; every charge is one script call."""

    def __init__(self, url: str, prefix: str = "coe:", *, socket_timeout_s: float = 0.5,
                 max_connections: int = 64, retry_after_s: float = 1.0, clock: Clock = time.time) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.prefix = prefix
        self._clock = clock
        # Bounded: a burst waits for a connection. One immediate retry on a broken connection: after a Redis
        # restart the pooled connections are dead, and the first call on each would otherwise fail a request.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            socket_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 1), retry_on_timeout=False,
            decode_responses=True, health_check_interval=0)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._admit = self._redis.register_script(_ADMIT_LUA)
        self._charge = self._redis.register_script(_CHARGE_LUA)
        self._get = self._redis.register_script(_GET_KEY_LUA)
        self._budget_s = 3 * socket_timeout_s
        self.retry_after_s = retry_after_s
        self._retry_at = 0.0

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _call(self, coro: Any) -> Any:
        """Await a Redis call; StoreDown on any Redis failure. After an outage, calls fail at once (no network
        wait) for retry_after_s, then Redis is tried again."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if time.monotonic() < self._retry_at:
            if inspect.iscoroutine(coro):
                coro.close()
            raise StoreDown("redis unreachable (retrying shortly)")
        try:
            async with asyncio.timeout(self._budget_s):
                result = await coro
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as err:
            if not self._retry_at:  # once per outage (the back-off window keeps later calls off the network)
                log.warning("auth store: redis unreachable: %s: %s", type(err).__name__, err)
            self._retry_at = time.monotonic() + self.retry_after_s
            try:  # drop idle connections to a restarted server so the next try reconnects cleanly
                await self._redis.connection_pool.disconnect(inuse_connections=False)
            except Exception:  # noqa: BLE001 - best effort
                pass
            raise StoreDown(f"{type(err).__name__}: {err}") from None
        except RedisError as err:  # a command error (READONLY after a failover, OOM): not answerable either
            log.warning("auth store: redis command failed: %s: %s", type(err).__name__, err)
            raise StoreDown(f"{type(err).__name__}: {err}") from None
        self._retry_at = 0.0
        return result

    async def put_key(self, rec: KeyRecord) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._k("auth", "key", rec.key_hash), json.dumps(asdict(rec)))
        pipe.hset(self._k("auth", "keyids"), rec.id, rec.key_hash)
        await self._call(pipe.execute())

    async def get_key(self, key_hash: str) -> tuple[KeyRecord | None, TeamRecord | None]:
        raw_key, raw_team = await self._call(
            self._get(keys=[self._k("auth", "key", key_hash)], args=[self._k("auth", "team", "")]))
        if not raw_key:
            return None, None
        return KeyRecord.from_json(raw_key), (TeamRecord(**json.loads(raw_team)) if raw_team else None)

    async def list_keys(self) -> list[KeyRecord]:
        ids = await self._call(self._redis.hgetall(self._k("auth", "keyids")))
        if not ids:
            return []
        raws = await self._call(self._redis.mget([self._k("auth", "key", h) for h in ids.values()]))
        return sorted((KeyRecord.from_json(r) for r in raws if r), key=lambda r: r.created_at)

    async def revoke_key(self, key_id: str, now: float) -> KeyRecord | None:
        key_hash = await self._call(self._redis.hget(self._k("auth", "keyids"), key_id))
        if not key_hash:
            return None
        raw = await self._call(self._redis.get(self._k("auth", "key", key_hash)))
        if not raw:
            return None
        rec = KeyRecord.from_json(raw)
        if rec.revoked_at is None:
            rec.revoked_at = now
            await self._call(self._redis.set(self._k("auth", "key", key_hash), json.dumps(asdict(rec))))
        return rec

    async def put_team(self, team: TeamRecord) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._k("auth", "team", team.name), json.dumps(asdict(team)))
        pipe.sadd(self._k("auth", "teams"), team.name)
        await self._call(pipe.execute())

    async def get_teams(self) -> dict[str, TeamRecord]:
        names = sorted(await self._call(self._redis.smembers(self._k("auth", "teams"))))
        if not names:
            return {}
        raws = await self._call(self._redis.mget([self._k("auth", "team", n) for n in names]))
        return {n: TeamRecord(**json.loads(r)) for n, r in zip(names, raws) if r}

    def _spend_key(self, team: str, spend_key: str) -> str:
        return self._k("spend", team, spend_key)

    async def spent(self, team: str, spend_key: str) -> float:
        raw = await self._call(self._redis.get(self._spend_key(team, spend_key)))
        return float(raw or 0.0)

    async def admit(self, p: Principal, now: float) -> Admission:
        spend = self._spend_key(p.team, f"{p.period}:{period_id(p.period, now)}")
        res = await self._call(self._admit(
            keys=[self._k("rl", str(p.key_id), "r"), self._k("rl", str(p.key_id), "t"), spend],
            args=[repr(now), p.rpm or 0, p.tpm or 0, -1 if p.budget_usd is None else repr(p.budget_usd),
                  BUCKET_TTL_MS]))
        allowed, reason, retry, rr, rt, spent = res
        if reason == "budget":
            return Admission(False, "budget", period_end(p.period, now) - now, spent_usd=float(spent))
        return Admission(bool(int(allowed)), str(reason), float(retry),
                         _floor(float(rr)) if p.rpm else None, _floor(float(rt)) if p.tpm else None, float(spent))

    async def charge(self, charges: list[Charge]) -> None:
        pipe = self._redis.pipeline(transaction=True)  # all or nothing: a timed-out batch is replayed once
        for c in charges:
            await self._charge(keys=[self._k("rl", str(c.key_id), "t"),
                               self._spend_key(c.team, c.spend_key) if c.spend_key else "",
                               self._k("usage", c.month, c.team), self._k("usage", c.month, "_teams")],
                         args=[repr(c.now), c.tpm or 0, int(c.tokens), repr(float(c.cost_usd)), c.expert,
                               int(c.requests), int(c.spend_ttl_s), int(c.usage_ttl_s), c.team, BUCKET_TTL_MS],
                         client=pipe)
        await self._call(pipe.execute())

    async def usage(self, month: str, team: str | None = None) -> dict[str, dict[str, Any]]:
        teams = [team] if team else sorted(await self._call(self._redis.smembers(self._k("usage", month, "_teams"))))
        out: dict[str, dict[str, Any]] = {}
        for t in teams:
            raw = await self._call(self._redis.hgetall(self._k("usage", month, t)))
            if not raw:
                continue
            row: dict[str, Any] = {"requests": int(raw.get("requests", 0)), "tokens": int(raw.get("tokens", 0)),
                                   "cost_usd": float(raw.get("cost_usd", 0.0)), "experts": {}}
            for k, v in raw.items():
                if k.startswith("e:"):
                    expert, _, what = k[2:].rpartition(":")
                    e = row["experts"].setdefault(expert, _usage_row())
                    e[what] = float(v) if what == "cost_usd" else int(v)
            out[t] = row
        return out

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("redis: close failed: %s", exc)


def make_auth_store(redis_url: str | None, **kw: Any) -> AuthStore:
    """Redis when a URL is given (COE_REDIS_URL), else in-process."""
    return RedisAuthStore(redis_url, **kw) if redis_url else InProcessAuthStore()


# ---------------------------------------------------------------------------------------------------------------
# what the ingress calls


def _parse_time(value: Any, param: str) -> float | None:
    """Epoch seconds from None, a number, or an ISO date / datetime (UTC when no zone is given)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"{param} must be an ISO date or a Unix time", param=param)
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)) or abs(float(value)) > 1e11:
            raise InvalidRequestError(f"{param} is not a usable time", param=param)
        return float(value)
    if isinstance(value, str):
        try:
            d = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRequestError(f"{param}: '{value}' is not an ISO date (YYYY-MM-DD[THH:MM[:SS]])",
                                      param=param) from None
        if d.tzinfo is None:
            d = d.replace(tzinfo=timezone.utc)
        return d.timestamp()
    raise InvalidRequestError(f"{param} must be an ISO date or a Unix time", param=param)


MAX_LIMIT = 10**12  # rpm/tpm beyond this are not limits (and overflow the buckets' float arithmetic)


def _positive_int(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_LIMIT:
        raise InvalidRequestError(f"{param} must be an integer from 1 to {MAX_LIMIT}", param=param)
    return value


class Authenticator:
    """Per ingress replica: verifies keys (with a short cache), checks limits, charges usage, manages keys."""

    def __init__(self, cfg: AuthConfig, store: AuthStore, admin_key: str | None, experts: list[str],
                 *, shared: bool, clock: Clock = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.experts = list(experts)
        self.shared = shared  # the store is Redis (shared by replicas)
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()  # hash -> (principal, verified)
        self._local = InProcessAuthStore(clock)  # limits while Redis is down (on_store_failure: local)
        self._pending: dict[tuple[Any, ...], Charge] = {}  # charges to replay once Redis is back
        self._down = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.open_principal = Principal(team=OPEN_TEAM)
        self.admin_principal = Principal(team=ADMIN_TEAM, admin=True)

    @property
    def enabled(self) -> bool:
        return self._admin_hash is not None

    # -- verifying keys --------------------------------------------------------------------------------------

    @staticmethod
    def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
        """The key of `Authorization: Bearer <key>`, else of `x-api-key`."""
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        if x_api_key and x_api_key.strip():
            return x_api_key.strip()
        return None

    def _mark(self, down: bool, err: BaseException | None = None) -> None:
        if down and not self._down:
            log.warning("auth store unreachable (%s): cached keys keep working for %.0fs, limits %s", err,
                        self.cfg.outage_grace_s, self.cfg.on_store_failure)
        elif not down and self._down:
            log.info("auth store reachable again")
        self._down = down

    async def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        """The principal of a request; AuthenticationError for a missing, unknown, revoked or expired key."""
        if not self.enabled:
            return self.open_principal
        key = self.key_from_headers(authorization, x_api_key)
        if key is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        h = hash_key(key)
        assert self._admin_hash is not None
        if hmac.compare_digest(h, self._admin_hash):
            return self.admin_principal
        now = self._clock()
        cached = self._cache.get(h)
        if cached is not None and now - cached[1] < self.cfg.key_cache_s:
            return self._check_expiry(cached[0], now)
        try:
            rec, team = await self.store.get_key(h)
        except StoreDown as err:
            self._mark(True, err)
            if cached is not None and now - cached[1] < self.cfg.outage_grace_s:
                return self._check_expiry(cached[0], now)
            raise AuthenticationError("API key could not be verified: the key store is unreachable") from None
        self._mark(False)
        if rec is None or not hmac.compare_digest(rec.key_hash, h):
            self._cache.pop(h, None)
            raise AuthenticationError("invalid API key")
        if rec.revoked_at is not None:
            self._cache.pop(h, None)
            raise AuthenticationError("this API key has been revoked")
        p = Principal(team=rec.team, key_id=rec.id, experts=None if rec.experts is None else frozenset(rec.experts),
                      rpm=rec.rpm, tpm=rec.tpm, budget_usd=team.budget_usd if team else None,
                      period=team.period if team else "month", expires_at=rec.expires_at)
        self._cache[h] = (p, now)
        self._cache.move_to_end(h)
        while len(self._cache) > self.cfg.max_cached_keys:
            self._cache.popitem(last=False)
        return self._check_expiry(p, now)

    @staticmethod
    def _check_expiry(p: Principal, now: float) -> Principal:
        if p.expires_at is not None and now >= p.expires_at:
            raise AuthenticationError("this API key has expired")
        return p

    def require_admin(self, p: Principal) -> None:
        """PermissionDeniedError unless `p` is the admin key (or authentication is off)."""
        if self.enabled and not p.admin:
            raise PermissionDeniedError("this endpoint needs the admin key")

    def check_expert(self, p: Principal, expert: str) -> None:
        if not p.may_use(expert):
            raise PermissionDeniedError(f"team '{p.team}' may not use expert '{expert}'", param="model")

    # -- limits ----------------------------------------------------------------------------------------------

    async def admit(self, p: Principal) -> dict[str, str]:
        """Check the key's rate limits and the team's budget: the x-ratelimit-* headers, or a 429."""
        if not p.limited:
            return {}
        now = self._clock()
        try:
            a = await self.store.admit(p, now)
            self._mark(False)
        except StoreDown as err:
            self._mark(True, err)
            mode = self.cfg.on_store_failure
            if mode == "closed":
                raise StoreUnavailableError("limits cannot be checked: the key store is unreachable; retry later",
                                            headers={"retry-after": "1"}) from None
            if mode == "open":
                return {}
            a = await self._local.admit(p, now)
        headers = self._limit_headers(p, a)
        if a.allowed:
            return headers
        retry = str(max(1, math.ceil(a.retry_after_s)))
        if a.reason == "budget":
            raise QuotaExceededError(
                f"team '{p.team}' has spent its budget of ${p.budget_usd:g} for this {p.period} "
                f"(${a.spent_usd:.4f}); it renews at the start of the next {p.period} (UTC)",
                headers={**headers, "retry-after": retry})
        which = "requests" if p.rpm and a.remaining_requests == 0 else "tokens"
        limit = p.rpm if which == "requests" else p.tpm
        raise RateLimitError(f"rate limit reached: {limit} {which} per minute for this key; retry after {retry}s",
                             headers={**headers, "retry-after": retry})

    @staticmethod
    def _limit_headers(p: Principal, a: Admission) -> dict[str, str]:
        h: dict[str, str] = {}
        if p.rpm:
            h["x-ratelimit-limit-requests"] = str(p.rpm)
            h["x-ratelimit-remaining-requests"] = str(a.remaining_requests or 0)
        if p.tpm:
            h["x-ratelimit-limit-tokens"] = str(p.tpm)
            h["x-ratelimit-remaining-tokens"] = str(a.remaining_tokens or 0)
        return h

    def _charge_of(self, p: Principal, expert: str, tokens: int, cost_usd: float, now: float) -> Charge:
        spend_key = None
        spend_ttl = 0
        if p.budget_usd is not None:
            spend_key = f"{p.period}:{period_id(p.period, now)}"
            spend_ttl = int(period_end(p.period, now) - now) + 86400
        return Charge(team=p.team, key_id=p.key_id, expert=expert, tokens=int(tokens), cost_usd=float(cost_usd),
                      tpm=p.tpm, month=period_id("month", now), spend_key=spend_key, spend_ttl_s=spend_ttl,
                      usage_ttl_s=int(self.cfg.usage_retention_days * 86400), now=now)

    def charge_soon(self, p: Principal, expert: str, tokens: int, cost_usd: float) -> None:
        """Count one answered request (tokens, spend, usage) in the background; never raises."""
        task = asyncio.get_running_loop().create_task(self.charge(p, expert, tokens, cost_usd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def charge(self, p: Principal, expert: str, tokens: int, cost_usd: float) -> None:
        """Count one answered request; during an outage it is kept and replayed once the store is back."""
        c = self._charge_of(p, expert, tokens, cost_usd, self._clock())
        batch = [c]
        if self._pending:
            batch += list(self._pending.values())
            self._pending = {}
        try:
            await self.store.charge(batch)
            self._mark(False)
        except StoreDown as err:
            self._mark(True, err)
            if self.cfg.on_store_failure == "local":
                await self._local.charge([c])
            for b in batch:  # aggregated per (key, expert, month, period): bounded by the keys in use
                k = (b.team, b.key_id, b.expert, b.month, b.spend_key)
                prev = self._pending.get(k)
                if prev is None:
                    self._pending[k] = b
                else:
                    prev.requests += b.requests
                    prev.tokens += b.tokens
                    prev.cost_usd += b.cost_usd
        except Exception:  # noqa: BLE001 - accounting must never fail a request
            log.exception("charging usage failed")

    async def drain(self) -> None:
        """Wait for background charges (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- management (admin) ----------------------------------------------------------------------------------

    async def create_key(self, body: Any) -> dict[str, Any]:
        """Create a key from {team, rpm?, tpm?, budget_usd?, period?, experts?, expires_at?}: {id, key, team, ...}."""
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        allowed = {"team", "rpm", "tpm", "budget_usd", "period", "experts", "expires_at"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidRequestError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}", param=unknown[0])
        team = validate_team(body.get("team"))  # type: ignore[arg-type]
        if team in (OPEN_TEAM, ADMIN_TEAM):
            raise InvalidRequestError(f"team name '{team}' is reserved", param="team")
        rpm, tpm = _positive_int(body.get("rpm"), "rpm"), _positive_int(body.get("tpm"), "tpm")
        experts = body.get("experts")
        if experts is not None:
            if not isinstance(experts, list) or not experts or not all(isinstance(e, str) for e in experts):
                raise InvalidRequestError("experts must be a non-empty list of expert names", param="experts")
            bad = sorted(set(experts) - set(self.experts))
            if bad:
                raise InvalidRequestError(f"unknown expert(s) {bad}; experts: {self.experts}", param="experts")
            experts = sorted(set(experts))
        now = self._clock()
        expires_at = _parse_time(body.get("expires_at"), "expires_at")
        if expires_at is not None and expires_at <= now:
            raise InvalidRequestError("expires_at is in the past", param="expires_at")
        budget = body.get("budget_usd")
        period = body.get("period")
        if period is not None and period not in PERIODS:
            raise InvalidRequestError(f"period must be one of {list(PERIODS)}", param="period")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 \
                    or not math.isfinite(budget) or budget > 1e12:
                raise InvalidRequestError("budget_usd must be a number >= 0", param="budget_usd")
        elif period is not None:
            raise InvalidRequestError("period needs budget_usd", param="period")
        key = new_key()
        rec = KeyRecord(id="key_" + secrets.token_hex(6), team=team, key_hash=hash_key(key), created_at=now,
                        expires_at=expires_at, experts=experts, rpm=rpm, tpm=tpm)
        with _store_needed():
            if budget is not None:
                await self.store.put_team(TeamRecord(team, float(budget), period or "month"))
            await self.store.put_key(rec)
            t = (await self.store.get_teams()).get(team)
        return {"id": rec.id, "key": key, "team": team, "created_at": now, "expires_at": expires_at,
                "experts": experts, "rpm": rpm, "tpm": tpm,
                "budget_usd": t.budget_usd if t else None, "period": t.period if t and t.budget_usd is not None else None}

    async def list_keys(self) -> dict[str, Any]:
        with _store_needed():
            keys = await self.store.list_keys()
            teams = await self.store.get_teams()
        now = self._clock()
        data = []
        for r in keys:
            d = r.public()
            d["status"] = ("revoked" if r.revoked_at is not None
                           else "expired" if r.expires_at is not None and r.expires_at <= now else "active")
            t = teams.get(r.team)
            d["budget_usd"], d["period"] = (t.budget_usd, t.period) if t and t.budget_usd is not None else (None, None)
            data.append(d)
        return {"object": "list", "data": data}

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        with _store_needed():
            rec = await self.store.revoke_key(key_id, self._clock())
        if rec is None:
            raise NotFoundError(f"no key with id '{key_id}'", param="key_id")
        self._cache.pop(rec.key_hash, None)  # this replica at once; the others within key_cache_s
        return {"id": rec.id, "team": rec.team, "revoked": True, "revoked_at": rec.revoked_at}

    async def usage(self, team: str | None = None, month: str | None = None) -> dict[str, Any]:
        """Requests, tokens and spend per team and expert for a calendar month (default: this one), with each
        team's budget and what it spent of it in its current period."""
        now = self._clock()
        month = month or period_id("month", now)
        if not re.fullmatch(r"\d{4}-\d{2}", month):
            raise InvalidRequestError("month must look like 2026-12", param="month")
        if team is not None:
            validate_team(team)
        with _store_needed():
            rows = await self.store.usage(month, team)
            teams = await self.store.get_teams()
            for name, t in teams.items():
                if t.budget_usd is None or (team is not None and name != team):
                    continue
                spend_key = f"{t.period}:{period_id(t.period, now)}"
                row = rows.setdefault(name, {**_usage_row(), "experts": {}})
                row["budget"] = {"budget_usd": t.budget_usd, "period": t.period,
                                 "period_id": period_id(t.period, now),
                                 "spent_usd": await self.store.spent(name, spend_key)}
        return {"object": "usage", "month": month, "teams": rows}

    async def close(self) -> None:
        await self.drain()
        await self.store.close()
