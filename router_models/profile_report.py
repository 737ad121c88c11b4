"""`coe profile report DIR`: what the profile measured, and what a router trained on it buys.

Every number comes from the items every expert answered (the rows of `matrix.jsonl`):
- per expert and suite: accuracy (mean score, %), mean cost per item (USD, from real tokens and the expert's
  price), p50 latency, completion tokens, and the share cut off at max_tokens; per suite the oracle (the best
  expert per item);
- a RouterDC router trained on the train split only and evaluated on the test split, next to the best single
  expert (chosen on the train split), the cheapest expert and the oracle; accuracy is the mean over suites;
- the router's sweep of t (the cost/quality threshold) as accuracy against cost, plotted with every expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coe.errors import InvalidRequestError
from coe.stats import percentile
from router_models.profile import load_profile, matrix_rows

NEAR_ZERO = 0.05  # a suite where no expert reaches 5% is reported as such
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def profile_routing_data(out: Path, split: str | None = None, loaded: Any = None) -> Any:
    """The matrix rows (of one split, or all) as RoutingData, with the suite as each row's task."""
    from router_models.data import RoutingData

    loaded = loaded or load_profile(out)
    experts = list(loaded[0]["experts"])
    rows = [r for r in matrix_rows(out, loaded) if split is None or r["split"] == split]
    return RoutingData(name=split or "profile", questions=[r["question"] for r in rows], experts=experts,
                       scores=np.array([[r["scores"][e] for e in experts] for r in rows], dtype=np.float64).reshape(
                           len(rows), len(experts)),
                       tasks=[r["group"] for r in rows])


def train_profile_router(out: Path, *, split: str | None, fallback_expert: str | None, progress: bool = False
                         ) -> tuple[Any, dict[str, float], Any]:
    """A RouterDC router on the profile's rows (one split, or all); prices are the experts' per-1k-token prices."""
    from coe.encoder import SentenceEncoder
    from router_models.train import train_router

    loaded = load_profile(out)
    meta = loaded[0]
    data = profile_routing_data(out, split, loaded)
    if len(data) < 20:
        raise InvalidRequestError(f"{out}: only {len(data)} {split or ''} rows every expert answered; profile more "
                                  "items")
    encoder = SentenceEncoder(quantize="onnx-int8")
    prices = {e: float(info["price_per_1k_tokens"]) for e, info in meta["experts"].items()}
    model, report = train_router(data, encoder, prices=prices, fallback_expert=fallback_expert, progress=progress)
    return model, report, encoder


ROUTER_RECIPE = 4  # bump when train_profile_router (or train_router) changes what it trains


