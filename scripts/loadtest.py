#!/usr/bin/env python
"""Load test: an open-loop step burst against the real service, fixed t against the load-aware controller.

Starts its own Ray Serve (127.0.0.1, a free port) with a load-test variant of a coe config (default
cpu-default; the variant is written to ``--out/loadtest-config.yaml``):

* every llama.cpp expert runs one thread, so the experts work in parallel on separate cores;
* the priciest expert (the premium one) answers with ``--premium-tokens`` tokens and the others with
  ``--tokens``: on this CPU the experts are the same small models, so answer length stands in for the
  bigger, slower model a premium expert is in production;
* every expert's SLO (p99 total latency) is ``--slo-s``; its capacity target (requests in flight per replica at
  load 1.0) ``--premium-target-ongoing`` for the premium expert and ``--target-ongoing`` for the others.

Then it measures each expert's mean service time (its prompts of the mix, one at a time), finds the premium expert's capacity C
(requests/s at one request per replica) and the prompt mix's demand on it (its share of ``/v1/route`` at
t = 0), and runs the same Poisson schedule twice: ``--low`` x C of demand on that expert, a step to
``--high`` x C, back to ``--low``. Mixed prompts: code, math, translation, chat.

* ``fixed``: every request caps its own t at the resting value (``coe.max_quality_threshold``), so the
  controller cannot move it: what a router with a fixed threshold does;
* ``adaptive``: the controller moves t and per-expert penalties with load.

Per second it records t, routing share, p50/p99 latency and errors; writes ``loadtest.csv`` (per second),
``loadtest-requests.csv``, ``loadtest.json`` (summary) and ``loadtest.png`` to ``--out``, and prints a table.
Bounded: at most ``--max-requests`` requests and ``--drain-s`` after the schedule, 127.0.0.1 only.

    .venv/bin/python scripts/loadtest.py [--high 2.0] [--step-s 30] [--out bench-results/loadtest]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from tqdm import tqdm

from coe.stats import percentile as pct

PROMPTS: dict[str, list[str]] = {
    "code": [
        "Write a Python function that checks whether a string is a palindrome.",
        "How do I remove duplicates from a JavaScript array?",
        "Write a SQL query that counts orders per customer.",
        "Write a Go function that reverses a slice of integers.",
        "Fix the bug in my Python function that computes the median of a list; it fails on empty input.",
        "Write a bash script that renames all .log files in a folder to .txt.",
        "Explain, with a TypeScript example, how to debounce a function call.",
        "Write a Rust function that returns the n-th Fibonacci number.",
    ],
    "math": [
        "A train travels 180 km in 2 hours. What is its average speed?",
        "If I have 7 apples and buy 12 more, then eat 3, how many do I have?",
        "How many days are there in three leap years?",
        "A shirt costs 40 dollars and is 25 percent off. What do I pay?",
        "What is 15 percent of 80?",
        "I save 12 dollars a week. How much do I have after a year?",
    ],
    "translation": [
        "Translate to French: the train leaves at noon.",
        "How do you say 'good evening, my friends' in French?",
        "Translate \"Where can I buy a ticket?\" into French.",
        "What is \"thank you for your help\" in French?",
        "Translate to French: the museum opens at nine o'clock.",
    ],
    "chat": [
        "What are three good habits for staying healthy?",
        "Explain why leaves change colour in autumn.",
        "Give me a short tip for public speaking.",
        "Write a short friendly email inviting my team to lunch.",
        "What should I cook for dinner tonight?",
        "Explain how vaccines work.",
    ],
}
DEFAULT_MIX = {"code": 0.6, "math": 0.15, "translation": 0.1, "chat": 0.15}


@dataclass
class Shot:
    """One scheduled request."""

    at: float  # seconds from the run's start
    kind: str
    prompt: str
    phase: str


@dataclass
class Outcome:
    """What happened to one request."""

    shot: Shot
    sent: float = math.nan  # seconds from the run's start
    latency_ms: float = math.nan
    status: int = 0  # HTTP status; 0: no response (timeout, connection error, generator limit)
    expert: str = ""
    threshold: float = math.nan
    reason: str = ""
    tokens: int = 0
    error: str = ""


@dataclass
class RunData:
    """One run: outcomes and the controller's t sampled during it."""

    name: str
    outcomes: list[Outcome]
    t_samples: list[tuple[float, float, float]] = field(default_factory=list)  # (s from start, t, max penalty)
    load_samples: list[tuple[float, float]] = field(default_factory=list)  # (s from start, controller load signal)
    debt: dict[str, Any] = field(default_factory=dict)  # quality debt added during the run
    wall_s: float = 0.0
    started_at: float = 0.0  # wall-clock time the schedule started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the configuration under test ---------------------------------------------------------------------


