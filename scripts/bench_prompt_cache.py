#!/usr/bin/env python
"""What the llama.cpp prompt cache (coe.engines.llama_cpp.PromptCache) costs and saves: the time to save and to
restore a conversation's KV state against the time to evaluate its tokens again, on an expert of a config.

    .venv/bin/python scripts/bench_prompt_cache.py [--config cpu-default] [--expert general] [--tokens 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from coe.config import load_config
from coe.engines.llama_cpp import LlamaCppEngine, PromptCache
from coe.stats import percentile as pct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-default")
    ap.add_argument("--expert", default="general")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    engine = LlamaCppEngine(load_config(args.config).expert(args.expert))
    asyncio.run(engine.start())
    llm = engine._llm
    tokens = llm.tokenize(("The ocean covers most of the planet and holds most of its water. " * 40).encode())
    tokens = tokens[: args.tokens]
    cache = PromptCache(2**30, min_tokens=1)
    evaluate, save, restore = [], [], []
    for _ in range(args.reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)
        evaluate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cache.save(llm)
        save.append(time.perf_counter() - t0)
        llm.reset()  # another request took the context
        t0 = time.perf_counter()
        got = cache.restore_longer_prefix(llm, tokens + [tokens[0]])
        restore.append(time.perf_counter() - t0)
        assert got == len(tokens), got
    state = len(next(iter(cache._states.values())))
    print(f"{args.expert} ({args.config}), {len(tokens)} tokens, state {state / 1e6:.1f} MB, median of {args.reps}:")
    print("| evaluate ms | save ms | restore ms | evaluate / (save + restore) |\n|---|---|---|---|")
    e, s, r = (pct(x, 50) * 1e3 for x in (evaluate, save, restore))
    print(f"| {e:.1f} | {s:.1f} | {r:.1f} | {e / (s + r):.0f}x |")


if __name__ == "__main__":
    main()
