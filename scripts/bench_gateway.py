#!/usr/bin/env python
"""Gateway overhead benchmark: the same request through `coe-auto` and straight to the chosen expert.

Starts its own Ray Serve with a config (default cpu-default) on a free loopback port, then, in one run:
  * for each query, sends it through HTTP `coe-auto` (HTTP + routing + handle hop + generation) and the
    identical engine request straight to the chosen expert's deployment handle (generation only), in pairs;
  * reports p50/p99 of the per-pair difference (the gateway's overhead) at concurrency 1 and 16;
  * measures the CPU engine's decode speed (tokens/s) through the gateway and direct.
Writes a table to stdout and a PNG (overhead distributions) to --out.

    .venv/bin/python scripts/bench_gateway.py [--config cpu-default] [--requests 200] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

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


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


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
    return {"gateway_tps": statistics.median(gw_tps), "direct_tps": statistics.median(direct_tps),
            "tokens": float(res["completion_tokens"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--requests", type=int, default=200, help="pairs per run (concurrency x auto/pinned)")
    ap.add_argument("--max-tokens", type=int, default=1, help="tokens per request in the overhead runs")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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