def loadtest_config(base: Any, *, premium_tokens: int, tokens: int, slo_s: float, target_ongoing: float,
                    premium_target_ongoing: float) -> Any:
    """The load-test variant of `base` (a CoeConfig): one thread per llama.cpp expert, answer lengths, SLOs and
    capacity targets (a replica of a short-answer expert holds more requests in flight within the same SLO)."""
    from coe.config import CoeConfig

    d = base.model_dump(mode="json")
    premium = max(d["experts"], key=lambda e: e["price_per_1k_tokens"])["name"]
    for e in d["experts"]:
        if e.get("llama_cpp"):
            e["llama_cpp"]["n_threads"] = 1
        e["sampling"]["max_tokens"] = premium_tokens if e["name"] == premium else tokens
        e["slo"] = {"ttft_ms": slo_s * 1000.0, "total_ms": slo_s * 1000.0}
        e["autoscaling"]["target_ongoing_requests"] = (premium_target_ongoing if e["name"] == premium
                                                       else target_ongoing)
    return CoeConfig.model_validate(d)


def schedule(rates: list[tuple[str, float, float]], mix: dict[str, float], seed: int, max_requests: int) -> list[Shot]:
    """Poisson arrivals for phases [(name, seconds, requests/s)], prompts drawn from the mix."""
    rng = random.Random(seed)
    kinds, weights = list(mix), [mix[k] for k in mix]
    shots: list[Shot] = []
    start = 0.0
    for name, seconds, rate in rates:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            kind = rng.choices(kinds, weights)[0]
            shots.append(Shot(at=t, kind=kind, prompt=rng.choice(PROMPTS[kind]), phase=name))
        start += seconds
    if len(shots) > max_requests:
        raise SystemExit(f"the schedule has {len(shots)} requests, above --max-requests {max_requests}: "
                         "lower the rates or durations")
    return shots


# -- talking to the service ---------------------------------------------------------------------------


def body(prompt: str, *, capped_t: float | None) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "coe-auto", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    if capped_t is not None:
        b["coe"] = {"max_quality_threshold": capped_t}
    return b


