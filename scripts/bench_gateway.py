#!/usr/bin/env python
"""Gateway overhead benchmark: the same request through `coe-auto` and straight to the chosen expert.

Starts its own Ray Serve with a config (default cpu-default) on a free loopback port, then, in one run:
  * for each query, sends it through HTTP `coe-auto` (HTTP + routing + handle hop + generation) and the
    identical engine request straight to the chosen expert's deployment handle (generation only), in pairs;
  * reports p50/p99 of the per-pair difference (the gateway's overhead) at concurrency 1 and 16;
  * measures the CPU engine's decode speed (tokens/s) through the gateway and direct.
Writes a table to stdout and a PNG (overhead distributions) to --out.

    .venv/bin/python scripts/bench_gateway.py [--config cpu-default] [--requests 200] [--out bench-results]

`--api-key`: what API keys add. The service runs with keys required and its state in a throwaway local
redis-server; a team key with rate limits (so each request runs the key check and one Redis rate-limit script)
and the admin key (checked against its hash, no store access: the no-auth path plus one SHA-256) send the same
pinned request in random order, pairs interleaved; the table reports both and the p50/p99 of the paired
difference at concurrency 1 and 16.

    .venv/bin/python scripts/bench_gateway.py --api-key [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from coe.stats import percentile as pct

QUERIES = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Translate to French: the train leaves at noon.",
    "What are three good habits for staying healthy?",
    "How do I remove duplicates from a JavaScript array?",
    "How do you say 'good evening, my friends' in French?",
    "Explain why leaves change colour in autumn.",
    "Write a SQL query that counts orders per customer.",
    "Give me a short tip for public speaking.",
]


async def learn_routes(url: str) -> dict[str, str]:
    """Which expert coe-auto picks for each query (the router is deterministic)."""
    routes = {}
    async with httpx.AsyncClient(timeout=300) as client:
        for q in QUERIES:
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": "coe-auto", "messages": [{"role": "user", "content": q}], "max_tokens": 1})
            r.raise_for_status()
            routes[q] = r.headers["x-coe-expert"]
    return routes


async def run_pairs(
    url: str, app: str, config: Any, routes: dict[str, str], n: int, concurrency: int, max_tokens: int,
    model: str, desc: str,
) -> list[dict[str, float]]:
    """Per query: prime the expert's prefix cache (unmeasured), then time the gateway and the direct call.

    Priming puts both measured requests in the same state (llama.cpp reuses the cached prompt), so
    their difference is the gateway's own cost, not a cache effect.
    """
    from ray import serve

    from coe.protocol import ChatCompletionRequest

    handles = {e.name: serve.get_deployment_handle(e.name, app_name=app) for e in config.experts}
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, float]] = []
    bar = tqdm(total=n, desc=desc, leave=False)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:

        async def one(i: int) -> None:
            q = QUERIES[i % len(QUERIES)]
            expert = routes[q]
            e = config.expert(expert)
            body = {"model": expert if model == "pinned" else "coe-auto",
                    "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0.0}
            req = ChatCompletionRequest.model_validate({**body, "model": expert})
            prompt, params = req.to_engine_prompt(e), req.to_sampling_params(e)
            async with sem:
                await handles[expert].generate.remote(prompt, params)  # prime
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/chat/completions", json=body)
                gw = time.perf_counter() - t0
                r.raise_for_status()
                assert r.headers["x-coe-expert"] == expert
                t0 = time.perf_counter()
                res = await handles[expert].generate.remote(prompt, params)
                direct = time.perf_counter() - t0
            out.append({"gateway_ms": gw * 1e3, "direct_ms": direct * 1e3, "overhead_ms": (gw - direct) * 1e3,
                        "route_ms": float(r.headers.get("x-coe-route-ms", 0.0)),
                        "completion_tokens": res["completion_tokens"]})
            bar.update(1)

        await asyncio.gather(*[one(i) for i in range(n)])
    bar.close()
    return out


async def decode_speed(url: str, app: str, config: Any, max_tokens: int, reps: int) -> dict[str, float]:
    """Tokens/s of one expert generating alone (greedy, long answer)."""
    from ray import serve

    from coe.protocol import ChatCompletionRequest

    body = {"model": "general", "messages": [{"role": "user", "content": "Write a long essay about the ocean."}],
            "max_tokens": max_tokens, "temperature": 0.0}
    e = config.expert("general")
    req = ChatCompletionRequest.model_validate(body)
    h = serve.get_deployment_handle("general", app_name=app)
    gw_tps, direct_tps = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(reps):
            t0 = time.perf_counter()
            r = (await client.post(f"{url}/v1/chat/completions", json=body)).json()
            gw_tps.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            res = await h.generate.remote(req.to_engine_prompt(e), req.to_sampling_params(e))
            direct_tps.append(res["completion_tokens"] / (time.perf_counter() - t0))
    return {"gateway_tps": pct(gw_tps, 50), "direct_tps": pct(direct_tps, 50),
            "tokens": float(res["completion_tokens"])}


async def run_auth_pairs(url: str, team_key: str, admin_key: str, n: int, concurrency: int, model: str,
                         desc: str) -> list[dict[str, float]]:
    """Per pair: the same request with the team key (key check + rate limit) and the admin key, in random
    order. Returns per-pair latencies in ms."""
    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, float]] = []
    bar = tqdm(total=n, desc=desc, leave=False)
    rng = random.Random(concurrency)
    body = {"model": model, "messages": [{"role": "user", "content": QUERIES[2]}], "max_tokens": 1,
            "temperature": 0.0}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)) as client:

        async def timed(key: str) -> float:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
            ms = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            return ms

        async def one(i: int) -> None:
            async with sem:
                if rng.random() < 0.5:
                    team = await timed(team_key)
                    admin = await timed(admin_key)
                else:
                    admin = await timed(admin_key)
                    team = await timed(team_key)
            out.append({"team_ms": team, "admin_ms": admin, "added_ms": team - admin})
            bar.update(1)

        await asyncio.gather(*[one(i) for i in range(n)])
    bar.close()
    return out


def bench_api_key(args: argparse.Namespace) -> None:
    """--api-key: the cost of the key check and the Redis rate-limit script (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.redis_server import RedisServer

    import ray
    from ray import serve

    from coe.cli import start_local_serve

    admin = "bench-admin-" + secrets.token_hex(16)
    with RedisServer() as redis_server:
        os.environ["COE_REDIS_URL"] = redis_server.url
        os.environ["COE_ADMIN_KEY"] = admin
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        info = start_local_serve(args.config, port=port, dashboard=False, log_to_driver=False)
        url = info["url"]
        try:
            while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
                time.sleep(0.5)
            r = httpx.post(f"{url}/v1/coe/keys", headers={"authorization": f"Bearer {admin}"},
                           json={"team": "bench", "rpm": 10_000_000, "tpm": 1_000_000_000})
            r.raise_for_status()
            team = r.json()["key"]
            asyncio.run(run_auth_pairs(url, team, admin, 20, 4, "general", "warm-up"))
            results = {(m, c): asyncio.run(run_auth_pairs(url, team, admin, args.requests, c, m, f"{m} c={c}"))
                       for c in args.concurrency for m in ("general", "coe-auto")}
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nAPI key overhead, {args.config}, max_tokens=1, {args.requests} pairs per row, Redis on loopback "
          "(model 'general': pinned; 'coe-auto': routed, the limit check overlaps routing)")
    print("(team key: cached key + one Redis rate-limit script per request; admin key: hash compare only, "
          "no store access)")
    print("| model | concurrency | admin key p50 ms | team key p50 ms | added p50 ms | added p99 ms | team/admin p50 |")
    print("|---|---|---|---|---|---|---|")
    for (m, c), rows in results.items():
        a = [r["admin_ms"] for r in rows]
        t = [r["team_ms"] for r in rows]
        d = [r["added_ms"] for r in rows]
        print(f"| {m} | {c} | {pct(a, 50):.2f} | {pct(t, 50):.2f} | {pct(d, 50):+.2f} | {pct(d, 99):+.2f} | "
              f"{pct(t, 50) / pct(a, 50):.3f}x |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "auth_overhead.csv").open("w") as f:
        f.write("model,concurrency,admin_ms,team_ms,added_ms\n")
        for (m, c), rows in results.items():
            for r in rows:
                f.write(f"{m},{c},{r['admin_ms']:.3f},{r['team_ms']:.3f},{r['added_ms']:.3f}\n")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.boxplot([[r["added_ms"] for r in rows] for rows in results.values()],
               tick_labels=[f"{m}\nc={c}" for m, c in results], showfliers=False)
    ax.axhline(1.0, color="red", linestyle="--", label="target: +1 ms p50 at c=1")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylabel("team key minus admin key, per pair (ms)")
    ax.set_title("What an API key with rate limits adds per request")
    ax.legend()
    fig.tight_layout()
    png = out / "auth_overhead.png"
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--requests", type=int, default=200, help="pairs per run (concurrency x auto/pinned)")
    ap.add_argument("--max-tokens", type=int, default=1, help="tokens per request in the overhead runs")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--api-key", action="store_true",
                    help="measure what a team key with rate limits adds (key check + Redis script) instead")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.api_key:
        bench_api_key(args)
        return

    import ray
    from ray import serve

    from coe.cli import start_local_serve
    from coe.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_config(args.config)
    info = start_local_serve(args.config, port=port, dashboard=False)
    url, app = info["url"], info["app_name"]
    while httpx.get(f"{url}/ready", timeout=10).status_code != 200:
        time.sleep(0.5)
    try:
        routes = asyncio.run(learn_routes(url))
        asyncio.run(run_pairs(url, app, config, routes, 16, 4, args.max_tokens, "auto", "warm-up"))
        results: dict[str, list[dict[str, float]]] = {}
        for c in args.concurrency:
            for model in ("auto", "pinned"):
                results[f"{model} c={c}"] = asyncio.run(
                    run_pairs(url, app, config, routes, args.requests, c, args.max_tokens, model, f"{model} c={c}"))
        speed = asyncio.run(decode_speed(url, app, config, 128, 3))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nGateway overhead, {args.config}, max_tokens={args.max_tokens}, {args.requests} pairs per level "
          f"(overhead = coe-auto over HTTP minus the same request on the expert's handle)")
    print("(auto: model coe-auto, includes routing; pinned: model=<expert>, HTTP + ingress + handle hop only)")
    print("| run | gateway p50 ms | direct p50 ms | overhead p50 ms | overhead p99 ms | routing p50 ms | gateway/direct p50 |")
    print("|---|---|---|---|---|---|---|")
    for c, rows in results.items():
        gw = [r["gateway_ms"] for r in rows]
        d = [r["direct_ms"] for r in rows]
        ov = [r["overhead_ms"] for r in rows]
        rt = [r["route_ms"] for r in rows]
        print(f"| {c} | {pct(gw, 50):.1f} | {pct(d, 50):.1f} | {pct(ov, 50):.1f} | {pct(ov, 99):.1f} | {pct(rt, 50):.1f} | "
              f"{pct(gw, 50) / pct(d, 50):.2f}x |")
    print(f"\nCPU engine decode speed (expert 'general', {int(speed['tokens'])} tokens, greedy, median of 3): "
          f"direct {speed['direct_tps']:.1f} tok/s, through the gateway {speed['gateway_tps']:.1f} tok/s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "gateway_overhead.csv").open("w") as f:
        f.write("run,gateway_ms,direct_ms,overhead_ms,route_ms,completion_tokens\n")
        for name, rows in results.items():
            for r in rows:
                f.write(f"{name},{r['gateway_ms']:.3f},{r['direct_ms']:.3f},{r['overhead_ms']:.3f},"
                        f"{r['route_ms']:.3f},{r['completion_tokens']}\n")
    levels = list(args.concurrency)
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.5), squeeze=False)
    for ax, c in zip(axes[0], levels):
        names = [n for n in results if n.endswith(f"c={c}")]
        ax.boxplot([[r["overhead_ms"] for r in results[n]] for n in names], tick_labels=names, showfliers=True)
        ax.axhline(15, color="red", linestyle="--", label="target p50 15 ms")
        ax.set_title(f"concurrency {c}")
        ax.set_ylabel("gateway overhead per request (ms)")
        ax.legend()
    fig.suptitle(f"coe gateway overhead ({args.config}, max_tokens={args.max_tokens}; auto includes routing)")
    fig.tight_layout()
    png = out / "gateway_overhead.png"
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
