"""Load-aware control of the router's cost/quality threshold t: pure, deterministic logic.

Nothing here does I/O or reads a clock: every time is passed in (unix seconds as a float), so
the controller can be driven by synthetic traces in tests and by a periodic task in serving.

* :class:`ExpertLoad` is one expert's load snapshot; :meth:`ExpertLoad.load_ratio` maps it to a
  number where 1.0 means "at capacity or at its latency SLO".
* :class:`ThresholdController` turns the experts' loads into a new :class:`ThresholdState`
  once per ``ControllerConfig.interval_s`` with a bounded PI rule (deadband, anti-windup,
  per-step rate limit, cooldown before falling).
* :class:`LatencyWindow` keeps recent request latencies for the p99 that enters the load ratio.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from coe.config import ControllerConfig, ExpertConfig, SLOConfig
from coe.stats import percentile


def near_best(quality: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Mask of the experts within `threshold` (scalar or one per row) of each row's best predicted quality."""
    q = np.asarray(quality, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(q),))[:, None]
    return q >= q.max(axis=1, keepdims=True) - t - 1e-12


def choose_within_threshold(quality: np.ndarray, prices: np.ndarray, threshold: float | np.ndarray,
                            penalties: np.ndarray | None = None) -> np.ndarray:
    """The routing rule (HybridLLM's threshold, made load-aware): one expert index per row of `quality`.

    Candidates are the experts within `threshold` (scalar or one per row) of the row's best predicted quality;
    with load penalties, only those of them whose penalised quality is also within `threshold` of the best
    penalised quality among them. The cheapest candidate wins (ties: higher quality). So:

    * no request ever gets an expert more than its own t below its best (t = 0 always gets the best);
    * a loaded expert leaves the candidate set first, whether it is the best or a cheaper alternative, so
      raising t under load never pours diverted traffic into an expert more loaded than the one it leaves;
      where the best and its alternative are both loaded, the less loaded one (by penalty) takes the request.

    `penalties`: shape (k,) or (n, k), quality points (inf: excluded); None for none. Shared by the serving
    router (:meth:`coe.routerdc.RouterDCModel.choose`) and ``scripts/simulate.py``.
    """
    q = np.asarray(quality, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(q),))[:, None]
    ok = near_best(q, threshold)
    if penalties is not None:
        qp = q - np.broadcast_to(np.asarray(penalties, dtype=np.float64), q.shape)
        best_p = np.where(ok, qp, -np.inf).max(axis=1, keepdims=True)
        ok &= np.isfinite(qp) & (qp >= best_p - t - 1e-12)
    price = np.where(ok, np.asarray(prices, dtype=np.float64)[None, :], np.inf)
    cheapest = ok & (price <= price.min(axis=1, keepdims=True))
    pick = np.where(cheapest, q, -np.inf).argmax(axis=1)
    return np.where(ok.any(axis=1), pick, q.argmax(axis=1))


def relievable(quality: np.ndarray, prices: np.ndarray, t_max: float) -> np.ndarray:
    """Per row: whether a cheaper expert lies within `t_max` of the best predicted one (a higher t can move it)."""
    q = np.asarray(quality, dtype=np.float64)
    p = np.asarray(prices, dtype=np.float64)
    best = q.argmax(axis=1)
    return (near_best(q, t_max) & (p[None, :] < p[best][:, None])).any(axis=1)


@dataclass(frozen=True)
class Overflow:
    """What the overflow rule needs for one batch: the experts' occupancy now and their capacity (requests; in
    the router's expert order), and per request the threshold it may use when its choice is full."""

    occupancy: np.ndarray  # (k,) requests in flight at each expert (as the router that routes them counts)
    capacity: np.ndarray  # (k,) requests an expert holds before a new one would wait beyond its capacity target
    t_spill: np.ndarray  # (n,) per request; at most its own threshold: no spill

    def __post_init__(self) -> None:
        if self.occupancy.shape != self.capacity.shape:
            raise ValueError("occupancy and capacity need one value per expert")


