#!/usr/bin/env python
"""Speculative decoding by prompt lookup on the CPU experts: tokens/s with and without, in one run.

The same engine code the service uses (coe.engines.llama_cpp.LlamaCppEngine) loads cpu-default's `general`
expert (SmolLM2-135M-Instruct GGUF, 1 thread) twice: as configured, and with `llama_cpp.prompt_lookup_tokens`.
Each prompt is answered greedily by both, alternating which goes first; the answers must be identical
(speculation may change speed, never greedy output). Prompts come in three kinds: editing code given in the
prompt and translating text full of names and numbers (the answer copies from the prompt: lookup should help),
and free chat (nothing to copy: it should not).

    .venv/bin/python scripts/bench_speculative.py [--tokens 10] [--max-tokens 160] [--reps 2] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from tqdm import tqdm

from coe.stats import percentile

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax
'''
PROMPTS: dict[str, list[str]] = {
    "edit code": [
        f"Rename the variable `subtotal` to `net` in this function and return the whole function:\n\n{CODE}",
        f"Add type hints to this function and return the whole function:\n\n{CODE}",
        f"Rewrite this function with the same logic, adding a docstring. Return the whole function:\n\n{CODE}",
    ],
    "translate with names": [
        "Translate to French, keeping every name and number: On 12 March 2024, Dr. Anna Schmidt flew from "
        "Frankfurt to Montreal on flight LH 474, seat 23C, and paid 1,249.50 EUR.",
        "Translate to Spanish, keeping names and numbers: The meeting with Tom Baker and Priya Natarajan moved "
        "from room 4B to room 7A at 14:30, and the budget of 85,000 USD for Project Orion stays the same.",
        "Translate to German, keeping names and numbers: Order 55-1832 for Maria Lopez, 3 chairs at 79.99 each "
        "and 1 table at 349.00, ships from Rotterdam on 2 June.",
    ],
    "free chat": [
        "Give me some advice for staying focused when working from home.",
        "Why do cats like to sit in boxes?",
        "Write a short story about a lighthouse keeper.",
    ],
}


async def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    from coe.config import load_config
    from coe.engines import EnginePrompt, SamplingParams
    from coe.engines.llama_cpp import LlamaCppEngine

    base = load_config("cpu-default").expert("general")
    spec = base.model_copy(deep=True)
    assert spec.llama_cpp is not None
    spec.llama_cpp.prompt_lookup_tokens = args.tokens
    engines = {"off": LlamaCppEngine(base), "prompt lookup": LlamaCppEngine(spec)}
    for e in engines.values():
        await e.start()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, top_p=1.0)
    out: dict[str, dict[str, list[float]]] = {k: {m: [] for m in engines} for k in PROMPTS}
    mismatches = 0
    total = sum(len(p) for p in PROMPTS.values()) * args.reps
    with tqdm(total=total, desc="prompts") as bar:
        for rep in range(args.reps):
            for kind, prompts in PROMPTS.items():
                for i, text in enumerate(prompts):
                    prompt = EnginePrompt(messages=({"role": "user", "content": text},))
                    order = list(engines) if (rep + i) % 2 == 0 else list(reversed(engines))
                    answers = {}
                    for mode in order:
                        t0 = time.perf_counter()
                        r = await engines[mode].generate(prompt, params)
                        out[kind][mode].append(r.completion_tokens / (time.perf_counter() - t0))
                        answers[mode] = r.text
                    mismatches += answers["off"] != answers["prompt lookup"]
                    bar.update(1)
    for e in engines.values():
        await e.shutdown()
    if mismatches:
        print(f"WARNING: {mismatches} greedy answers differ between the two engines")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10, help="prompt_lookup_tokens (draft length)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    print(f"\nPrompt-lookup speculative decoding, SmolLM2-135M (cpu-default 'general', 1 thread), greedy, "
          f"max_tokens={args.max_tokens}, draft {args.tokens} tokens, {args.reps} reps")
    print("| prompts | off tok/s (median) | prompt lookup tok/s (median) | speed-up |")
    print("|---|---|---|---|")
    rows = []
    for kind, modes in res.items():
        off, on = percentile(modes["off"], 50), percentile(modes["prompt lookup"], 50)
        rows.append((kind, off, on))
        print(f"| {kind} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, label="off")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, label=f"prompt lookup ({args.tokens} tokens)")
    ax.set_xticks(list(xs), [r[0] for r in rows])
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Prompt-lookup speculative decoding on SmolLM2-135M, 1 CPU thread")
    ax.legend()
    fig.tight_layout()
    png = out / "speculative_decoding.png"
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
