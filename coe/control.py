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


def choose_within_threshold(quality: np.ndarray, prices: np.ndarray, threshold: float | np.ndarray,
                            penalties: np.ndarray | None = None) -> np.ndarray:
    """The routing rule (HybridLLM's threshold, made load-aware): one expert index per row of `quality`.

    Candidates are the experts whose quality minus their load penalty is within `threshold` (scalar or one
    per row) of the row's best *unpenalised* quality; the cheapest candidate wins (ties: higher quality).
    With no candidate (the best expert is loaded beyond the request's t) the best expert is kept. So:

    * no request ever gets an expert more than its own t below its best (t = 0 always gets the best);
    * a loaded expert leaves the candidate set first, whether it is the best or a cheaper alternative,
      so raising t under load never pours diverted traffic into an expert that is itself overloaded.

    `penalties`: shape (k,) or (n, k), quality points; None for none. Shared by the serving router
    (:meth:`coe.routerdc.RouterDCModel.choose`) and ``scripts/simulate.py``.
    """
    q = np.asarray(quality, dtype=np.float64)
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(q),))[:, None]
    q_used = q if penalties is None else q - np.broadcast_to(np.asarray(penalties, dtype=np.float64), q.shape)
    ok = q_used >= q.max(axis=1, keepdims=True) - t - 1e-12
    price = np.where(ok, np.asarray(prices, dtype=np.float64)[None, :], np.inf)
    cheapest = ok & (price <= price.min(axis=1, keepdims=True))
    pick = np.where(cheapest, q, -np.inf).argmax(axis=1)
    return np.where(ok.any(axis=1), pick, q.argmax(axis=1))


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "t": self.t,
            "version": self.version,
            "updated_at": self.updated_at,
            "load": self.load,
            "reason": self.reason,
            "penalties": dict(self.penalties),
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

    Per-expert routing penalties are ``min(queue_penalty * max(0, load_ratio - target_load), t_max)``; the
    router drops an expert from a request's cheaper alternatives once its penalty exceeds that request's slack
    (see :func:`choose_within_threshold`).
    The cluster load weighs experts by ``traffic_share``; callers pass the demand share (requests whose
    best predicted expert is that one), since that is the load a higher t relieves.
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

    @property
    def state(self) -> ThresholdState:
        """The last state produced (or the initial one)."""
        return self._state

    # -- signals ------------------------------------------------------------------------------

    @staticmethod
    def cluster_load(
        loads: dict[str, ExpertLoad], traffic_share: dict[str, float] | None = None
    ) -> float:
        """Traffic-weighted mean of the experts' load ratios; the max where no share is given."""
        if not loads:
            return 0.0
        ratios = {name: load.load_ratio() for name, load in loads.items()}
        if traffic_share:
            weights = {n: max(0.0, float(traffic_share.get(n, 0.0))) for n in ratios}
            total = sum(weights.values())
            if total > 0:
                return sum(ratios[n] * w for n, w in weights.items()) / total
        return max(ratios.values())

    def penalties(self, loads: dict[str, ExpertLoad]) -> dict[str, float]:
        """Routing penalties for the experts above target_load (the others are absent: 0)."""
        out: dict[str, float] = {}
        for name, load in loads.items():
            over = load.load_ratio() - self.cfg.target_load
            if over > 0 and self.cfg.queue_penalty > 0:
                # Capped at t_max: a penalty gives up predicted quality just as t does, and never more.
                out[name] = min(self.cfg.queue_penalty * over, self.cfg.t_max)
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
    ) -> ThresholdState:
        """One control period: the new state (version + 1) from the experts' loads at `now`."""
        cfg = self.cfg
        load = self.cluster_load(loads, traffic_share)
        penalties = self.penalties(loads)
        dt = cfg.interval_s if self._last_now is None else now - self._last_now
        dt = min(max(dt, 0.0), 5 * cfg.interval_s)  # a missed period does not integrate a burst
        self._last_now = now
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
        )
        return self._state


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
            if not values:
                return None
            values.sort()
            return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

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
