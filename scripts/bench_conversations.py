#!/usr/bin/env python
"""Routing multi-turn conversations: the last turn alone, the conversation, and the conversation with stickiness.

Offline, on a measured profile (default cpu-default's): conversations of 2-4 turns are built from the profile's items
(each turn a suite item, scored per expert by the suite's scorer when the profile was measured), seeded:
  * a "follow-up" turn is a generic line that depends on the previous answer ("Thanks! Now make it shorter."); its
    score per expert is the previous item's (the expert good at the question is good at revising its answer);
  * a "same-domain" turn is another item of the previous turn's suite; a "switch" turn an item of another suite;
  * each assistant message is the profiled answer of the expert the variant chose for that turn.
A RouterDC router is trained on the profile's train split; conversations from the train split choose the switch
margin (the largest whose mean turn accuracy stays within one paired standard error of the most accurate margin's:
keep conversations on their expert, and their prompt cache, as long as quality allows), those from the test split
are reported: switch rate (turns 2+ answered by another expert than the turn before) and accuracy per turn.
Time to first token with replica affinity and the prompt cache needs the live service:
scripts/bench_conversations_live.py.

    .venv/bin/python scripts/bench_conversations.py [--profile router_models/profiles/cpu-default] [--conversations 300]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FOLLOW_UPS = ["Thanks! Now make it shorter.", "Can you explain that step by step?", "Are you sure? Check it again.",
              "Now give me a version with comments.", "Why is that the answer?"]
MARGINS = [0.0, 0.02, 0.05, 0.1, 0.2, 0.5]


def build(rows: list[dict[str, Any]], n: int, seed: int) -> list[list[dict[str, Any]]]:
    """Conversations: lists of turns {kind, text, scores, key}."""
    rng = random.Random(seed)
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_suite.setdefault(r["group"], []).append(r)
    suites = sorted(by_suite)
    out = []
    for _ in range(n):
        s = rng.choice(suites)
        item = rng.choice(by_suite[s])
        turns = [{"kind": "first", "text": item["question"], "scores": item["scores"], "key": (s, item["id"])}]
        for _ in range(rng.choice([1, 2, 3])):
            u = rng.random()
            if u < 0.4:
                prev = turns[-1]
                turns.append({"kind": "follow-up", "text": rng.choice(FOLLOW_UPS), "scores": prev["scores"],
                              "key": prev["key"]})
            else:
                if u >= 0.7:
                    s = rng.choice([x for x in suites if x != s])
                item = rng.choice(by_suite[s])
                turns.append({"kind": "same-domain" if u < 0.7 else "switch", "text": item["question"],
                              "scores": item["scores"], "key": (s, item["id"])})
        out.append(turns)
    return out


def run(router: Any, convs: list[list[dict[str, Any]]], answers: dict[str, Any], variant: str, margin: float
        ) -> list[list[tuple[str, float]]]:
    """Per conversation, per turn: (expert, score)."""
    from coe.config import ConversationConfig
    from coe.conversations import stick
    from coe.protocol import ChatCompletionRequest

    conv_cfg = ConversationConfig(turns=1) if variant == "last turn" else ConversationConfig()
    out = []
    for turns in convs:
        msgs: list[dict[str, str]] = []
        prev: str | None = None
        res = []
        for t in turns:
            msgs.append({"role": "user", "content": t["text"]})
            req = ChatCompletionRequest.model_validate({"model": "coe-auto", "messages": msgs})
            d = router.route_each([req.routed_text(conv_cfg)], [0.0])[0]
            if variant == "sticky":
                d, _ = stick(d, prev, margin)
            prev = d.expert
            res.append((d.expert, float(t["scores"][d.expert])))
            answer = (answers.get(d.expert, {}).get(t["key"]) or {}).get("answer") or "..."
            msgs.append({"role": "assistant", "content": answer[:2000]})
        out.append(res)
    return out


def summary(res: list[list[tuple[str, float]]]) -> dict[str, Any]:
    scores = [s for conv in res for _, s in conv]
    later = [(conv[i - 1][0], conv[i][0]) for conv in res for i in range(1, len(conv))]
    per_turn = {k: [conv[k][1] for conv in res if len(conv) > k] for k in range(4)}
    return {"accuracy": 100 * float(np.mean(scores)), "switch_rate": 100 * float(np.mean([a != b for a, b in later])),
            "per_turn": {k + 1: 100 * float(np.mean(v)) for k, v in per_turn.items() if v}, "flat": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(ROOT / "router_models/profiles/cpu-default"))
    ap.add_argument("--conversations", type=int, default=300, help="per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench-results/conversations"))
    args = ap.parse_args()
    from coe.routerdc import RouterDCRouter, save_artifact
    from router_models.profile import load_profile, matrix_rows
    from router_models.profile_report import train_profile_router

    prof = Path(args.profile)
    loaded = load_profile(prof)
    rows = matrix_rows(prof, loaded)
    answers = loaded[2]
    model, _, _ = train_profile_router(prof, split="train", fallback_expert="general")
    with tempfile.TemporaryDirectory() as tmp:
        router = RouterDCRouter(save_artifact(Path(tmp) / "r", model), cache_size=100_000)
    splits = {sp: build([r for r in rows if r["split"] == sp], args.conversations, args.seed + i)
              for i, sp in enumerate(("train", "test"))}

    # The switch margin, on the train conversations.
    train = splits["train"]
    base = summary(run(router, train, answers, "conversation", 0.0))
    sweep = {m: summary(run(router, train, answers, "sticky", m)) for m in MARGINS}
    best = max(MARGINS, key=lambda m: sweep[m]["accuracy"])
    chosen, rows_m = 0.0, []
    for m in MARGINS:
        diff = np.array(sweep[m]["flat"]) - np.array(sweep[best]["flat"])
        se = 100 * float(diff.std(ddof=1) / np.sqrt(len(diff))) if m != best else 0.0
        rows_m.append((m, sweep[m]["accuracy"], sweep[m]["switch_rate"], se))
        if sweep[m]["accuracy"] >= sweep[best]["accuracy"] - se:
            chosen = max(chosen, m)
    print(f"switch margin on {len(train)} train conversations (conversation routing without stickiness: "
          f"{base['accuracy']:.2f} accuracy, {base['switch_rate']:.1f}% switches)")
    print("| margin | accuracy | switch rate % | paired SE vs the best margin |\n|---|---|---|---|")
    for m, acc, sw, se in rows_m:
        print(f"| {m:g} | {acc:.2f} | {sw:.1f} | {se:.2f} |")
    print(f"chosen: {chosen:g} (the largest within one paired SE of the most accurate, {best:g})\n")

    test = splits["test"]
    results = {"last turn": summary(run(router, test, answers, "last turn", 0.0)),
               "conversation": summary(run(router, test, answers, "conversation", 0.0)),
               f"conversation + sticky ({chosen:g})": summary(run(router, test, answers, "sticky", chosen))}
    kinds = sum(t["kind"] != "first" for c in test for t in c)
    print(f"{len(test)} test conversations, {sum(len(c) for c in test)} turns ({kinds} after the first); accuracy is the "
          "chosen expert's measured score on the turn's item (a follow-up: on the item it follows), x100")
    print("| routing | accuracy | minus last turn (paired SE) | turn 1 | turn 2 | turn 3 | turn 4 | switch rate (turns 2+) % |"
          "\n|---|---|---|---|---|---|---|---|")
    ref = np.array(results["last turn"]["flat"])
    for name, s in results.items():
        pt = s["per_turn"]
        d = np.array(s["flat"]) - ref
        se = 100 * float(d.std(ddof=1) / np.sqrt(len(d)))
        print(f"| {name} | {s['accuracy']:.2f} | {100 * d.mean():+.2f} ({se:.2f}) | "
              + " | ".join(f"{pt.get(k, float('nan')):.2f}" for k in (1, 2, 3, 4)) + f" | {s['switch_rate']:.1f} |")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "conversations.csv").open("w") as f:
        f.write("routing,accuracy,switch_rate,turn1,turn2,turn3,turn4\n")
        for name, s in results.items():
            pt = s["per_turn"]
            f.write(f"{name},{s['accuracy']:.3f},{s['switch_rate']:.3f}," +
                    ",".join(f"{pt.get(k, float('nan')):.3f}" for k in (1, 2, 3, 4)) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in results.items():
        pt = s["per_turn"]
        axes[0].plot(list(pt), list(pt.values()), "o-", label=name)
    axes[0].set_xlabel("turn")
    axes[0].set_ylabel("accuracy (measured score x100)")
    axes[0].legend(fontsize=8)
    axes[1].bar(range(len(results)), [s["switch_rate"] for s in results.values()])
    axes[1].set_xticks(range(len(results)), [n.replace(" + ", "\n+ ") for n in results], fontsize=8)
    axes[1].set_ylabel("turns 2+ answered by another expert (%)")
    fig.suptitle(f"Routing conversations ({prof.name}, {len(test)} test conversations)")
    fig.tight_layout()
    fig.savefig(out / "conversations.png", dpi=110)
    print(f"plot: {out / 'conversations.png'}")


if __name__ == "__main__":
    main()
