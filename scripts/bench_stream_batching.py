#!/usr/bin/env python
"""Stream chunk batching between the expert replicas and the ingress (`experts[].stream_batch_ms`).

For each interval given, starts coe (cpu-default, direct ingress) with every expert's `stream_batch_ms` set to it,
then streams `--streams` answers of `--tokens` tokens at once, spread over all experts (pinned), and measures:
time to first token and the gaps between SSE chunks as the client sees them, completion tokens per second over
the pass, and the CPU seconds the ingress and expert processes spent per 1,000 streamed tokens (/proc). Prints a
table and writes bench-results/stream_batching/{stream_batching.csv,png}.

    .venv/bin/python scripts/bench_stream_batching.py [--values 0 10 25 50] [--streams 24] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coe.stats import percentile as pct  # noqa: E402

PROMPTS = {"general": "Write a long essay about the ocean.",
           "code": "Write a Python class for a bank account with deposit and withdraw methods, with docstrings.",
           "translation": "Translate to French: the old man walked slowly along the river, thinking about his "
                          "childhood, his friends and the long summers of his youth."}


def cpu_seconds(match: list[str]) -> dict[str, float]:
    """CPU seconds (user + system) of the processes whose command line contains one of `match`."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for m in match:
            if m in cmd:
                out[m] = out.get(m, 0.0) + (int(st[11]) + int(st[12])) / tick
    return out


async def stream_one(client: httpx.AsyncClient, url: str, expert: str, tokens: int) -> dict[str, Any]:
    body = {"model": expert, "stream": True, "max_tokens": tokens, "temperature": 0.0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROMPTS[expert]}]}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    completion = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                completion = obj["usage"]["completion_tokens"]
            delta = (obj.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                arrivals.append(time.perf_counter() - t0)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] if arrivals else float("nan"), "gaps": gaps, "chunks": len(arrivals),
            "tokens": completion, "total": time.perf_counter() - t0}


async def one_pass(url: str, streams: int, tokens: int) -> tuple[list[dict[str, Any]], float]:
    experts = list(PROMPTS)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams)) as client:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*[stream_one(client, url, experts[i % len(experts)], tokens)
                                      for i in range(streams)])
        return list(rows), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=float, nargs="+", default=[0, 10, 25, 50], help="stream_batch_ms to compare")
    ap.add_argument("--streams", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "bench-results/stream_batching"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from coe.cli import default_profile, ensure_router_artifact, free_port, start_local_serve
    from coe.config import load_config

    results = []
    for v in args.values:
        config = load_config("cpu-default")
        ensure_router_artifact(config, train_from=default_profile("cpu-default"))
        for e in config.experts:
            e.stream_batch_ms = v
        info = start_local_serve(config, port=free_port(), dashboard=False, log_to_driver=False,
                                 direct_ingress=True)
        try:
            while httpx.get(f"{info['url']}/ready", timeout=10).status_code != 200:
                time.sleep(0.5)
            asyncio.run(one_pass(info["url"], 3, 8))  # warm-up
            names = ["ServeReplica:coe:CoeIngress", *(f"ServeReplica:coe:{e}" for e in PROMPTS)]
            before = cpu_seconds(names)
            rows, wall = asyncio.run(one_pass(info["url"], args.streams, args.tokens))
            after = cpu_seconds(names)
        finally:
            serve.shutdown()
            ray.shutdown()
        tokens = sum(r["tokens"] for r in rows)
        gaps = [g for r in rows for g in r["gaps"]]
        cpu_ing = after.get(names[0], 0) - before.get(names[0], 0)
        cpu_exp = sum(after.get(n, 0) - before.get(n, 0) for n in names[1:])
        res = {"stream_batch_ms": v, "ttft_p50_ms": pct([r["ttft"] for r in rows], 50) * 1e3,
               "gap_p50_ms": pct(gaps, 50) * 1e3, "gap_p99_ms": pct(gaps, 99) * 1e3,
               "chunks_per_stream": sum(r["chunks"] for r in rows) / len(rows), "tokens_per_s": tokens / wall,
               "ingress_cpu_s_per_1k_tokens": 1e3 * cpu_ing / tokens,
               "experts_cpu_s_per_1k_tokens": 1e3 * cpu_exp / tokens}
        results.append(res)
        print(res, flush=True)

    print(f"\nStream chunk batching, cpu-default, {args.streams} concurrent streams of {args.tokens} tokens spread "
          "over the 3 experts (pinned), direct ingress")
    print("| stream_batch_ms | TTFT p50 ms | chunk gap p50 / p99 ms | chunks per stream | tokens/s | ingress CPU s "
          "per 1k tokens | experts CPU s per 1k tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stream_batch_ms']:g} | {r['ttft_p50_ms']:.0f} | {r['gap_p50_ms']:.1f} / {r['gap_p99_ms']:.1f} | "
              f"{r['chunks_per_stream']:.1f} | {r['tokens_per_s']:.1f} | {r['ingress_cpu_s_per_1k_tokens']:.3f} | "
              f"{r['experts_cpu_s_per_1k_tokens']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "stream_batching.csv").open("w") as f:
        f.write(",".join(results[0]) + "\n")
        for r in results:
            f.write(",".join(f"{x:.4f}" for x in r.values()) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["stream_batch_ms"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(xs, [r["ingress_cpu_s_per_1k_tokens"] for r in results], "o-", label="ingress")
    axes[0].plot(xs, [r["experts_cpu_s_per_1k_tokens"] for r in results], "o-", label="experts")
    axes[0].set_ylabel("CPU s per 1k streamed tokens")
    axes[0].legend()
    axes[1].plot(xs, [r["tokens_per_s"] for r in results], "o-")
    axes[1].set_ylabel("completion tokens/s (all streams)")
    axes[2].plot(xs, [r["ttft_p50_ms"] for r in results], "o-", label="TTFT p50")
    axes[2].plot(xs, [r["gap_p99_ms"] for r in results], "o-", label="chunk gap p99")
    axes[2].set_ylabel("ms")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("stream_batch_ms")
    fig.suptitle(f"Stream chunk batching: {args.streams} streams x {args.tokens} tokens, cpu-default")
    fig.tight_layout()
    fig.savefig(out / "stream_batching.png", dpi=110)
    print(f"plot: {out / 'stream_batching.png'}")


if __name__ == "__main__":
    main()
