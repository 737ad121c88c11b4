"""One ingress replica's load tracking and its routing policy under load, without Ray (unit-testable).

The ingress (deployments/ingress.py) is the HTTP layer; it asks :class:`IngressLoad`:

* what t a request gets (the controller's, never below the resting t), the load penalties, and the overflow
  rule's inputs (this replica's in-flight requests against its share of each expert's capacity);
* which expert a team may get (:meth:`IngressLoad.restrict`) and which experts to try when a call fails
  (:meth:`IngressLoad.attempt_order`);
* to count each decision (demand per best expert, what a higher t could move, quality given up) and each call
  (in flight, latency, service pace), and to build the report it sends the controller once per interval.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from coe.config import CoeConfig
from coe.control import (
    LatencyWindow,
    Overflow,
    ServiceRate,
    ThresholdState,
    capacity_per_replica,
    choose_within_threshold,
    fallback_order,
    quality_given_up,
    relievable,
    slo_capacity,
)
from coe.protocol import CoeOptions
from coe.routing import RoutingDecision

Clock = Callable[[], float]


@dataclass
class Accounted:
    """What counting one decision produced (the ingress turns it into metrics)."""

    record: dict[str, Any]  # the decision-log record (mutable until the report is sent)
    debt: float  # predicted quality the load controller's t gave up (0 if none)


class IngressLoad:
    """Load state and load-aware policy of one ingress replica (see the module docstring)."""

    def __init__(self, config: CoeConfig, router_experts: list[str], resting_threshold: float,
                 uses_threshold: bool, clock: Clock = time.time) -> None:
        self.config = config
        self.experts = {e.name: e for e in config.experts}
        self.names = list(router_experts)  # the router's expert order
        self.prices = np.array([self.experts[n].price_per_1k_tokens for n in self.names], dtype=np.float64)
        self.resting_threshold = resting_threshold
        self.uses_threshold = uses_threshold
        self._clock = clock
        self.in_flight: dict[str, int] = defaultdict(int)
        self.latency = {name: LatencyWindow(window_s=10.0) for name in self.experts}
        self.service = {name: ServiceRate() for name in self.experts}
        self.routed: dict[str, int] = defaultdict(int)
        self.relievable: dict[str, int] = defaultdict(int)  # demand a higher t could move (see coe.control)
        self.pending_debt: dict[str, list[float]] = defaultdict(list)
        self.pending_decisions: deque[dict[str, Any]] = deque(maxlen=2000)
        self.state: ThresholdState | None = None

    # -- the threshold and the load penalties ----------------------------------------------------------------

    def current_threshold(self) -> float:
        """The threshold for requests that do not set their own (the load controller moves it)."""
        if self.state is None or not self.config.controller.enabled:
            return self.resting_threshold
        return max(self.state.t, self.resting_threshold)

    def routing_penalties(self) -> dict[str, float] | None:
        """Per-expert quality penalties from the load controller (None: no load information)."""
        if self.state is None or not self.config.controller.enabled:
            return None
        return dict(self.state.penalties) or None

    def spill_threshold(self, threshold: float, options: CoeOptions | None, own_t: bool) -> float:
        """The t a request may use when its expert is full (overflow rule): t_max, within the request's cap.
        Requests with their own t, or with the rule or the controller off, never spill (returns `threshold`)."""
        cc = self.config.controller
        if own_t or not cc.enabled or cc.overflow_load is None or not self.uses_threshold:
            return threshold
        cap = options.max_quality_threshold if options is not None else None
        return max(threshold, cc.t_max if cap is None else min(cc.t_max, cap))

    def overflow(self, t_spill: list[float]) -> Overflow | None:
        """The overflow rule's inputs for one batch: this replica's in-flight requests per expert against its
        share of each expert's capacity (from the controller; before its first reply, from the config)."""
        cc = self.config.controller
        if cc.overflow_load is None or not cc.enabled:
            return None
        published = self.state.capacity if self.state is not None else {}
        now = self._clock()
        # Full at the capacity target, or sooner where the expert's measured pace (busy seconds per request it
        # returns to this replica) says a new request would finish beyond overflow_load x its SLO.
        capacity = [min(published.get(n, max(1, self.experts[n].autoscaling.min_replicas)
                                      * capacity_per_replica(self.experts[n]) * cc.overflow_load),
                        slo_capacity(self.service[n].seconds_per_request(now),
                                     self.experts[n].slo.total_ms / 1000.0, cc.overflow_load))
                    for n in self.names]
        return Overflow(occupancy=np.array([self.in_flight.get(n, 0) for n in self.names], dtype=np.float64),
                        capacity=np.array(capacity, dtype=np.float64), t_spill=np.array(t_spill, dtype=np.float64))

    # -- which expert -----------------------------------------------------------------------------------------

    def restrict(self, decision: RoutingDecision, allowed: frozenset[str] | None) -> RoutingDecision:
        """Keep a team within its allowed experts: the cheapest allowed expert within t of the best allowed one
        (load penalties applied); reason ``team_restricted(<expert the router chose>):<its reason>``."""
        if allowed is None or decision.expert in allowed:
            return decision
        mask = np.array([n in allowed for n in self.names])
        q = np.array([[decision.scores.get(n, -np.inf) for n in self.names]], dtype=np.float64)
        q = np.where(mask[None, :], q, -np.inf)
        pen = self.routing_penalties()
        penalties = None if not pen else np.array([[pen.get(n, 0.0) for n in self.names]])
        if not mask.any():
            raise ValueError("the team may use none of the router's experts")
        if not np.isfinite(q[0][mask]).any():  # no allowed expert has a score (degraded router): the cheapest
            k = int(np.where(mask, self.prices, np.inf).argmin())
        else:
            k = int(choose_within_threshold(q, self.prices, decision.threshold or 0.0, penalties)[0])
            if not mask[k]:  # every allowed expert was excluded by load: the best allowed one
                k = int(np.where(mask, q[0], -np.inf).argmax())
        decision.reason = f"team_restricted({decision.expert}):{decision.reason}"
        decision.expert = self.names[k]
        return decision

    def attempt_order(self, decision: RoutingDecision, fallback: str | None,
                      allowed: frozenset[str] | None) -> list[str]:
        """The experts to try after the chosen one fails (:func:`coe.control.fallback_order`)."""
        return fallback_order(decision.scores, {n: e.price_per_1k_tokens for n, e in self.experts.items()},
                              decision.expert, decision.threshold or 0.0, fallback, allowed)

    # -- counting ---------------------------------------------------------------------------------------------

    def account_decision(self, request_id: str, decision: RoutingDecision, query: str) -> Accounted:
        """Count one routed request: demand (per best expert), what a higher t could move, quality given up."""
        # Demand, not placement: the controller weighs each expert by the requests it is best for.
        best = decision.extra.get("best_expert", decision.expert)
        self.routed[best] += 1
        if self._relievable(decision.scores):
            self.relievable[best] += 1
        debt = 0.0
        if best != decision.expert and decision.expert in decision.scores and best in decision.scores \
                and not decision.reason.startswith(("fallback:", "team_restricted")) \
                and not decision.extra.get("own_threshold") and "router_choice" not in decision.extra:
            # (router_choice: a conversation kept on its expert; that quality is given up for its cache, not load)
            debt = quality_given_up({best: decision.scores[best], decision.expert: decision.scores[decision.expert]},
                                    decision.expert)
            if debt > 0:
                self.pending_debt[decision.expert].append(debt)
        record = {"request_id": request_id, "expert": decision.expert, "scores": decision.scores,
                  "t": decision.threshold, "reason": decision.reason,
                  "latency_ms": round(decision.extra.get("route_ms", 0.0), 3), "ts": self._clock()}
        if self.config.controller.record_prompts:
            record["prompt"] = query
        self.pending_decisions.append(record)
        return Accounted(record=record, debt=max(0.0, debt))

    def _relievable(self, scores: dict[str, float]) -> bool:
        """Whether a higher t could move this request (:func:`coe.control.relievable`)."""
        names = [n for n in scores if n in self.experts]
        if not names:
            return False
        return bool(relievable(np.array([[scores[n] for n in names]]),
                               np.array([self.experts[n].price_per_1k_tokens for n in names]),
                               self.config.controller.t_max)[0])

    def started(self, name: str) -> float:
        """A call to expert `name` starts; returns its start time."""
        now = self._clock()
        self.service[name].started(now, self.in_flight[name])
        self.in_flight[name] += 1
        return now

    def finished(self, name: str, t0: float, ttft_ms: float | None = None, ok: bool = True) -> None:
        """The call started at `t0` ended (its latency counts only when it answered)."""
        now = self._clock()
        self.in_flight[name] -= 1
        self.service[name].finished(now)
        if ok:
            self.latency[name].add(now, ttft_ms, (now - t0) * 1e3)

    # -- the controller ---------------------------------------------------------------------------------------

    def take_report(self) -> dict[str, Any]:
        """This interval's report for the controller; the counters start again from zero."""
        now = self._clock()
        report = {
            "in_flight": dict(self.in_flight),
            "ttft_p99_ms": {n: w.p99(now).ttft_ms for n, w in self.latency.items()},
            "total_p99_ms": {n: w.p99(now).total_ms for n, w in self.latency.items()},
            "routed": dict(self.routed),
            "relievable": dict(self.relievable),
            "debt": dict(self.pending_debt),
            "decisions": list(self.pending_decisions),
        }
        self.routed.clear()
        self.relievable.clear()
        self.pending_debt.clear()
        self.pending_decisions.clear()
        return report
