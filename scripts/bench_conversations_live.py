#!/usr/bin/env python
"""Multi-turn conversations through the real service: routing (last turn, conversation, stickiness) and the time to
first token of turns 2+ with and without replica affinity and the llama.cpp prompt cache.

Conversations of 2-4 turns are built from the test split of a measured profile (default cpu-default's items, seeded):
  * the first turn is a suite item; each later turn is
    - a follow-up that depends on the answer just given ("Are you sure? Check your calculation...", "Now make that
      function shorter..."), scored against the item it follows (code: its tests; math: its number; general: its
      option or answer). Translation has none: its expert (Gemma-3-270M, a base model) sees only the last request;
    - another item of the same suite, or an item of another suite (a change of domain on purpose).
  * every assistant message is the service's real answer (greedy: temperature 0, so the variants' conversations
    stay close and the TTFT comparison is paired by conversation, turn and expert).
Each variant is one fresh coe (cpu-default, every expert with 2 replicas, direct ingress), sent the conversations
interleaved (`--window` at a time, one request in flight: each conversation's turns have others' between them,
as on a shared service), streamed with x-coe-session. Variants:
  * routing: "last turn" (conversations.turns 1, no stickiness), "conversation" (no stickiness), "conversation +
    sticky" (the config: switch_margin 0.05, chosen on the train split by scripts/bench_conversations.py);
  * serving, all with conversation + sticky routing: replica affinity off, the prompt cache off, both off.
The load controller is off (t stays 0): routing is compared, not load shifting.
The answers are scored by the suites' scorers (code in the sandbox). Prints two tables, writes
bench-results/conversations_live/{turns.jsonl,summary.csv,conversations_live.png}.

    .venv/bin/python scripts/bench_conversations_live.py [--conversations 30] [--window 6] [--max-tokens 192]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coe.stats import percentile as pct  # noqa: E402

FOLLOW_UPS = {
    "code": ["Now make that function shorter. Keep its name and signature, and reply with the whole function in one "
             "```python code block.",
             "Add a short docstring and a comment to that function. Reply with the whole function in one ```python "
             "code block."],
    "math": ["Are you sure? Check your calculation step by step and end with: The answer is <number>.",
             "Explain how you got that, then end with: The answer is <number>."],
    "general": ["Are you sure? Give your final answer again, as before.",
                "Check that again and give your final answer in the same form."],
}
ROUTING = {"last turn": {"turns": 1, "sticky": False}, "conversation": {"sticky": False}, "conversation + sticky": {}}
SERVING = {"affinity + prompt cache": (True, True), "no affinity": (False, True), "no prompt cache": (True, False),
           "neither": (False, False)}


def build(items: list[Any], n: int, seed: int) -> list[list[dict[str, Any]]]:
    """Conversations: lists of turns {kind, text, item} (item: the suite Item the turn is scored against)."""
    rng = random.Random(seed)
    by_suite: dict[str, list[Any]] = {}
    for it in items:
        by_suite.setdefault(it.suite, []).append(it)
    suites = sorted(by_suite)
    out = []
    for _ in range(n):
        s = rng.choice(suites)
        item = rng.choice(by_suite[s])
        turns = [{"kind": "first", "text": item.question, "item": item}]
        for _ in range(rng.choice([1, 2, 3])):
            u = rng.random()
            if u < 0.4 and s in FOLLOW_UPS:
                turns.append({"kind": "follow-up", "text": rng.choice(FOLLOW_UPS[s]), "item": item})
                continue
            if u >= 0.7:
                s = rng.choice([x for x in suites if x != s])
            item = rng.choice(by_suite[s])
            turns.append({"kind": "same-domain" if u < 0.7 else "switch", "text": item.question, "item": item})
        out.append(turns)
    return out


async def turn(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], session: str,
               max_tokens: int) -> dict[str, Any]:
    """One streamed turn: the answer, who answered, the time to the first content delta."""
    body = {"model": "coe-auto", "messages": messages, "stream": True, "temperature": 0.0, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-coe-session": session}) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        h = r.headers
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            delta = (obj.get("choices") or [{}])[0].get("delta") or {}
            if delta.get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(delta["content"])
    return {"expert": h.get("x-coe-expert"), "reason": h.get("x-coe-route-reason", ""),
            "replica": h.get("x-coe-replica"), "ttft_ms": None if ttft is None else ttft * 1e3,
            "total_ms": (time.perf_counter() - t0) * 1e3, "prompt_tokens": usage.get("prompt_tokens"),
            "answer": "".join(parts)}


async def run_variant(url: str, convs: list[list[dict[str, Any]]], window: int, max_tokens: int, bar: Any
                      ) -> list[list[dict[str, Any]]]:
    """All conversations, `window` at a time, their turns interleaved; one request in flight."""
    results: list[list[dict[str, Any]]] = [[] for _ in convs]
    async with httpx.AsyncClient(timeout=600) as client:
        for w0 in range(0, len(convs), window):
            group = list(range(w0, min(w0 + window, len(convs))))
            sessions = {i: f"bench-{uuid.uuid4().hex}" for i in group}
            history: dict[int, list[dict[str, str]]] = {i: [] for i in group}
            for k in range(max(len(convs[i]) for i in group)):
                for i in group:
                    if k >= len(convs[i]) or (results[i] and "error" in results[i][-1]):
                        continue
                    history[i].append({"role": "user", "content": convs[i][k]["text"]})
                    res = await turn(client, url, history[i], sessions[i], max_tokens)
                    results[i].append(res)
                    if "answer" in res:
                        history[i].append({"role": "assistant", "content": res["answer"] or "..."})
                    bar.update(1)
    return results


def serve_variant(name: str, conv_overrides: dict[str, Any], affinity: bool, prompt_cache: bool,
                  convs: list[list[dict[str, Any]]], args: argparse.Namespace, bar: Any) -> list[list[dict[str, Any]]]:
    import ray
    from ray import serve

    from coe.cli import free_port, start_local_serve, wait_ready
    from coe.config import AutoscalingConfig, load_config

    config = load_config(args.config)
    for e in config.experts:
        e.autoscaling = AutoscalingConfig(min_replicas=2, max_replicas=2)
        e.replica_affinity = affinity
        if e.llama_cpp is not None and not prompt_cache:
            e.llama_cpp.prompt_cache_mb = 0
    for k, v in conv_overrides.items():
        setattr(config.conversations, k, v)
    # t stays at router.threshold (0): a 1-thread expert's seconds-long answers are load to the controller even
    # one at a time, and t moving with each variant's timing would mix load shifting into the routing comparison.
    config.controller.enabled = False
    # Six 1-thread llama.cpp replicas on two cores: Ray's CPU count is logical here, one request runs at a time.
    info = start_local_serve(config, port=free_port(), num_cpus=8, dashboard=False, log_to_driver=False,
                             direct_ingress=True)
    try:
        if not wait_ready(info["url"], 300):
            raise SystemExit(f"{name}: coe was not ready within 300 s (Ray's logs: /tmp/ray/session_latest/logs)")
        bar.set_description(name)
        return asyncio.run(run_variant(info["url"], convs, args.window, args.max_tokens, bar))
    finally:
        serve.shutdown()
        ray.shutdown()


def score_all(convs: list[list[dict[str, Any]]], runs: dict[str, list[list[dict[str, Any]]]]) -> None:
    """Adds `score` to every answered turn, by the turn's item's scorer."""
    from coe.scoring import Scorers

    scorers = Scorers()
    todo = [(res, t) for r in runs.values() for conv, rs in zip(convs, r) for t, res in zip(conv, rs)
            if "answer" in res]
    for res, t in tqdm(todo, desc="scoring", unit="turn"):
        it = t["item"]
        res["score"] = scorers.score(it.scorer, res["answer"], it.reference, it.meta)


def switches(rs: list[dict[str, Any]]) -> list[bool]:
    return [a.get("expert") != b.get("expert") for a, b in zip(rs, rs[1:]) if "expert" in a and "expert" in b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--profile", default=str(ROOT / "router_models/profiles/cpu-default"))
    ap.add_argument("--conversations", type=int, default=30)
    ap.add_argument("--window", type=int, default=6, help="conversations interleaved at a time")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=[*ROUTING, *[s for s in SERVING if s != "affinity + prompt cache"]],
                    help="which to run ('conversation + sticky' is also 'affinity + prompt cache')")
    ap.add_argument("--out", default=str(ROOT / "bench-results/conversations_live"))
    ap.add_argument("--report-only", action="store_true", help="print and plot the last run's turns.jsonl again")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        runs_: dict[str, dict[int, list[dict[str, Any]]]] = {}
        for line in (out / "turns.jsonl").read_text().splitlines():
            row = json.loads(line)
            runs_.setdefault(row["variant"], {}).setdefault(row["conversation"], []).append(row)
        n = max(len(r) for r in runs_.values())
        report(n, {k: [r.get(i, []) for i in range(n)] for k, r in runs_.items()}, out)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from router_models.profile import read_jsonl
    from router_models.suites import load_suite

    split = {(r["suite"], r["id"]) for r in read_jsonl(Path(args.profile) / "items.jsonl") if r["split"] == "test"}
    items = [it for s in sorted({s for s, _ in split}) for it in load_suite(s).items if (it.suite, it.id) in split]
    convs = build(items, args.conversations, args.seed)
    n_turns = sum(len(c) for c in convs)
    print(f"{len(convs)} conversations, {n_turns} turns, from {len(items)} test items of {args.profile}")

    runs: dict[str, list[list[dict[str, Any]]]] = {}
    with tqdm(total=n_turns * len(args.variants), unit="turn") as bar:
        for name in args.variants:
            if name in ROUTING:
                runs[name] = serve_variant(name, ROUTING[name], True, True, convs, args, bar)
            else:
                aff, cache = SERVING[name]
                runs[name] = serve_variant(name, {}, aff, cache, convs, args, bar)
    score_all(convs, runs)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "turns.jsonl").open("w") as f:
        for name, r in runs.items():
            for ci, (conv, rs) in enumerate(zip(convs, r)):
                for k, (t, res) in enumerate(zip(conv, rs)):
                    f.write(json.dumps({"variant": name, "conversation": ci, "turn": k + 1, "kind": t["kind"],
                                        "item": f"{t['item'].suite}/{t['item'].id}", **res}) + "\n")
    report(len(convs), runs, out)


def report(n_convs: int, runs: dict[str, list[list[dict[str, Any]]]], out: Path) -> None:
    errors = {n: sum("error" in x for rs in r for x in rs) for n, r in runs.items()}
    print(f"\nerrors: {errors}")
    print("\nRouting (accuracy: the suites' scorers on the real answers, x100; switch rate: turns 2+ answered by "
          "another expert than the turn before)")
    print("| routing | accuracy | minus last turn (paired SE) | turn 1 | turn 2 | turn 3 | turn 4 | switch rate % |"
          "\n|---|---|---|---|---|---|---|---|")
    rows = []
    base = {(ci, k): x.get("score", 0.0) for ci, rs in enumerate(runs.get("last turn", [])) for k, x in enumerate(rs)}
    for name in [n for n in ROUTING if n in runs]:
        r = runs[name]
        flat = {(ci, k): x.get("score", 0.0) for ci, rs in enumerate(r) for k, x in enumerate(rs)}
        per_turn = {k + 1: 100 * float(np.mean([rs[k].get("score", 0.0) for rs in r if len(rs) > k])) for k in range(4)}
        sw = 100 * float(np.mean([s for rs in r for s in switches(rs)]))
        keys = sorted(set(flat) & set(base))
        d = np.array([flat[k] - base[k] for k in keys])
        diff = f"{100 * d.mean():+.1f} ({100 * float(d.std(ddof=1) / np.sqrt(len(d))):.1f})" if len(d) > 1 and name != "last turn" else ""
        acc = 100 * float(np.mean(list(flat.values())))
        rows.append({"variant": name, "accuracy": acc, "switch_rate": sw, **{f"turn{k}": v for k, v in per_turn.items()}})
        print(f"| {name} | {acc:.1f} | {diff} | "
              + " | ".join(f"{per_turn[k]:.1f}" for k in (1, 2, 3, 4)) + f" | {sw:.1f} |")

    print("\nTime to first token, turns 2+ (client-side, streamed, one request in flight; 'same replica': turns 2+ "
          "on the expert of the turn before that its replica answered again)")
    print("| variant | TTFT p50 ms | TTFT mean ms | TTFT p90 ms | ratio of mean to affinity + prompt cache (paired) | "
          "same replica % | prompt tokens mean |\n|---|---|---|---|---|---|---|")
    ref_name = "conversation + sticky"
    ref = {(ci, k): x for ci, rs in enumerate(runs.get(ref_name, [])) for k, x in enumerate(rs) if k > 0}
    ttfts: dict[str, list[float]] = {}
    for name, r in runs.items():
        later = {(ci, k): x for ci, rs in enumerate(r) for k, x in enumerate(rs) if k > 0 and x.get("ttft_ms")}
        v = [x["ttft_ms"] for x in later.values()]
        ttfts[name] = v
        same = [b["replica"] == a["replica"] for rs in r for a, b in zip(rs, rs[1:])
                if a.get("expert") == b.get("expert") and a.get("replica") and b.get("replica")]
        # Paired: the same turn of the same conversation answered by the same expert (the earlier answers are
        # greedy, but a restored prompt state may round differently from a fresh evaluation, so wording can drift).
        pairs = [(x["ttft_ms"], ref[key]["ttft_ms"]) for key, x in later.items()
                 if key in ref and ref[key].get("ttft_ms") and ref[key].get("expert") == x.get("expert")]
        ratio = (sum(a for a, _ in pairs) / sum(b for _, b in pairs)) if pairs else float("nan")
        label = "affinity + prompt cache (conversation + sticky)" if name == ref_name else name
        ptok = float(np.mean([x["prompt_tokens"] for x in later.values() if x.get("prompt_tokens")] or [np.nan]))
        print(f"| {label} | {pct(v, 50):.0f} | {np.mean(v):.0f} | {pct(v, 90):.0f} | {ratio:.2f} ({len(pairs)} pairs) | "
              f"{100 * np.mean(same) if same else float('nan'):.0f} | {ptok:.0f} |")
        row = next((x for x in rows if x["variant"] == name), None)
        if row is None:
            row = {"variant": name}
            rows.append(row)
        row.update({"ttft_p50_ms": pct(v, 50), "ttft_mean_ms": float(np.mean(v)), "ttft_ratio": ratio})

    cols = sorted({k for r in rows for k in r} - {"variant"})
    with (out / "summary.csv").open("w") as f:
        f.write("variant," + ",".join(cols) + "\n")
        for r in rows:
            f.write(r["variant"] + "," + ",".join(f"{r[c]:.3f}" if c in r else "" for c in cols) + "\n")
    plot(rows, ttfts, out / "conversations_live.png", n_convs)


def plot(rows: list[dict[str, Any]], ttfts: dict[str, list[float]], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    routing = [r for r in rows if r["variant"] in ROUTING and "accuracy" in r]
    for r in routing:
        axes[0].plot([1, 2, 3, 4], [r[f"turn{k}"] for k in (1, 2, 3, 4)], "o-", label=r["variant"])
    axes[0].set_xlabel("turn")
    axes[0].set_xticks([1, 2, 3, 4])
    axes[0].set_ylabel("accuracy (suite scorers, x100)")
    axes[0].legend(fontsize=8)
    axes[1].bar(range(len(routing)), [r["switch_rate"] for r in routing])
    axes[1].set_xticks(range(len(routing)), [r["variant"].replace(" + ", "\n+ ") for r in routing], fontsize=8)
    axes[1].set_ylabel("turns 2+ on another expert (%)")
    for k, v in ttfts.items():
        xs = np.sort(np.asarray(v, dtype=float))
        label = "conversation + sticky (affinity + prompt cache)" if k == "conversation + sticky" else k
        axes[2].plot(xs, np.arange(1, len(xs) + 1) / max(1, len(xs)), label=label,
                     lw=2.2 if k == "conversation + sticky" else 1.2)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("time to first token, turns 2+ (ms, log)")
    axes[2].set_ylabel("fraction of turns")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Conversations through coe (cpu-default, 2 replicas per expert, {n} conversations)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