async def controller_state(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    r = await client.get(f"{url}/v1/coe/state", timeout=10)
    return r.json().get("controller") or {}


async def wait_for_rest(client: httpx.AsyncClient, url: str, resting: float, timeout: float = 180.0) -> float:
    """Wait until the controller's t is at rest with no penalties and no request in flight; seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = await controller_state(client, url)
        th = st.get("threshold") or {}
        loads = st.get("loads") or {}
        busy = sum(int(v.get("in_flight", 0)) for v in loads.values())
        if th and abs(float(th["t"]) - resting) < 1e-9 and not th.get("penalties") and busy == 0:
            return time.monotonic() - t0
        await asyncio.sleep(1.0)
    raise SystemExit(f"the service did not come back to rest (t={resting}) within {timeout:.0f} s")


async def service_times(client: httpx.AsyncClient, url: str, experts: list[str], kinds_of: dict[str, list[str]],
                        rounds: int) -> dict[str, float]:
    """Mean latency (s) of sequential requests pinned to each expert: every prompt of the kinds it gets, `rounds`
    times, after one warm-up request. The mean, not the median: capacity is requests per busy second."""
    out: dict[str, float] = {}
    for name in experts:
        prompts = [p for k in kinds_of.get(name, []) for p in PROMPTS[k]] or PROMPTS["chat"]
        lat = []
        for i, prompt in enumerate([prompts[0]] + prompts * rounds):
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": name, "messages": [{"role": "user", "content": prompt}], "temperature": 0})
            r.raise_for_status()
            if i:  # the first one warms the replica up
                lat.append(time.perf_counter() - t0)
        out[name] = statistics.fmean(lat)
    return out


async def run_once(name: str, url: str, shots: list[Shot], *, capped_t: float | None, resting: float,
                   request_timeout: float, drain_s: float, max_outstanding: int) -> RunData:
    """Send the schedule open-loop (each request at its time, whatever the earlier ones are doing)."""
    limits = httpx.Limits(max_connections=max_outstanding + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=request_timeout) as client:
        await wait_for_rest(client, url, resting)
        debt0 = (await controller_state(client, url)).get("quality_debt") or {}
        data = RunData(name=name, outcomes=[Outcome(s) for s in shots], started_at=time.time())
        t_start = time.monotonic()
        outstanding = 0
        stop_sampling = asyncio.Event()

        async def sample() -> None:
            while not stop_sampling.is_set():
                try:
                    th = (await controller_state(client, url)).get("threshold") or {}
                    if th:
                        pen = max((th.get("penalties") or {}).values(), default=0.0)
                        at = time.monotonic() - t_start
                        data.t_samples.append((at, float(th["t"]), float(pen)))
                        data.load_samples.append((at, float(th.get("load", math.nan))))
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(1.0)

        async def one(o: Outcome) -> None:
            nonlocal outstanding
            outstanding += 1
            t0 = time.monotonic()
            o.sent = t0 - t_start
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body(o.shot.prompt, capped_t=capped_t))
                o.latency_ms = (time.monotonic() - t0) * 1000.0
                o.status = r.status_code
                o.expert = r.headers.get("x-coe-expert", "")
                o.threshold = float(r.headers.get("x-coe-threshold", "nan"))
                o.reason = r.headers.get("x-coe-route-reason", "")
                if r.status_code == 200:
                    o.tokens = int(r.json().get("usage", {}).get("completion_tokens", 0))
                else:
                    o.error = (r.json().get("error") or {}).get("type", f"http {r.status_code}")
            except httpx.HTTPError as err:
                o.error = type(err).__name__
            finally:
                outstanding -= 1

        sampler = asyncio.create_task(sample())
        tasks: list[asyncio.Task[None]] = []
        bar = tqdm(total=len(shots), desc=f"{name:>8} sent", unit="req", leave=False)
        for o in data.outcomes:
            delay = o.shot.at - (time.monotonic() - t_start)
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= max_outstanding:  # the generator's own bound: counted as a failure
                o.sent, o.error = time.monotonic() - t_start, "generator_limit"
            else:
                tasks.append(asyncio.create_task(one(o)))
            bar.update(1)
        bar.close()
        _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        for o in data.outcomes:
            if not o.status and not o.error:
                o.error = "not_finished"
        # Keep sampling t while the service settles, so the plot shows it return.
        settle_end = time.monotonic() + 20.0
        while time.monotonic() < settle_end:
            await asyncio.sleep(0.5)
        stop_sampling.set()
        await sampler
        data.wall_s = time.monotonic() - t_start
        debt1 = (await controller_state(client, url)).get("quality_debt") or {}
        data.debt = {
            "total": float(debt1.get("total", 0.0)) - float(debt0.get("total", 0.0)),
            "requests": int(debt1.get("requests", 0)) - int(debt0.get("requests", 0)),
            "per_expert": {k: float(v) - float((debt0.get("per_expert") or {}).get(k, 0.0))
                           for k, v in (debt1.get("per_expert") or {}).items()},
        }
    return data


# -- analysis -----------------------------------------------------------------------------------------


def per_second(run: RunData, experts: list[str], slo_ms: float) -> list[dict[str, Any]]:
    """One row per second of sending: requests sent in that second and how they fared, and t."""
    last = max((o.shot.at for o in run.outcomes), default=0.0)
    end = int(max(last, max((s[0] for s in run.t_samples), default=0.0))) + 1
    rows = []
    for sec in range(end):
        outs = [o for o in run.outcomes if sec <= o.shot.at < sec + 1]
        ok = [o for o in outs if o.status == 200]
        lat = [o.latency_ms if o.status == 200 else math.inf for o in outs]
        ts = [t for s, t, _ in run.t_samples if sec <= s < sec + 1]
        pens = [p for s, _, p in run.t_samples if sec <= s < sec + 1]
        signal = [x for s, x in run.load_samples if sec <= s < sec + 1]
        row: dict[str, Any] = {
            "run": run.name, "second": sec, "phase": outs[0].shot.phase if outs else "",
            "sent": len(outs), "ok": len(ok), "errors": len(outs) - len(ok),
            "p50_ms": pct(lat, 50) if outs else math.nan, "p99_ms": pct(lat, 99) if outs else math.nan,
            "over_slo": sum(1 for x in lat if x > slo_ms),
            "t": max(ts) if ts else math.nan, "max_penalty": max(pens) if pens else math.nan,
            "load_signal": max(signal) if signal else math.nan,
            "t_applied": statistics.fmean(o.threshold for o in ok) if ok else math.nan,
        }
        for e in experts:
            row[f"share_{e}"] = (sum(1 for o in ok if o.expert == e) / len(ok)) if ok else math.nan
        rows.append(row)
    return rows


def summarize(run: RunData, premium: str, prices: dict[str, float], slo_ms: float, step: tuple[float, float],
              resting: float) -> dict[str, Any]:
    outs = run.outcomes
    lat = [o.latency_ms if o.status == 200 else math.inf for o in outs]
    in_step = [o for o in outs if o.shot.phase == "step"]
    lat_step = [o.latency_ms if o.status == 200 else math.inf for o in in_step]
    ok = [o for o in outs if o.status == 200]
    ok_step = [o for o in in_step if o.status == 200]
    errors: dict[str, int] = {}
    for o in outs:
        if o.status != 200:
            errors[o.error or f"http {o.status}"] = errors.get(o.error or f"http {o.status}", 0) + 1
    t_after = [(s, t) for s, t, _ in run.t_samples if s >= step[1]]
    back = next((s - step[1] for s, t in t_after if abs(t - resting) < 1e-9), None)
    cost = sum(o.tokens / 1000 * prices.get(o.expert, 0.0) for o in ok)
    return {
        "run": run.name, "requests": len(outs), "ok": len(ok), "errors": errors,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "p99_step_ms": pct(lat_step, 99),
        "over_slo_pct": 100.0 * sum(1 for x in lat if x > slo_ms) / max(1, len(lat)),
        "premium_share_step": (sum(1 for o in ok_step if o.expert == premium) / len(ok_step)) if ok_step else math.nan,
        "t_max_seen": max((t for _, t, _ in run.t_samples), default=math.nan),
        # The t requests were routed under (a capped run's controller still moves its own t, unused).
        "t_applied_max": max((o.threshold for o in ok if not math.isnan(o.threshold)), default=math.nan),
        "t_end": run.t_samples[-1][1] if run.t_samples else math.nan,
        "t_back_after_step_s": back,
        "quality_debt": run.debt.get("total", 0.0), "debt_requests": run.debt.get("requests", 0),
        "quality_debt_per_request": run.debt.get("total", 0.0) / max(1, len(outs)),
        "cost_usd": cost, "wall_s": run.wall_s,
    }


def plot(rows: list[dict[str, Any]], runs: list[str], premium: str, slo_ms: float, step: tuple[float, float],
         out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    colors = {"fixed": "tab:red", "adaptive": "tab:blue"}
    for name in runs:
        rs = [r for r in rows if r["run"] == name]
        x = [r["second"] for r in rs]
        c = colors.get(name, None)
        axes[0].plot(x, [r["t_applied"] for r in rs], color=c, marker=".", ls="", label=f"{name}: t applied (requests)")
        if name == "adaptive":
            axes[0].plot(x, [r["t"] for r in rs], color=c, lw=1, label="controller t")
        axes[1].plot(x, [min(r["p99_ms"], 1e6) / 1000 for r in rs], color=c, label=f"{name} p99")
        axes[1].plot(x, [min(r["p50_ms"], 1e6) / 1000 for r in rs], color=c, ls=":", label=f"{name} p50")
        axes[2].plot(x, [r[f"share_{premium}"] for r in rs], color=c, label=f"{name}: share to {premium}")
    axes[1].axhline(slo_ms / 1000, color="k", ls="--", lw=1, label="SLO")
    axes[1].set_yscale("log")
    axes[0].set_ylabel("t")
    axes[1].set_ylabel("latency s (by send second)")
    axes[2].set_ylabel(f"share to {premium}")
    axes[2].set_xlabel("seconds from start")
    for ax in axes:
        ax.axvspan(step[0], step[1], color="0.9", zorder=0)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    axes[0].set_title("coe load test: fixed t vs the load-aware controller (grey: the step)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def fmt_ms(x: float) -> str:
    return "inf (failures)" if math.isinf(x) else f"{x:,.0f}"


# -- main ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default", help="coe config (name or path) the variant is made from")
    ap.add_argument("--low", type=float, default=0.5, help="demand on the premium expert before/after, x its capacity")
    ap.add_argument("--high", type=float, default=2.0, help="demand on the premium expert in the step, x its capacity")
    ap.add_argument("--warm-s", type=float, default=20.0, help="seconds at --low before the step")
    ap.add_argument("--step-s", type=float, default=30.0, help="seconds of the step")
    ap.add_argument("--after-s", type=float, default=40.0, help="seconds at --low after the step")
    ap.add_argument("--premium-tokens", type=int, default=128, help="answer length of the priciest expert")
    ap.add_argument("--tokens", type=int, default=16, help="answer length of the other experts")
    ap.add_argument("--slo-s", type=float, default=8.0, help="p99 total latency SLO of every expert")
    ap.add_argument("--target-ongoing", type=float, default=8.0,
                    help="requests in flight per replica at load 1.0, experts other than the premium one")
    ap.add_argument("--premium-target-ongoing", type=float, default=2.0,
                    help="requests in flight per replica at load 1.0, the premium expert")
    ap.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
                    help="prompt mix, kind=weight,... (kinds: " + ", ".join(PROMPTS) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-requests", type=int, default=2000, help="refuse a schedule longer than this")
    ap.add_argument("--max-outstanding", type=int, default=400, help="the generator's in-flight bound")
    ap.add_argument("--request-timeout", type=float, default=180.0)
    ap.add_argument("--drain-s", type=float, default=180.0, help="most seconds to wait for requests after sending")
    ap.add_argument("--runs", default="fixed,adaptive", help="which runs, in order")
    ap.add_argument("--prometheus", action="store_true",
                    help="run Debian's prometheus against coe's metrics port during the runs and plot its main "
                         "series (route share, t, TTFT per expert) from Prometheus' query API: prometheus.png")
    ap.add_argument("--out", default="bench-results/loadtest")
    args = ap.parse_args()
    mix = {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    if set(mix) - set(PROMPTS) or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        ap.error(f"--mix: kinds are {', '.join(PROMPTS)} with weights >= 0")
    runs = [r for r in args.runs.split(",") if r]
    if set(runs) - {"fixed", "adaptive"}:
        ap.error("--runs: fixed and/or adaptive")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    from coe.cli import default_profile, ensure_router_artifact, start_local_serve
    from coe.config import load_config

    base = load_config(args.config)
    config = loadtest_config(base, premium_tokens=args.premium_tokens, tokens=args.tokens, slo_s=args.slo_s,
                             target_ongoing=args.target_ongoing, premium_target_ongoing=args.premium_target_ongoing)
    (out / "loadtest-config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    ensure_router_artifact(config, train_from=default_profile(args.config))
    experts = [e.name for e in config.experts]
    prices = {e.name: e.price_per_1k_tokens for e in config.experts}
    premium = max(experts, key=lambda n: prices[n])
    resting = config.router.threshold if config.router.kind == "routerdc" else 0.0
    slo_ms = args.slo_s * 1000.0

    print(f"[loadtest] starting Ray Serve with the load-test variant of {args.config} ...", flush=True)
    metrics_port = free_port() if args.prometheus else None
    info = start_local_serve(config, port=free_port(), dashboard=False, log_to_driver=False,
                             metrics_port=metrics_port, metrics_interval_ms=1000 if args.prometheus else None)
    url = info["url"]
    prom = None
    try:
        if args.prometheus:
            from prometheus_local import LocalPrometheus

            prom = LocalPrometheus([f"127.0.0.1:{metrics_port}"]).__enter__()
            print(f"[loadtest] prometheus at {prom.url} scrapes {info['metrics_url']}", flush=True)
            marks: list[tuple[float, str]] = []
        deadline = time.time() + 600
        while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
            if time.time() > deadline:
                raise SystemExit("the service did not become ready in 600 s")
            time.sleep(1.0)

        async def prepare() -> tuple[dict[str, str], dict[str, float]]:
            async with httpx.AsyncClient(timeout=300) as client:
                routes = {}
                kinds_of: dict[str, list[str]] = {}
                for kind, prompts in PROMPTS.items():
                    for p in prompts:
                        r = await client.post(f"{url}/v1/route", json={"prompt": p, "coe": {"max_quality_threshold": 0}})
                        r.raise_for_status()
                        routes[p] = r.json()["expert"]
                        kinds_of.setdefault(routes[p], [])
                        if kind not in kinds_of[routes[p]]:
                            kinds_of[routes[p]].append(kind)
                return routes, await service_times(client, url, experts, kinds_of, 1)

        routes, svc = asyncio.run(prepare())
        total = sum(mix.values())
        demand = {e: sum(mix[k] / total * sum(routes[p] == e for p in PROMPTS[k]) / len(PROMPTS[k]) for k in mix)
                  for e in experts}
        if demand[premium] <= 0:
            raise SystemExit(f"the prompt mix sends nothing to the premium expert {premium}: nothing to overload")
        replicas = {e.name: max(1, e.autoscaling.min_replicas) for e in config.experts}
        cap = replicas[premium] / svc[premium]
        low, high = args.low * cap / demand[premium], args.high * cap / demand[premium]
        print("[loadtest] service time (mean over the mix's prompts, one at a time): "
              + ", ".join(f"{e} {svc[e] * 1000:.0f} ms" for e in experts))
        print(f"[loadtest] premium expert {premium}: capacity {cap:.2f} req/s, demand share {demand[premium]:.2f}; "
              f"schedule {low:.2f} -> {high:.2f} -> {low:.2f} req/s "
              f"({args.warm_s:g} s, {args.step_s:g} s, {args.after_s:g} s)", flush=True)
        shots = schedule([("low", args.warm_s, low), ("step", args.step_s, high), ("after", args.after_s, low)],
                         mix, args.seed, args.max_requests)
        step = (args.warm_s, args.warm_s + args.step_s)
        data: list[RunData] = []
        started = time.time()
        for name in runs:
            print(f"[loadtest] run '{name}': {len(shots)} requests", flush=True)
            data.append(asyncio.run(run_once(
                name, url, shots, capped_t=resting if name == "fixed" else None, resting=resting,
                request_timeout=args.request_timeout, drain_s=args.drain_s, max_outstanding=args.max_outstanding)))
            if prom is not None:  # where the step starts and ends in this run (lines in the plot)
                marks += [(data[-1].started_at + step[0], f"{name}: step"), (data[-1].started_at + step[1], "")]
        if prom is not None:
            time.sleep(12)  # the last scrapes and the 10 s rate windows
            from prometheus_local import plot_series

            png = out / "prometheus.png"
            series = plot_series(prom, started, time.time(), png, f"coe in Prometheus during the load test "
                                 f"({', '.join(runs)}; {args.config})", marks)
            (out / "prometheus.json").write_text(json.dumps({"start": started, "marks": marks, "series": series}))
            print(f"[loadtest] Prometheus' view: {png} (raw query results: {out / 'prometheus.json'})", flush=True)
    finally:
        if prom is not None:
            prom.__exit__()
        serve.shutdown()
        ray.shutdown()

    rows = [r for d in data for r in per_second(d, experts, slo_ms)]
    with open(out / "loadtest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "loadtest-requests.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "at_s", "phase", "kind", "sent_s", "latency_ms", "status", "expert", "t", "reason",
                    "tokens", "error"])
        for d in data:
            for o in d.outcomes:
                w.writerow([d.name, round(o.shot.at, 3), o.shot.phase, o.shot.kind, round(o.sent, 3),
                            round(o.latency_ms, 1), o.status, o.expert, o.threshold, o.reason, o.tokens, o.error])
    summary = [summarize(d, premium, prices, slo_ms, step, resting) for d in data]
    plot(rows, runs, premium, slo_ms, step, out / "loadtest.png")
    (out / "loadtest.json").write_text(json.dumps({
        "config": args.config, "premium": premium, "capacity_rps": cap, "demand_share": demand,
        "service_ms": {e: s * 1000 for e, s in svc.items()}, "rates_rps": {"low": low, "high": high},
        "slo_ms": slo_ms, "runs": summary}, indent=1, default=str))

    print(f"\nLoad test: {args.config} variant, premium expert '{premium}' capacity {cap:.2f} req/s; "
          f"demand on it {args.low:g}x -> {args.high:g}x -> {args.low:g}x capacity; SLO p99 {args.slo_s:g} s; "
          f"{len(shots)} requests per run (failures count as infinite latency)")
    print("| run | ok / sent | errors | p50 ms | p99 ms | p99 in step ms | over SLO | "
          f"step share to {premium} | max t: controller / applied | t back after step | quality debt (per request) | cost USD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        back = "never" if s["t_back_after_step_s"] is None else f"{s['t_back_after_step_s']:.0f} s"
        errs = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
        print(f"| {s['run']} | {s['ok']} / {s['requests']} | {errs} | {fmt_ms(s['p50_ms'])} | {fmt_ms(s['p99_ms'])} | "
              f"{fmt_ms(s['p99_step_ms'])} | {s['over_slo_pct']:.1f}% | {s['premium_share_step']:.2f} | "
              f"{s['t_max_seen']:.3f} / {s['t_applied_max']:.3f} | {back} | {s['quality_debt']:.2f} ({s['quality_debt_per_request']:.4f}) | "
              f"{s['cost_usd']:.5f} |")
    by = {s["run"]: s for s in summary}
    if "fixed" in by and "adaptive" in by:
        f, a = by["fixed"], by["adaptive"]
        ratio = f["p99_ms"] / a["p99_ms"] if math.isfinite(f["p99_ms"]) and a["p99_ms"] > 0 else math.inf
        print(f"\np99 fixed / adaptive: {ratio:.2f}x; adaptive within SLO: {a['p99_ms'] <= slo_ms}; "
              f"fixed within SLO: {f['p99_ms'] <= slo_ms}; t back to rest after the step: "
              f"{a['t_back_after_step_s'] is not None}")
    print(f"\nwrote {out / 'loadtest.csv'}, {out / 'loadtest-requests.csv'}, {out / 'loadtest.json'}, "
          f"{out / 'loadtest.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
