#!/usr/bin/env python
"""Discrete-event simulation of the load-aware threshold controller (coe/control.py) at scale.

Drives the product's own :class:`coe.control.ThresholdController` (not a copy) against simulated experts:

* experts: price, service time (lognormal around a per-expert median, or measured samples from
  ``--service-times FILE``), ``capacity_per_replica`` concurrent slots per replica, FIFO queue when all
  slots are busy, and an autoscaler (every ``--autoscale-period`` s it targets
  ``ceil((running + queued) / target_ongoing)`` replicas within [min, max]; new replicas serve only after
  ``--autoscale-delay`` s of cold start; scale-down after ``--downscale-cooldown`` s below target);
* requests: open-loop Poisson arrivals (baseline, a burst, baseline again), each with a predicted
  quality per expert (query domains with a best specialist and a few cheaper near-equal alternatives);
* routing: the router's own rule (:func:`coe.control.choose_within_threshold`): cheapest expert whose
  penalised quality is within t of the best, loaded experts dropping out of the candidates first; in the
  adaptive run also the ingress's overflow rule (:func:`coe.control.spill_overflow`): a request whose expert
  is full (busy + queued >= replicas x capacity) goes at once to the cheapest non-full expert within t_max;
* control: every ``interval_s`` the experts' :class:`coe.control.ExpertLoad` go into
  ``controller.step``; the new t and penalties apply to the following arrivals.

Two runs share the same arrivals: ``fixed`` (t = t_min, no controller) and ``adaptive``. Writes a table to
stdout and ``simulate.csv`` (per-second rows) + ``simulate.png`` to ``--out``.

    .venv/bin/python scripts/simulate.py [--experts 20 --base-rps 400 --burst-rps 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import heapq
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from coe.config import (
    AutoscalingConfig,
    ControllerConfig,
    ExpertConfig,
    ModelSource,
    ResourcesConfig,
    SLOConfig,
    load_config,
)
from coe.control import (
    ExpertLoad,
    LatencyWindow,
    Overflow,
    ThresholdController,
    capacity_per_replica,
    choose_within_threshold,
    relievable,
    spill_overflow,
)
from coe.stats import percentile


@dataclass
class SimExpert:
    """One simulated expert: its coe config (capacity, SLO, replica bounds) and service-time model."""

    config: ExpertConfig
    price: float  # USD per request
    median_ms: float
    mean_ms: float
    samples_ms: np.ndarray | None = None  # measured service times (sorted); None: lognormal

    @property
    def name(self) -> str:
        """The expert's name."""
        return self.config.name


@dataclass
class Scenario:
    """Everything a run needs besides the controller: experts, load profile, autoscaler, quality model."""

    n_experts: int = 20
    base_rps: float = 400.0
    burst_rps: float = 1000.0
    burst_start: float = 60.0
    burst_end: float = 180.0
    duration: float = 300.0
    seed: int = 0
    service_times: dict[str, list[float]] | None = None  # measured ms samples per expert
    median_min_ms: float = 150.0
    median_max_ms: float = 3000.0
    sigma: float = 0.4  # lognormal shape of the service time
    price_min: float = 0.0002  # USD per request of the cheapest expert
    price_max: float = 0.02
    target_ongoing: float = 8.0  # capacity_per_replica: concurrent requests one replica serves
    slo_factor: float = 4.0  # SLO total_ms = slo_factor * median service time
    provision_load: float = 0.6  # min replicas = baseline concurrency / (capacity * provision_load)
    min_replicas_floor: int = 1  # no expert runs fewer replicas than this
    max_replicas_factor: float = 3.0  # max replicas = ceil(min replicas * factor)
    autoscale_period: float = 5.0
    autoscale_delay: float = 30.0
    downscale_cooldown: float = 60.0
    latency_window_s: float = 30.0
    quality_noise: float = 0.02
    max_drain_s: float = 120.0  # after `duration`, keep going at most this long to drain queues


@dataclass
class Traffic:
    """The arrivals both runs share: time, quality vector and service-time draws per request."""

    times: np.ndarray  # (n,) seconds, sorted
    quality: np.ndarray  # (n, K) predicted (= true) quality
    z: np.ndarray  # (n,) standard normal draws (lognormal service time)
    u: np.ndarray  # (n,) uniform draws (measured service-time samples)