def profile_digest(out: Path, fallback_expert: str | None) -> str:
    """Identifies what a router trained from this profile learns from (rows, scores, prices, recipe)."""
    import hashlib
    import json

    loaded = load_profile(out)
    meta = loaded[0]
    raw = json.dumps([matrix_rows(out, loaded), {e: i["price_per_1k_tokens"] for e, i in meta["experts"].items()},
                      fallback_expert, ROUTER_RECIPE], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _p50(values: list[float]) -> float:
    return percentile(values, 50)


def build_report(out: Path, *, router_out: Path | None = None, progress: bool = False) -> dict[str, Any]:
    """The whole report as a JSON-able dict (see the module docstring)."""
    from coe.routerdc import decide_arrays, save_artifact
    from router_models.train import cached_encode

    loaded = load_profile(out)
    meta, _, answers = loaded
    experts = list(meta["experts"])
    rows = matrix_rows(out, loaded)
    if not rows:
        raise InvalidRequestError(f"{out}: no item was answered (and scored) by every expert yet")
    suites = sorted({r["group"] for r in rows})
    report: dict[str, Any] = {"profile": str(out), "config": meta["config"], "experts": experts,
                              "prices_per_1k_tokens": {e: meta["experts"][e]["price_per_1k_tokens"] for e in experts},
                              "split": meta["split"], "suites": {}}
    for s in suites:
        srows = [r for r in rows if r["group"] == s]
        per: dict[str, Any] = {}
        for e in experts:
            ans = [answers[e][(s, r["id"])] for r in srows]
            per[e] = {"accuracy": 100 * float(np.mean([a["score"] for a in ans])),
                      "cost_usd": float(np.mean([a["cost_usd"] for a in ans])),
                      "latency_p50_s": _p50([a["latency_s"] for a in ans]),
                      "completion_tokens": float(np.mean([a["completion_tokens"] for a in ans])),
                      "truncated_share": float(np.mean([a["finish_reason"] == "length" for a in ans]))}
        oracle = 100 * float(np.mean([max(r["scores"].values()) for r in srows]))
        info = meta["suites"].get(s, {})
        report["suites"][s] = {"n": len(srows), "n_train": sum(r["split"] == "train" for r in srows),
                               "source": info.get("source", ""), "license": info.get("license", ""),
                               "oracle": oracle, "experts": per,
                               "note": ("every expert scores near zero on this suite"
                                        if max(p["accuracy"] for p in per.values()) < NEAR_ZERO * 100 else None)}

    # Router: trained on the train split, evaluated on the test split.
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    if not test or len(train) < 20:
        report["router"] = {"skipped": f"{len(train)} train / {len(test)} test rows: profile more items"}
        return report
    model, train_report, encoder = train_profile_router(out, split="train", fallback_expert=meta.get(
        "router_fallback"), progress=progress)
    if router_out is not None:
        save_artifact(router_out, model)
    emb = cached_encode(encoder, [r["question"] for r in test], progress=progress)
    score = np.array([[r["scores"][e] for e in experts] for r in test])
    cost = np.array([[answers[e][(r["group"], r["id"])]["cost_usd"] for e in experts] for r in test])
    groups = np.array([r["group"] for r in test])
    test_suites = sorted(set(groups))

    def evaluate(chosen: np.ndarray) -> dict[str, Any]:
        got = score[np.arange(len(chosen)), chosen]
        per_suite = {s: 100 * float(got[groups == s].mean()) for s in test_suites}
        return {"per_suite": per_suite, "average": float(np.mean(list(per_suite.values()))),
                "cost_usd": float(cost[np.arange(len(chosen)), chosen].mean()),
                "share": {e: float(np.mean(chosen == j)) for j, e in enumerate(experts)}}

    train_score = np.array([[r["scores"][e] for e in experts] for r in train])
    train_groups = np.array([r["group"] for r in train])
    train_macro = np.array([np.mean([train_score[train_groups == s, j].mean() for s in sorted(set(train_groups))])
                            for j in range(len(experts))])
    best_single = int(train_macro.argmax())
    prices = np.array([meta["experts"][e]["price_per_1k_tokens"] for e in experts])
    cheapest = int(prices.argmin())
    parts = model.quality(emb)
    n = len(test)
    methods = {
        "router (t=0)": evaluate(decide_arrays(model, emb, 0.0, parts).chosen),
        f"best single ({experts[best_single]})": evaluate(np.full(n, best_single)),
        f"cheapest ({experts[cheapest]})": evaluate(np.full(n, cheapest)),
        "oracle": evaluate(score.argmax(axis=1)),
    }
    sweep = []
    for t in THRESHOLDS:
        d = decide_arrays(model, emb, t, parts)
        r = evaluate(d.chosen)
        sweep.append({"t": t, "accuracy": r["average"], "cost_usd": r["cost_usd"],
                      "fallback_share": float(np.mean(d.ood | d.low_confidence)), "share": r["share"]})
    report["router"] = {"n_train": len(train), "n_test": n, "test_suites": test_suites, "methods": methods,
                        "sweep": sweep, "fallback_expert": model.params.fallback_expert,
                        "train_report": {k: v for k, v in train_report.items() if isinstance(v, int | float)}}
    return report


def print_profile_report(report: dict[str, Any]) -> None:
    """Rich tables: per suite and expert, then router vs baselines on the test split, then the t sweep."""
    from rich.table import Table

    from router_models.evaluate import wide_console

    con = wide_console()
    experts = report["experts"]
    t = Table(title=f"profile {report['profile']} ({report['config']}): per expert and suite, all profiled items")
    for c in ("suite", "n", "expert", "accuracy %", "USD / item", "p50 latency s", "tokens out", "cut at max",
              "oracle %"):
        t.add_column(c, justify="left" if c in ("suite", "expert") else "right")
    for s, info in report["suites"].items():
        for i, e in enumerate(experts):
            p = info["experts"][e]
            t.add_row(s if i == 0 else "", str(info["n"]) if i == 0 else "", e, f"{p['accuracy']:.1f}",
                      f"{p['cost_usd']:.2e}", f"{p['latency_p50_s']:.2f}", f"{p['completion_tokens']:.0f}",
                      f"{p['truncated_share'] * 100:.0f}%", f"{info['oracle']:.1f}" if i == 0 else "")
        if info["note"]:
            t.add_row("", "", f"[yellow]{info['note']}[/yellow]", "", "", "", "", "", "")
    con.print(t)
    r = report.get("router", {})
    if "skipped" in r:
        con.print(f"router: skipped ({r['skipped']})")
        return
    rt = Table(title=f"test split ({r['n_test']} items; router trained on {r['n_train']}): accuracy %, mean over "
                     "suites")
    rt.add_column("method")
    for s in r["test_suites"]:
        rt.add_column(s, justify="right")
    rt.add_column("average", justify="right")
    rt.add_column("USD / item", justify="right")
    for name, m in r["methods"].items():
        rt.add_row(name, *[f"{m['per_suite'][s]:.1f}" for s in r["test_suites"]], f"{m['average']:.1f}",
                   f"{m['cost_usd']:.2e}", style="bold" if name.startswith("router") else None)
    con.print(rt)
    sw = Table(title="router: sweep of t on the test split")
    for c in ("t", "accuracy %", "USD / item", "fallback %", *[f"% {e}" for e in experts]):
        sw.add_column(c, justify="right")
    for p in r["sweep"]:
        sw.add_row(f"{p['t']:g}", f"{p['accuracy']:.1f}", f"{p['cost_usd']:.2e}", f"{p['fallback_share'] * 100:.0f}",
                   *[f"{p['share'][e] * 100:.0f}" for e in experts])
    con.print(sw)


def plot_profile(report: dict[str, Any], out: str | Path) -> Path:
    """Accuracy against cost per expert (test split) with the router's t sweep as a curve; per-suite bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from router_models.evaluate import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    r = report.get("router", {})
    if "methods" in r:
        for name, m in r["methods"].items():
            if name.startswith("router"):
                continue
            ax.scatter([m["cost_usd"]], [m["average"]], s=60, zorder=3)
            ax.annotate(name, (m["cost_usd"], m["average"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
        for e in report["experts"]:
            per = [report["suites"][s]["experts"][e] for s in r["test_suites"]]
            x, y = np.mean([p["cost_usd"] for p in per]), np.mean([p["accuracy"] for p in per])
            ax.scatter([x], [y], marker="x", color="grey", zorder=2)
            ax.annotate(e, (x, y), fontsize=7, color="grey", xytext=(4, -10), textcoords="offset points")
        ax.plot([p["cost_usd"] for p in r["sweep"]], [p["accuracy"] for p in r["sweep"]], "o-", color="tab:blue",
                label="router, sweep of t (test split)", zorder=4)
        for p in r["sweep"]:
            if p["t"] in (0.0, 0.1, 0.3, 1.0):
                ax.annotate(f"t={p['t']:g}", (p["cost_usd"], p["accuracy"]), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
        ax.legend(fontsize=8)
        ax.set_title("accuracy vs cost (test split; x = expert on all profiled items)")
    ax.set_xlabel("USD per item")
    ax.set_ylabel("accuracy % (mean over suites)")
    ax = axes[1]
    suites = list(report["suites"])
    experts = report["experts"]
    width = 0.8 / (len(experts) + 1)
    for i, e in enumerate(experts):
        ax.bar(np.arange(len(suites)) + i * width, [report["suites"][s]["experts"][e]["accuracy"] for s in suites],
               width, label=e)
    ax.bar(np.arange(len(suites)) + len(experts) * width, [report["suites"][s]["oracle"] for s in suites], width,
           label="oracle", color="lightgrey")
    ax.set_xticks(np.arange(len(suites)) + 0.4 - width / 2, suites)
    ax.set_ylabel("accuracy %")
    ax.set_title("per suite, all profiled items")
    ax.legend(fontsize=8)
    fig.suptitle(f"coe profile: {report['config']}")
    return save_figure(fig, out)
