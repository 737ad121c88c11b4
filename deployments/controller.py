"""The load-aware controller: one replica that moves the cost/quality threshold t with the cluster's load.

Every ingress replica reports, once per control interval, its in-flight requests per expert, recent
latencies, routing counts (demand per best expert, and the part of it a higher t could move) and the counters
to persist (quality debt, routing decisions; usage is counted per request by the ingress, coe/auth.py). The
controller sums the reports, reads the experts' running replica counts from Serve, steps the
:class:`coe.control.ThresholdController` and publishes the new t (version, timestamp, per-expert penalties)
to the state store (Redis when COE_REDIS_URL is set, else in-process) and in its reply to each report.
If this replica dies, Serve restarts it and the ingress replicas keep routing with the last t they got;
on restart it resumes from the last t in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from coe.config import CoeConfig, RuntimeSettings
from coe.control import ExpertLoad, ThresholdController, ThresholdState, capacity_per_replica
from coe.state import make_state_store

logger = logging.getLogger("ray.serve")

REPLICA_REFRESH_S = 5.0  # how often running replica counts are read from Serve


class CoeController:
    """The singleton controller deployment (see module docstring)."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from ray.serve.metrics import Gauge

        self.config = CoeConfig.model_validate(config)
        self.cfg = self.config.controller
        self.experts = {e.name: e for e in self.config.experts}
        self.store = make_state_store(RuntimeSettings().redis_url, decision_stream_max=self.cfg.decision_stream_max)
        previous = await self.store.get_threshold()
        self.ctrl = ThresholdController(self.cfg, initial=previous)
        if previous is not None:
            logger.info("controller resumed from t=%.4f (version %d)", previous.t, previous.version)
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}
        self.replicas = {n: max(1, e.autoscaling.min_replicas) for n, e in self.experts.items()}
        self._replicas_at = 0.0
        self.loads: dict[str, ExpertLoad] = {}
        self.share: dict[str, float] = {}
        self._t_gauge = Gauge("coe_controller_threshold", description="Current cost/quality threshold t.")
        self._load_gauge = Gauge("coe_controller_load", description="Cluster load signal (1.0 = at capacity/SLO).")
        self._expert_gauge = Gauge("coe_expert_load_ratio", description="Per-expert load ratio.",
                                   tag_keys=("expert",))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    # ---------- called by ingress replicas ----------

    async def report(self, replica: str, report: dict[str, Any]) -> dict[str, Any]:
        """Take one ingress replica's report; return the current threshold state."""
        self.reports[replica] = (time.time(), report)
        await self.store.add_report(report.get("debt", {}), report.get("decisions", []))  # one Redis pipeline
        return self.ctrl.state.to_dict()

    async def get_state(self) -> dict[str, Any]:
        """t, its recent history, per-expert load and routing share, quality debt (for `coe status`)."""
        return {
            "threshold": self.ctrl.state.to_dict(),
            "enabled": self.cfg.enabled,
            "t_min": self.cfg.t_min,
            "t_max": self.cfg.t_max,
            "loads": {n: {**lo.to_dict(), "load_ratio": round(lo.load_ratio(), 4)} for n, lo in self.loads.items()},
            "routing_share": self.share,
            "quality_debt": await self.store.get_quality_debt(),
            "history": [s.to_dict() for s in await self.store.threshold_history(30)],
            "ingress_replicas": len(self.reports),
        }

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError(f"control loop stopped: {self._task.exception()!r}")

    # ---------- the loop ----------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            try:
                await self.step(time.time())
            except Exception:  # noqa: BLE001 - one bad period must not stop control
                logger.exception("controller step failed")

    async def _refresh_replicas(self, now: float) -> None:
        if now - self._replicas_at < REPLICA_REFRESH_S:
            return
        self._replicas_at = now

        def read() -> dict[str, int]:
            from ray import serve

            status = serve.status().applications.get(self.config.app_name)
            if status is None:
                return {}
            return {n: int(d.replica_states.get("RUNNING", 0)) for n, d in status.deployments.items()}

        try:
            running = await asyncio.get_running_loop().run_in_executor(None, read)
        except Exception as err:  # noqa: BLE001 - keep the last counts while Serve's controller is busy
            logger.debug("replica counts unavailable: %s", err)
            return
        for name in self.experts:
            if name in running:
                self.replicas[name] = max(1, running[name])

    async def step(self, now: float) -> ThresholdState:
        """One control period."""
        await self._refresh_replicas(now)
        fresh = [r for at, r in self.reports.values() if now - at <= 3 * self.cfg.interval_s]
        routed: dict[str, float] = {n: 0.0 for n in self.experts}
        relievable: dict[str, float] = {n: 0.0 for n in self.experts}
        loads: dict[str, ExpertLoad] = {}
        for name, expert in self.experts.items():
            in_flight = sum(int(r.get("in_flight", {}).get(name, 0)) for r in fresh)
            ttft = [r["ttft_p99_ms"][name] for r in fresh if r.get("ttft_p99_ms", {}).get(name) is not None]
            total = [r["total_p99_ms"][name] for r in fresh if r.get("total_p99_ms", {}).get(name) is not None]
            routed[name] = float(sum(r.get("routed", {}).get(name, 0) for r in fresh))
            relievable[name] = float(sum(r.get("relievable", {}).get(name, 0) for r in fresh))
            loads[name] = ExpertLoad(expert=name, in_flight=in_flight, replicas=self.replicas[name],
                                     capacity_per_replica=capacity_per_replica(expert), slo=expert.slo,
                                     timestamp=now, ttft_p99_ms=max(ttft) if ttft else None,
                                     total_p99_ms=max(total) if total else None)
        n_routed = sum(routed.values())
        self.share = {n: round(c / n_routed, 4) for n, c in routed.items()} if n_routed else {}
        self.loads = loads
        if self.cfg.enabled:
            n_rel = sum(relievable.values())
            rel_share = {n: c / n_rel for n, c in relievable.items()} if n_rel else None
            state = self.ctrl.step(loads, now, rel_share, routers=max(1, len(fresh)))
        else:
            prev = self.ctrl.state
            state = ThresholdState(t=self.cfg.t_min, version=prev.version + 1, updated_at=now, load=0.0,
                                   reason="controller disabled", penalties={})
        await self.store.publish_threshold(state)
        await self.store.put_loads({n: lo.to_dict() for n, lo in loads.items()})
        self._t_gauge.set(state.t)
        self._load_gauge.set(state.load)
        for n, lo in loads.items():
            self._expert_gauge.set(lo.load_ratio(), tags={"expert": n})
        return state

    async def __del__(self) -> None:
        self._task.cancel()
        await self.store.close()