@dataclass
class RunResult:
    """One run: per-tick rows and per-request outcomes."""

    name: str
    rows: list[dict[str, Any]]
    chosen: np.ndarray  # (n,) expert index
    latency_ms: np.ndarray  # (n,) NaN where never completed
    done_at: np.ndarray  # (n,) completion time, NaN where never completed
    given_up: np.ndarray  # (n,) max(q) - q[chosen]
    over_slo: np.ndarray  # (n,) bool
    price: np.ndarray  # (n,) USD
    tick_t: list[tuple[float, float]] = field(default_factory=list)  # (time, t) per control step
    wall_s: float = 0.0
    spilled: int = 0  # requests the overflow rule moved off a full expert


# -- building the scenario ----------------------------------------------------------------------------


def build_experts(scn: Scenario) -> list[SimExpert]:
    """The experts, cheapest (and fastest, weakest) first; replica bounds are filled in by provision()."""
    if scn.service_times:
        named = sorted(scn.service_times.items(), key=lambda kv: float(np.median(kv[1])))
        names = [n for n, _ in named]
        samples = [np.sort(np.asarray(v, dtype=np.float64)) for _, v in named]
        if any(len(s) == 0 or (s <= 0).any() for s in samples):
            raise ValueError("--service-times: every expert needs positive ms samples")
        medians = [float(np.median(s)) for s in samples]
        means = [float(s.mean()) for s in samples]
    else:
        names = [f"sim-{k:02d}" for k in range(scn.n_experts)]
        medians = np.geomspace(scn.median_min_ms, scn.median_max_ms, scn.n_experts).tolist()
        means = [m * math.exp(scn.sigma**2 / 2) for m in medians]
        samples = [None] * scn.n_experts
    n = len(names)
    if n < 2:
        raise ValueError("need at least 2 experts")
    prices = np.geomspace(scn.price_min, scn.price_max, n).tolist()
    out = []
    for k, name in enumerate(names):
        cfg = ExpertConfig(
            name=name,
            description=f"simulated expert {k}",
            domains=["sim"],
            engine="vllm",
            source=ModelSource(hub=f"sim/{name}"),
            resources=ResourcesConfig(num_gpus=1.0),
            price_per_1k_tokens=prices[k],  # one simulated request = 1k tokens
            max_ongoing_requests=max(1, math.ceil(scn.target_ongoing)),
            autoscaling=AutoscalingConfig(target_ongoing_requests=scn.target_ongoing),
            slo=SLOConfig(total_ms=scn.slo_factor * medians[k]),
        )
        out.append(SimExpert(cfg, prices[k], medians[k], means[k], samples[k]))
    return out