def spill_overflow(quality: np.ndarray, prices: np.ndarray, chosen: np.ndarray, eligible: np.ndarray,
                   overflow: Overflow, penalties: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fast half of load-aware routing: (new choices, spilled mask), requests taken in order.

    A request whose chosen expert is already full (occupancy >= capacity, counting the requests before it in the
    batch) goes at once to the cheapest expert that is not full within its ``t_spill`` of its best predicted
    quality (:func:`choose_within_threshold` with the full experts excluded). When every such expert is full too,
    it goes to the one of them that the request loads least relative to its capacity ((occupancy + 1) /
    capacity), if that is lower than its choice's: a burst beyond every candidate's capacity is spread in
    proportion to capacity instead of queueing at the first choice. Only `eligible` requests may move (not
    fallbacks, not requests with their own t); experts with an infinite penalty are never taken. The
    controller's t follows sustained load a few periods later; this moves the requests that arrive meanwhile
    and would otherwise only queue.
    """
    q = np.asarray(quality, dtype=np.float64)
    occ = np.asarray(overflow.occupancy, dtype=np.float64).copy()
    cap = np.asarray(overflow.capacity, dtype=np.float64)
    out = np.asarray(chosen).copy()
    spilled = np.zeros(len(out), dtype=bool)
    pen = None if penalties is None else np.broadcast_to(np.asarray(penalties, dtype=np.float64), q.shape)
    for i in range(len(out)):
        c = int(out[i])
        if eligible[i] and occ[c] >= cap[c]:
            full = np.where(occ >= cap, np.inf, 0.0)
            alt = int(choose_within_threshold(q[i:i + 1], prices, float(overflow.t_spill[i]),
                                              full[None, :] if pen is None else pen[i:i + 1] + full)[0])
            if alt != c and occ[alt] < cap[alt]:
                out[i], spilled[i] = alt, True
            else:
                within = near_best(q[i:i + 1], float(overflow.t_spill[i]))[0]
                if pen is not None:
                    within &= np.isfinite(pen[i])
                rel = np.where(within, (occ + 1.0) / np.maximum(cap, 1e-9), np.inf)
                least = int(rel.argmin())
                if rel[least] < (occ[c] + 1.0) / max(cap[c], 1e-9) - 1e-12:
                    out[i], spilled[i] = least, True
        occ[int(out[i])] += 1
    return out, spilled


class ServiceRate:
    """Busy seconds per completed request at one expert, as one router counts it (a sliding window).

    Busy time is time with at least one of the router's requests in flight there; divided by completions it
    is the inverse of the throughput the expert gives this router, whatever its replicas and batching. A new
    request that finds `n` in flight then expects to finish after about ``(n + 1) * seconds_per_request``;
    :func:`slo_capacity` turns that into the occupancy at which the expert's latency SLO is reached.
    """

    def __init__(self, window_s: float = 30.0, min_samples: int = 3) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._done: deque[tuple[float, float]] = deque()  # (finish time, busy seconds since the previous event)
        self._mark: float | None = None  # last start (from idle) or finish while busy
        self._busy = 0.0

    def started(self, now: float, in_flight_before: int) -> None:
        """A request was sent; `in_flight_before` = this router's requests at the expert before it."""
        if in_flight_before <= 0:
            self._mark = now

    def finished(self, now: float) -> None:
        """A request came back (success or error)."""
        busy = max(0.0, now - self._mark) if self._mark is not None else 0.0
        self._mark = now
        self._done.append((now, busy))
        self._busy += busy
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._busy -= self._done.popleft()[1]

    def seconds_per_request(self, now: float) -> float | None:
        """Busy seconds per completion over the window; None with fewer than `min_samples` completions."""
        self._expire(now)
        if len(self._done) < self.min_samples:
            return None
        return max(self._busy, 0.0) / len(self._done)


def slo_capacity(seconds_per_request: float | None, slo_s: float, load: float = 1.0) -> float:
    """Requests in flight at which a new one would finish after `load` x the SLO (inf when unmeasured)."""
    if seconds_per_request is None or seconds_per_request <= 0:
        return float("inf")
    return max(0.0, load * slo_s / seconds_per_request - 1.0)


def capacity_per_replica(expert: ExpertConfig) -> float:
    """Requests one replica of `expert` takes at load ratio 1.0: the autoscaler's ``target_ongoing_requests``.

    Not ``max_ongoing_requests``: that is admission (how much may wait inside a replica), while the target is
    the load at which the replica still meets its latency, with or without autoscaling.
    """
    return float(expert.autoscaling.target_ongoing_requests)


@dataclass(kw_only=True)
class ExpertLoad:
    """One expert's load at `timestamp` (unix s), as the controller sees it."""

    expert: str
    in_flight: int
    replicas: int
    capacity_per_replica: float
    slo: SLOConfig
    timestamp: float
    queued: int = 0
    ttft_p99_ms: float | None = None
    total_p99_ms: float | None = None

    def load_ratio(self) -> float:
        """max(occupancy, ttft_p99/SLO, total_p99/SLO); 1.0 = at capacity or at the SLO.

        Occupancy is (in_flight + queued) / (replicas * capacity_per_replica), with fewer than
        one replica counted as one (a scaled-to-zero expert is not infinitely loaded). Missing
        latencies (no samples) are ignored.
        """
        cap = max(1, self.replicas) * max(self.capacity_per_replica, 1e-9)
        ratios = [max(0, self.in_flight + self.queued) / cap]
        if self.ttft_p99_ms is not None:
            ratios.append(self.ttft_p99_ms / self.slo.ttft_ms)
        if self.total_p99_ms is not None:
            ratios.append(self.total_p99_ms / self.slo.total_ms)
        return max(ratios)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (what :meth:`coe.state.StateStore.put_loads` stores)."""
        return {
            "expert": self.expert,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "replicas": self.replicas,
            "capacity_per_replica": self.capacity_per_replica,
            "ttft_p99_ms": self.ttft_p99_ms,
            "total_p99_ms": self.total_p99_ms,
            "slo": {"ttft_ms": self.slo.ttft_ms, "total_ms": self.slo.total_ms},
            "timestamp": self.timestamp,
            "load_ratio": self.load_ratio(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertLoad:
        """Inverse of :meth:`to_dict` (the derived ``load_ratio`` is ignored)."""
        return cls(
            expert=str(d["expert"]),
            in_flight=int(d["in_flight"]),
            queued=int(d.get("queued", 0)),
            replicas=int(d["replicas"]),
            capacity_per_replica=float(d["capacity_per_replica"]),
            ttft_p99_ms=None if d.get("ttft_p99_ms") is None else float(d["ttft_p99_ms"]),
            total_p99_ms=None if d.get("total_p99_ms") is None else float(d["total_p99_ms"]),
            slo=SLOConfig(**d.get("slo", {})),
            timestamp=float(d["timestamp"]),
        )


@dataclass
class ThresholdState:
    """What the controller publishes and every ingress replica routes with."""

    t: float
    version: int = 0
    updated_at: float = 0.0
    load: float = 0.0
    reason: str = "initial"
    penalties: dict[str, float] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)  # per router: requests before an expert is full

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "t": self.t,
            "version": self.version,
            "updated_at": self.updated_at,
            "load": self.load,
            "reason": self.reason,
            "penalties": dict(self.penalties),
            "capacity": dict(self.capacity),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ThresholdState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            t=float(d["t"]),
            version=int(d.get("version", 0)),
            updated_at=float(d.get("updated_at", 0.0)),
            load=float(d.get("load", 0.0)),
            reason=str(d.get("reason", "")),
            penalties={str(k): float(v) for k, v in (d.get("penalties") or {}).items()},
            capacity={str(k): float(v) for k, v in (d.get("capacity") or {}).items()},
        )


def quality_given_up(scores: dict[str, float], chosen: str) -> float:
    """The quality debt of one routing decision: best predicted quality minus the chosen one's."""
    if not scores or chosen not in scores:
        return 0.0
    return max(0.0, max(scores.values()) - scores[chosen])


class ThresholdController:
    """Moves t between ``t_min`` and ``t_max`` with the cluster's load (call :meth:`step` every interval).

    The rule, per step with error ``e = load - target_load``:

    * deadband: ``|e| < deadband`` leaves t and the integral untouched (hysteresis); outside it the
      error is measured from the band's edge, so the command is continuous across it;
    * PI: command ``t_min + kp*e + ki*I`` with ``I`` the time integral of the error, clamped
      (anti-windup) so the command stays in ``[t_min, t_max]``, and re-synchronised to the output
      whenever a limiter below held t back (back-calculation), so no hidden windup builds up;
    * t only moves in the direction of the error (never falls while overloaded, never rises while
      underloaded), at most ``max_step`` per step, and never falls within ``cooldown_s`` of the last
      step that was overloaded (that rose, or was held at ``t_max``);
    * no load at all (signal 0) steers straight to the resting ``t_min``: after the cooldown t is
      back at ``t_min`` within ``ceil((t_max - t_min) / max_step)`` steps whatever the gains.

    Per-expert routing penalties are ``queue_penalty * max(0, load_ratio - target_load)``; among a request's
    candidates within t the router drops the experts whose penalised quality falls more than t below the best
    penalised one (see :func:`choose_within_threshold`).
    The load signal is the mean load ratio of the experts that a higher t relieves: callers pass each
    period's relievable demand share (requests whose best predicted expert is that one, whatever t chose, and
    that have a cheaper expert within ``t_max`` of it: :func:`relievable`), which the controller smooths over
    ``share_window_s`` and which weighs the mean; experts below ``min_share`` of it do not enter it.
    """

    def __init__(self, cfg: ControllerConfig, initial: ThresholdState | None = None) -> None:
        self.cfg = cfg
        t0 = cfg.t_min if initial is None else min(max(initial.t, cfg.t_min), cfg.t_max)
        self._state = ThresholdState(
            t=t0,
            version=0 if initial is None else initial.version,
            updated_at=0.0 if initial is None else initial.updated_at,
            load=0.0 if initial is None else initial.load,
            reason="initial" if initial is None else initial.reason,
            penalties={} if initial is None else dict(initial.penalties),
        )
        self._integral = self._track(t0, 0.0)
        self._last_now: float | None = None
        self._last_rise_at = -math.inf
        self._share: dict[str, float] = {}
        self._share_at = -math.inf

    @property
    def state(self) -> ThresholdState:
        """The last state produced (or the initial one)."""
        return self._state

    # -- signals ------------------------------------------------------------------------------

    @staticmethod
    def cluster_load(
        loads: dict[str, ExpertLoad], traffic_share: dict[str, float] | None = None, min_share: float = 0.0
    ) -> float:
        """The load that a higher t relieves: the mean load ratio of the experts with at least `min_share` (> 0)
        of `traffic_share` (the relievable demand), weighted by it; the largest ratio where no share is known.

        Experts that no movable request prefers do not enter the mean: they would dilute one overloaded premium
        expert by idle ones that t cannot help. A mean, not the max, over the rest: the most loaded of many
        experts sits near the target even at rest, which would keep t up for good.
        """
        if not loads:
            return 0.0
        ratios = {name: load.load_ratio() for name, load in loads.items()}
        if traffic_share:
            w = {n: float(traffic_share.get(n, 0.0)) for n in ratios}
            w = {n: v for n, v in w.items() if v >= max(min_share, 1e-12)}
            if w:
                return sum(ratios[n] * v for n, v in w.items()) / sum(w.values())
        return max(ratios.values())

    def smoothed_share(self) -> dict[str, float]:
        """The demand share as the controller weighs it (exponentially smoothed over ``share_window_s``)."""
        return dict(self._share)

    def _update_share(self, share: dict[str, float] | None, dt: float, now: float) -> None:
        if not share:  # no routed traffic this period: keep what recent traffic preferred, for a while
            if self._share and now - self._share_at > 3 * self.cfg.share_window_s:
                self._share = {}  # stale: every expert counts again
            return
        self._share_at = now
        if not self._share:
            self._share = {n: float(v) for n, v in share.items()}
            return
        a = 1.0 - math.exp(-max(dt, 0.0) / self.cfg.share_window_s)
        for n in set(self._share) | set(share):
            self._share[n] = (1 - a) * self._share.get(n, 0.0) + a * float(share.get(n, 0.0))

    def penalties(self, loads: dict[str, ExpertLoad]) -> dict[str, float]:
        """Routing penalties for the experts above target_load (the others are absent: 0)."""
        out: dict[str, float] = {}
        for name, load in loads.items():
            over = load.load_ratio() - self.cfg.target_load
            if over > 0 and self.cfg.queue_penalty > 0:
                # Not capped: penalties only rank the candidates within a request's t, so they never give up
                # more than t, and two loaded experts must stay comparable.
                out[name] = self.cfg.queue_penalty * over
        return out

    # -- control ------------------------------------------------------------------------------

    def _track(self, t: float, e: float) -> float:
        """The integral that makes the PI command equal `t` at error `e` (back-calculation)."""
        if self.cfg.ki <= 0:
            return 0.0
        return (t - self.cfg.t_min - self.cfg.kp * e) / self.cfg.ki

    def step(
        self,
        loads: dict[str, ExpertLoad],
        now: float,
        traffic_share: dict[str, float] | None = None,
        routers: int = 1,
    ) -> ThresholdState:
        """One control period: the new state (version + 1) from the experts' loads at `now`.

        `routers`: how many routers (ingress replicas) share the experts; each gets 1/routers of every expert's
        capacity for the overflow rule (:func:`spill_overflow`), since each counts only its own requests.
        """
        cfg = self.cfg
        dt = cfg.interval_s if self._last_now is None else now - self._last_now
        dt = min(max(dt, 0.0), 5 * cfg.interval_s)  # a missed period does not integrate a burst
        self._last_now = now
        self._update_share(traffic_share, dt, now)
        load = self.cluster_load(loads, self._share, cfg.min_share)
        penalties = self.penalties(loads)
        t = self._state.t
        err = load - cfg.target_load
        idle = load <= 0.0

        if not idle and abs(err) <= cfg.deadband:
            new_t, reason = t, f"hold: load {load:.2f} within deadband of target {cfg.target_load:.2f}"
        else:
            e = err if idle else err - math.copysign(cfg.deadband, err)
            if idle:
                command = cfg.t_min
            else:
                self._integral += e * dt
                if cfg.ki > 0:  # anti-windup: the command alone stays within [t_min, t_max]
                    lo, hi = self._track(cfg.t_min, e), self._track(cfg.t_max, e)
                    self._integral = min(max(self._integral, lo), hi)
                command = cfg.t_min + cfg.kp * e + cfg.ki * self._integral
            command = min(max(command, cfg.t_min), cfg.t_max)
            delta = max(command - t, 0.0) if e > 0 else min(command - t, 0.0)
            delta = min(max(delta, -cfg.max_step), cfg.max_step)
            cooling = delta < 0 and now - self._last_rise_at < cfg.cooldown_s
            if cooling:
                delta = 0.0
            new_t = min(max(t + delta, cfg.t_min), cfg.t_max)
            if e > 0:  # rising, or held at t_max by overload: the cooldown restarts
                self._last_rise_at = now
            self._integral = self._track(new_t, e)
            what = f"load {load:.2f} vs target {cfg.target_load:.2f}"
            if new_t > t:
                reason = f"rise: {what}"
            elif new_t < t:
                reason = f"{'idle' if idle else 'fall'}: {what}"
            elif cooling:
                reason = f"hold: cooldown after rise, {what}"
            elif e > 0 and t >= cfg.t_max:
                reason = f"hold: at t_max, {what}"
            elif e < 0 and t <= cfg.t_min:
                reason = f"hold: at t_min, {what}"
            else:
                reason = f"hold: integrating, {what}"

        self._state = ThresholdState(
            t=new_t,
            version=self._state.version + 1,
            updated_at=now,
            load=load,
            reason=reason,
            penalties=penalties,
            capacity=self.capacity(loads, routers),
        )
        return self._state

    def capacity(self, loads: dict[str, ExpertLoad], routers: int = 1) -> dict[str, float]:
        """Per router, the requests each expert holds before the overflow rule spills (empty: rule off)."""
        if self.cfg.overflow_load is None or not self.cfg.enabled:
            return {}
        share = self.cfg.overflow_load / max(1, routers)
        return {n: max(1, lo.replicas) * lo.capacity_per_replica * share for n, lo in loads.items()}


class Percentiles(NamedTuple):
    """A latency percentile over a window; None where the window has no sample."""

    ttft_ms: float | None
    total_ms: float | None


class LatencyWindow:
    """Recent request latencies: the last `window_s` seconds, at most `max_samples` of them."""

    def __init__(self, window_s: float = 30.0, max_samples: int = 2048) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError("window_s must be > 0 and max_samples >= 1")
        self.window_s = window_s
        self._samples: deque[tuple[float, float | None, float | None]] = deque(maxlen=max_samples)
        self._latest = -math.inf

    def add(self, now: float, ttft_ms: float | None, total_ms: float | None) -> None:
        """Record one finished request (ttft None for a request that produced no token)."""
        self._latest = max(self._latest, now)
        self._samples.append((now, ttft_ms, total_ms))
        self._expire(self._latest)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float, now: float | None = None) -> Percentiles:
        """Nearest-rank q-quantile (0 < q <= 1) of ttft and total over the window ending at `now`.

        `now` defaults to the latest sample's time; pass the current time so that a window with
        no recent traffic empties.
        """
        if now is not None:
            self._latest = max(self._latest, now)
        self._expire(self._latest)

        def rank(values: list[float]) -> float | None:
            return percentile(values, q * 100) if values else None

        return Percentiles(
            rank([s[1] for s in self._samples if s[1] is not None]),
            rank([s[2] for s in self._samples if s[2] is not None]),
        )

    def p99(self, now: float | None = None) -> Percentiles:
        """The 99th percentile (ttft_ms, total_ms)."""
        return self.percentile(0.99, now)

    def p50(self, now: float | None = None) -> Percentiles:
        """The median (ttft_ms, total_ms)."""
        return self.percentile(0.50, now)


def fallback_order(scores: dict[str, float], prices: dict[str, float], chosen: str, threshold: float,
                   fallback: str | None, allowed: frozenset[str] | set[str] | None = None) -> list[str]:
    """The experts to try, in order, when the call to `chosen` fails before anything reached the client.

    The others within `threshold` of the best predicted quality, in the routing rule's order (cheapest first,
    ties to the higher quality), then the fallback expert; only experts in `allowed` (None: all), never `chosen`.
    """
    if not scores:
        return [fallback] if fallback and fallback != chosen and (allowed is None or fallback in allowed) else []
    ok = [n for n in scores if n != chosen and (allowed is None or n in allowed)]
    best = max(scores[n] for n in ok) if ok else 0.0
    best = max(best, scores.get(chosen, best))
    near = [n for n in ok if scores[n] >= best - threshold - 1e-12]
    order = sorted(near, key=lambda n: (prices.get(n, 0.0), -scores[n]))
    if fallback and fallback != chosen and fallback not in order and (allowed is None or fallback in allowed):
        order.append(fallback)
    return order