def quality_model(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-domain mean quality (D, n) and domain weights (D,).

    Each domain has a best specialist among the pricier half of the experts and 2-3 cheaper alternatives
    0.02-0.15 below it; every other expert is 0.25-0.5 below the best.
    """
    d_count = max(2, n // 2)
    means = np.empty((d_count, n))
    for d in range(d_count):
        spec = n - 1 - (d % max(1, n - n // 2))
        best = rng.uniform(0.7, 0.9)
        means[d] = best - rng.uniform(0.25, 0.5, n)
        means[d, spec] = best
        if spec > 0:
            alts = rng.choice(spec, size=min(spec, int(rng.integers(2, 4))), replace=False)
            means[d, alts] = best - rng.uniform(0.02, 0.15, len(alts))
    weights = rng.dirichlet(np.full(d_count, 2.0))
    return means, weights


def rate_at(scn: Scenario, t: np.ndarray) -> np.ndarray:
    """Requests/s at time t: baseline, burst in [burst_start, burst_end), baseline."""
    return np.where((t >= scn.burst_start) & (t < scn.burst_end), scn.burst_rps, scn.base_rps)


def sample_queries(scn: Scenario, n_experts: int, count: int, rng: np.random.Generator,
                   means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`count` quality vectors (count, n_experts), float32."""
    dom = rng.choice(len(weights), size=count, p=weights)
    q = means[dom] + rng.normal(0.0, scn.quality_noise, (count, n_experts))
    return np.clip(q, 0.0, 1.0).astype(np.float32)


def make_traffic(scn: Scenario, n_experts: int) -> tuple[Traffic, np.ndarray, np.ndarray]:
    """Poisson arrivals (piecewise-constant rate per 1 s bucket) with their quality vectors and draws."""
    rng = np.random.default_rng(scn.seed)
    means, weights = quality_model(n_experts, rng)
    edges = np.arange(0.0, scn.duration, 1.0)
    width = np.minimum(1.0, scn.duration - edges)
    counts = rng.poisson(rate_at(scn, edges + width / 2) * width)
    times = np.repeat(edges, counts) + rng.uniform(0.0, 1.0, counts.sum()) * np.repeat(width, counts)
    times.sort()
    n = len(times)
    traffic = Traffic(times=times, quality=sample_queries(scn, n_experts, n, rng, means, weights),
                      z=rng.standard_normal(n).astype(np.float32), u=rng.uniform(size=n).astype(np.float32))
    return traffic, means, weights


def route(q: np.ndarray, prices: np.ndarray, t: float, penalty: np.ndarray | None) -> np.ndarray:
    """The router's rule: the product's own :func:`coe.control.choose_within_threshold` (no artifact needed)."""
    return choose_within_threshold(q, prices, t, penalty)


def provision(scn: Scenario, experts: list[SimExpert], means: np.ndarray, weights: np.ndarray,
              t_min: float) -> list[SimExpert]:
    """Experts with min/initial replicas sized for the baseline at t_min and max = factor * min."""
    rng = np.random.default_rng(scn.seed + 1)
    prices = np.array([e.price for e in experts])
    q = sample_queries(scn, len(experts), 20_000, rng, means, weights)
    share = np.bincount(route(q, prices, t_min, None), minlength=len(experts)) / len(q)
    out = []
    for e, s in zip(experts, share):
        cap = capacity_per_replica(e.config)
        conc = scn.base_rps * s * e.mean_ms / 1000.0
        lo = max(1, scn.min_replicas_floor, math.ceil(conc / (cap * scn.provision_load)))
        hi = max(lo + 1, math.ceil(lo * scn.max_replicas_factor))
        auto = e.config.autoscaling.model_copy(
            update={"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                    "downscale_delay_s": scn.downscale_cooldown})
        out.append(replace(e, config=e.config.model_copy(update={"autoscaling": auto})))
    return out


# -- the event loop -----------------------------------------------------------------------------------


def simulate_run(name: str, scn: Scenario, experts: list[SimExpert], traffic: Traffic,
                 ctrl_cfg: ControllerConfig, adaptive: bool,
                 on_tick: Callable[[float], None] | None = None) -> RunResult:
    """One run over the shared traffic; `adaptive` False holds t at t_min with no penalties."""
    wall0 = time.perf_counter()
    n_exp, n_req = len(experts), len(traffic.times)
    names = [e.name for e in experts]
    prices = np.array([e.price for e in experts])
    cap = [capacity_per_replica(e.config) for e in experts]
    slots_per = [max(1, int(c)) for c in cap]
    slo = [e.config.slo for e in experts]
    auto = [e.config.autoscaling for e in experts]
    running = [a.initial_replicas or a.min_replicas for a in auto]
    pending = [0] * n_exp  # replicas starting
    cancelled = [0] * n_exp  # pending READY events to ignore
    below_since: list[float | None] = [None] * n_exp
    busy = [0] * n_exp
    queues: list[deque[int]] = [deque() for _ in range(n_exp)]
    windows = [LatencyWindow(window_s=scn.latency_window_s) for _ in range(n_exp)]
    controller = ThresholdController(ctrl_cfg) if adaptive else None
    dt = ctrl_cfg.interval_s

    arr = traffic.times.tolist()
    base_ms = [0.0] * n_req
    lat_ms = [math.nan] * n_req
    done_at = [math.nan] * n_req
    chosen = np.full(n_req, -1, dtype=np.int64)
    heap: list[tuple[float, int, int, int, int]] = []  # (time, seq, kind 0=done 1=ready, expert, request)
    seq = itertools.count()
    rows: list[dict[str, Any]] = []
    tick_t: list[tuple[float, float]] = []
    share: dict[str, float] | None = None
    next_scale = 0.0
    n_spilled = 0

    def start(k: int, i: int, now: float) -> None:
        busy[k] += 1
        heapq.heappush(heap, (now + base_ms[i] / 1000.0, next(seq), 0, k, i))

    def autoscale(now: float) -> None:
        for k in range(n_exp):
            a = auto[k]
            desired = min(a.max_replicas, max(a.min_replicas, math.ceil((busy[k] + len(queues[k])) / cap[k])))
            have = running[k] + pending[k]
            if desired > have:
                below_since[k] = None
                for _ in range(desired - have):
                    heapq.heappush(heap, (now + scn.autoscale_delay, next(seq), 1, k, -1))
                pending[k] += desired - have
            elif desired < have:
                if below_since[k] is None:
                    below_since[k] = now
                elif now - below_since[k] >= scn.downscale_cooldown:
                    drop = have - desired
                    c = min(drop, pending[k])
                    pending[k] -= c
                    cancelled[k] += c
                    running[k] -= drop - c
                    below_since[k] = None
            else:
                below_since[k] = None

    tick = 0
    lo = 0
    while True:
        now = tick * dt
        in_system = sum(busy) + sum(len(q) for q in queues)
        if (now >= scn.duration and in_system == 0) or now >= scn.duration + scn.max_drain_s:
            break
        loads = {}
        for k in range(n_exp):
            p99 = windows[k].p99(now).total_ms
            loads[names[k]] = ExpertLoad(
                expert=names[k], in_flight=busy[k], queued=len(queues[k]), replicas=running[k],
                capacity_per_replica=cap[k], slo=slo[k], timestamp=now, total_p99_ms=p99)
        if controller is not None and now < scn.duration:  # no control while only draining
            state = controller.step(loads, now, share)
            t, penalties, load = state.t, state.penalties, state.load
        elif controller is not None:
            t, penalties, load = controller.state.t, controller.state.penalties, controller.state.load
        else:
            t, penalties = ctrl_cfg.t_min, {}
            load = ThresholdController.cluster_load(loads, share, ctrl_cfg.min_share)
        tick_t.append((now, t))
        if now + 1e-9 >= next_scale:
            autoscale(now)
            next_scale += scn.autoscale_period

        end = now + dt
        hi = int(np.searchsorted(traffic.times, end, side="left"))
        pen_vec = np.array([penalties.get(x, 0.0) for x in names]) if penalties else None
        ch = route(traffic.quality[lo:hi], prices, t, pen_vec)
        if controller is not None and controller.state.capacity and hi > lo:
            # The ingress's overflow rule, on the occupancy at the tick (requests of this tick counted in order).
            ov = Overflow(occupancy=np.array([busy[k] + len(queues[k]) for k in range(n_exp)], dtype=np.float64),
                          capacity=np.array([controller.state.capacity[x] for x in names]),
                          t_spill=np.full(hi - lo, max(t, ctrl_cfg.t_max)))
            ch, spilled = spill_overflow(traffic.quality[lo:hi], prices, ch, np.ones(hi - lo, dtype=bool), ov,
                                         pen_vec)
            n_spilled += int(spilled.sum())
        chosen[lo:hi] = ch
        if lo < hi:
            # The controller watches the experts a higher t relieves: each request's best predicted expert where
            # a cheaper one is within t_max (as the ingress reports it), not where traffic went.
            qs = traffic.quality[lo:hi]
            movable = relievable(qs, prices, ctrl_cfg.t_max)
            counts = np.bincount(qs.argmax(1)[movable], minlength=n_exp)
            share = {names[k]: float(counts[k]) / movable.sum() for k in range(n_exp)} if movable.any() else None
            med = np.array([e.median_ms for e in experts])[ch]
            svc = med * np.exp(scn.sigma * traffic.z[lo:hi])
            for k, e in enumerate(experts):
                if e.samples_ms is not None:
                    m = ch == k
                    idx = (traffic.u[lo:hi][m] * len(e.samples_ms)).astype(np.int64)
                    svc[m] = e.samples_ms[np.minimum(idx, len(e.samples_ms) - 1)]
            base_ms[lo:hi] = svc.tolist()
        else:
            share = None
        rows.append({
            "time_s": now, "t": t, "cluster_load": load,
            "max_penalty": max(penalties.values(), default=0.0),
            "replicas": sum(running), "pending_replicas": sum(pending),
            "queued": sum(len(q) for q in queues), "in_service": sum(busy),
        })

        ch_list = ch.tolist()
        j, i = 0, lo
        inf = math.inf
        while True:
            ta = arr[i] if i < hi else inf
            th = heap[0][0] if heap else inf
            if ta >= end and th >= end:
                break
            if ta <= th:
                k = ch_list[j]
                if busy[k] < running[k] * slots_per[k] and not queues[k]:
                    start(k, i, ta)
                else:
                    queues[k].append(i)
                i += 1
                j += 1
                continue
            tn, _, kind, k, r = heapq.heappop(heap)
            if kind == 0:
                busy[k] -= 1
                lat = (tn - arr[r]) * 1000.0
                lat_ms[r] = lat
                done_at[r] = tn
                windows[k].add(tn, None, lat)
            elif cancelled[k]:
                cancelled[k] -= 1
                continue
            else:
                pending[k] -= 1
                running[k] += 1
            q = queues[k]
            limit = running[k] * slots_per[k]
            while q and busy[k] < limit:
                start(k, q.popleft(), tn)
        lo = hi
        tick += 1
        if on_tick is not None:
            on_tick(now)

    lat = np.array(lat_ms)
    slo_ms = np.array([s.total_ms for s in slo])
    qmax = traffic.quality.max(axis=1)
    qch = traffic.quality[np.arange(n_req), chosen]
    res = RunResult(
        name=name, rows=rows, chosen=chosen, latency_ms=lat, done_at=np.array(done_at),
        given_up=np.maximum(0.0, qmax - qch).astype(np.float64),
        over_slo=~(lat <= slo_ms[chosen]), price=prices[chosen], tick_t=tick_t, spilled=n_spilled,
    )
    _per_tick_stats(res, traffic, slo_ms, dt, names)
    res.wall_s = time.perf_counter() - wall0
    return res


def _per_tick_stats(res: RunResult, traffic: Traffic, slo_ms: np.ndarray, dt: float, names: list[str]) -> None:
    """Adds arrivals, completions, latency percentiles, SLO share, routing shares and debt to each row."""
    n_rows, n_exp = len(res.rows), len(names)
    a_bin = np.minimum((traffic.times // dt).astype(np.int64), n_rows - 1)
    arrivals = np.bincount(a_bin, minlength=n_rows)[:n_rows]
    routed = np.bincount(a_bin * n_exp + res.chosen, minlength=n_rows * n_exp)[: n_rows * n_exp]
    routed = routed.reshape(n_rows, n_exp)
    debt = np.cumsum(np.bincount(a_bin, weights=res.given_up, minlength=n_rows)[:n_rows])
    ok = ~np.isnan(res.done_at)
    d_bin = np.minimum((res.done_at[ok] // dt).astype(np.int64), n_rows - 1)
    order = np.argsort(d_bin, kind="stable")
    lat = res.latency_ms[ok][order]
    ratio = (res.latency_ms[ok] / slo_ms[res.chosen[ok]])[order]
    bounds = np.searchsorted(d_bin[order], np.arange(n_rows + 1))
    top3 = list(range(max(0, n_exp - 3), n_exp))
    for r, row in enumerate(res.rows):
        a, b = bounds[r], bounds[r + 1]
        has = b > a
        row["arrivals"] = int(arrivals[r])
        row["completions"] = int(b - a)
        row["p50_ms"] = percentile(lat[a:b], 50) if has else math.nan
        row["p99_ms"] = percentile(lat[a:b], 99) if has else math.nan
        row["p99_over_slo"] = percentile(ratio[a:b], 99) if has else math.nan
        row["slo_violation_share"] = float((ratio[a:b] > 1.0).mean()) if has else math.nan
        tot = max(1, int(arrivals[r]))
        row["share_top3"] = float(routed[r, top3].sum()) / tot
        row["debt_cum"] = float(debt[r])
        for k, nm in enumerate(names):
            row[f"share_{nm}"] = float(routed[r, k]) / tot


# -- summary and outputs ------------------------------------------------------------------------------


def summarize(res: RunResult, scn: Scenario, traffic: Traffic, t_min: float) -> dict[str, Any]:
    """The table's numbers for one run."""
    ok = ~np.isnan(res.latency_ms)
    burst = (traffic.times >= scn.burst_start) & (traffic.times < scn.burst_end)
    lat_b = res.latency_ms[burst & ok]
    back: float | None = None
    after = [(tm, t) for tm, t in res.tick_t if scn.burst_end <= tm < scn.duration]
    if after:
        last_above = max((tm for tm, t in after if t > t_min + 1e-12), default=None)
        if last_above is None:
            back = 0.0
        elif last_above < after[-1][0]:
            nxt = min(tm for tm, _ in after if tm > last_above)
            back = nxt - scn.burst_end
    return {
        "requests": len(res.latency_ms),
        "unfinished": int((~ok).sum()),
        "p50_ms": percentile(res.latency_ms[ok], 50),
        "p99_ms": percentile(res.latency_ms[ok], 99),
        "over_slo": float(res.over_slo.mean()),
        "burst_p99_ms": percentile(lat_b, 99) if len(lat_b) else math.nan,
        "t_min": t_min,
        "t_max_seen": max(t for _, t in res.tick_t),
        "t_back_s": back,
        "given_up_mean": float(res.given_up.mean()),
        "spilled": res.spilled,
        "debt": float(res.given_up.sum()),
        "cost_usd": float(res.price.sum()),
        "max_replicas": int(max(r["replicas"] for r in res.rows)),
        "replica_s": float(sum(r["replicas"] for r in res.rows) * (res.rows[1]["time_s"] if len(res.rows) > 1 else 1.0)),
        "wall_s": res.wall_s,
    }


def print_table(summaries: dict[str, dict[str, Any]], title: str) -> None:
    """A rich table, one column per run."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")

    def fmt_back(s: dict[str, Any]) -> str:
        if s["t_max_seen"] <= s["t_min"]:
            return "n/a"
        return "not within the run" if s["t_back_s"] is None else f"{s['t_back_s']:.0f} s"

    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("requests", lambda s: f"{s['requests']:,}"),
        ("latency p50", lambda s: f"{s['p50_ms'] / 1000:.2f} s"),
        ("latency p99", lambda s: f"{s['p99_ms'] / 1000:.2f} s"),
        ("share over SLO", lambda s: f"{s['over_slo']:.1%}"),
        ("p99 during burst", lambda s: f"{s['burst_p99_ms'] / 1000:.2f} s"),
        ("max t", lambda s: f"{s['t_max_seen']:.3f}"),
        ("t back at t_min after burst", fmt_back),
        ("quality given up / request", lambda s: f"{s['given_up_mean']:.4f}"),
        ("quality debt (sum)", lambda s: f"{s['debt']:.1f}"),
        ("overflow spills", lambda s: f"{s['spilled']:,}"),
        ("cost (USD)", lambda s: f"{s['cost_usd']:.2f}"),
        ("max replicas", lambda s: f"{s['max_replicas']}"),
        ("replica-seconds", lambda s: f"{s['replica_s']:,.0f}"),
        ("wall time", lambda s: f"{s['wall_s']:.1f} s"),
    ]
    for label, f in lines:
        table.add_row(label, *(f(s) for s in summaries.values()))
    Console().print(table)


def write_csv(results: dict[str, RunResult], path: Path) -> None:
    """All runs' per-tick rows, one `run` column."""
    keys = list(next(iter(results.values())).rows[0].keys())
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", *keys])
        for name, res in results.items():
            for row in res.rows:
                w.writerow([name, *(f"{row[k]:.6g}" if isinstance(row[k], float) else row[k] for k in keys)])


def plot(results: dict[str, RunResult], scn: Scenario, ctrl_cfg: ControllerConfig, path: Path) -> None:
    """Four stacked panels over time: t, p99 latency / SLO, arrivals and completions, replicas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    colors = {"fixed": "tab:gray", "adaptive": "tab:blue"}
    for name, res in results.items():
        x = np.array([r["time_s"] for r in res.rows])
        col = colors.get(name)
        ax[0].step(x, [r["t"] for r in res.rows], where="post", color=col, label=f"t ({name})")
        ax[1].plot(x, [r["p99_over_slo"] for r in res.rows], color=col, label=name)
        ax[2].plot(x, [r["completions"] for r in res.rows], color=col, lw=1, label=f"completions ({name})")
        ax[3].plot(x, [r["replicas"] for r in res.rows], color=col, label=f"running ({name})")
        ax[3].plot(x, [r["replicas"] + r["pending_replicas"] for r in res.rows], color=col, ls=":",
                   label=f"running + starting ({name})")
    first = next(iter(results.values()))
    x = np.array([r["time_s"] for r in first.rows])
    ax[2].plot(x, [r["arrivals"] for r in first.rows], color="black", lw=1.5, label="arrivals")
    if "adaptive" in results:
        ax0b = ax[0].twinx()
        ra = results["adaptive"].rows
        ax0b.plot([r["time_s"] for r in ra], [r["share_top3"] for r in ra], color="tab:orange", lw=0.8,
                  alpha=0.8, label="share to 3 priciest (adaptive)")
        ax0b.set_ylabel("share to 3 priciest")
        ax0b.set_ylim(0, 1)
        ax0b.legend(loc="upper right", fontsize=8)
    ax[0].axhline(ctrl_cfg.t_max, color="red", ls="--", lw=0.8, label="t_max")
    ax[0].set_ylabel("threshold t")
    ax[1].axhline(1.0, color="red", ls="--", lw=1, label="SLO")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("p99 latency / expert SLO")
    ax[2].set_ylabel("requests / s")
    ax[3].set_ylabel("replicas (all experts)")
    ax[3].set_xlabel("time (s)")
    for a in ax:
        a.axvspan(scn.burst_start, scn.burst_end, color="orange", alpha=0.08)
        a.legend(loc="upper left", fontsize=8)
        a.grid(alpha=0.3)
    fig.suptitle(f"{len(first.chosen):,} requests, {scn.base_rps:g}->{scn.burst_rps:g} req/s, "
                 f"autoscale delay {scn.autoscale_delay:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry points -------------------------------------------------------------------------------------


def run_both(scn: Scenario, ctrl_cfg: ControllerConfig, progress: bool = True) -> tuple[
        dict[str, RunResult], list[SimExpert], Traffic]:
    """Both runs (fixed, adaptive) on the same arrivals."""
    experts = build_experts(scn)
    traffic, means, weights = make_traffic(scn, len(experts))
    experts = provision(scn, experts, means, weights, ctrl_cfg.t_min)
    results: dict[str, RunResult] = {}
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/"
                      f"{scn.duration:g} sim s"), TimeElapsedColumn()) as bar:
            for name, adaptive in (("fixed", False), ("adaptive", True)):
                task = bar.add_task(name, total=scn.duration)
                results[name] = simulate_run(
                    name, scn, experts, traffic, ctrl_cfg, adaptive,
                    on_tick=lambda now, task=task: bar.update(task, completed=min(now + 1, scn.duration)))
    else:
        for name, adaptive in (("fixed", False), ("adaptive", True)):
            results[name] = simulate_run(name, scn, experts, traffic, ctrl_cfg, adaptive)
    return results, experts, traffic


def write_outputs(results: dict[str, RunResult], scn: Scenario, ctrl_cfg: ControllerConfig,
                  out: Path) -> tuple[Path, Path]:
    """simulate.csv and simulate.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "simulate.csv", out / "simulate.png"
    write_csv(results, csv_path)
    plot(results, scn, ctrl_cfg, png_path)
    return csv_path, png_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Scenario()
    p.add_argument("--experts", type=int, default=d.n_experts)
    p.add_argument("--service-times", type=Path, help="JSON {expert: [service ms samples]} (measured)")
    p.add_argument("--base-rps", type=float, default=d.base_rps)
    p.add_argument("--burst-rps", type=float, default=d.burst_rps)
    p.add_argument("--burst-start", type=float, default=d.burst_start)
    p.add_argument("--burst-end", type=float, default=d.burst_end)
    p.add_argument("--duration", type=float, default=d.duration)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sigma", type=float, default=d.sigma, help="lognormal shape of service times")
    p.add_argument("--target-ongoing", type=float, default=d.target_ongoing,
                   help="capacity_per_replica: concurrent requests per replica")
    p.add_argument("--slo-factor", type=float, default=d.slo_factor, help="SLO total_ms = factor * median")
    p.add_argument("--provision-load", type=float, default=d.provision_load,
                   help="min replicas sized so the baseline runs at this load ratio")
    p.add_argument("--min-replicas-floor", type=int, default=d.min_replicas_floor,
                   help="every expert runs at least this many replicas")
    p.add_argument("--max-replicas-factor", type=float, default=d.max_replicas_factor,
                   help="max replicas = ceil(min replicas * factor)")
    p.add_argument("--autoscale-period", type=float, default=d.autoscale_period)
    p.add_argument("--autoscale-delay", type=float, default=d.autoscale_delay, help="cold start (s)")
    p.add_argument("--downscale-cooldown", type=float, default=d.downscale_cooldown)
    p.add_argument("--latency-window", type=float, default=d.latency_window_s, help="LatencyWindow window_s")
    p.add_argument("--config", default="cpu-default", help="coe YAML whose controller: section is used")
    for flag, typ in (("t-min", float), ("t-max", float), ("target-load", float), ("kp", float),
                      ("ki", float), ("deadband", float), ("max-step", float), ("cooldown-s", float),
                      ("queue-penalty", float), ("interval-s", float)):
        p.add_argument(f"--{flag}", type=typ, default=None, help="override controller." + flag.replace("-", "_"))
    p.add_argument("--no-overflow", action="store_true", help="adaptive run without the overflow rule (t only)")
    p.add_argument("--out", type=Path, default=Path("bench-results/simulate"))
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def controller_config(args: argparse.Namespace) -> ControllerConfig:
    """The config's controller section with the command-line overrides (validated)."""
    base = load_config(args.config).controller
    over = {k: getattr(args, k) for k in ("t_min", "t_max", "target_load", "kp", "ki", "deadband", "max_step",
                                          "cooldown_s", "queue_penalty", "interval_s")
            if getattr(args, k) is not None}
    if getattr(args, "no_overflow", False):
        over["overflow_load"] = None
    return ControllerConfig.model_validate({**base.model_dump(), **over, "enabled": True})


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run both simulations, print the table, write the CSV and PNG; returns the summaries."""
    args = parse_args(argv)
    service_times = None
    if args.service_times:
        service_times = {str(k): [float(x) for x in v] for k, v in json.loads(args.service_times.read_text()).items()}
    scn = Scenario(
        n_experts=args.experts, base_rps=args.base_rps, burst_rps=args.burst_rps, burst_start=args.burst_start,
        burst_end=args.burst_end, duration=args.duration, seed=args.seed, service_times=service_times,
        sigma=args.sigma, target_ongoing=args.target_ongoing, slo_factor=args.slo_factor,
        provision_load=args.provision_load, min_replicas_floor=args.min_replicas_floor,
        max_replicas_factor=args.max_replicas_factor,
        autoscale_period=args.autoscale_period, autoscale_delay=args.autoscale_delay,
        downscale_cooldown=args.downscale_cooldown, latency_window_s=args.latency_window,
    )
    ctrl_cfg = controller_config(args)
    wall0 = time.perf_counter()
    results, experts, traffic = run_both(scn, ctrl_cfg, progress=not args.no_progress)
    summaries = {name: summarize(res, scn, traffic, ctrl_cfg.t_min) for name, res in results.items()}
    csv_path, png_path = write_outputs(results, scn, ctrl_cfg, args.out)
    print_table(summaries, f"{len(experts)} experts, {len(traffic.times):,} requests, controller "
                f"t in [{ctrl_cfg.t_min:g}, {ctrl_cfg.t_max:g}] target_load {ctrl_cfg.target_load:g}")
    print(f"wrote {csv_path} and {png_path} in {time.perf_counter() - wall0:.1f} s")
    return summaries


if __name__ == "__main__":
    main()
