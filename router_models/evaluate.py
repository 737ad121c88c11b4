"""Evaluate a router artifact on scored test files: accuracy, baselines, quality against cost, latency.

Accuracy uses the RouterDC paper's rule (router_models.data.paper_correct). Baselines in the same run:
random, best single expert (chosen on the router's training data), per-task best (the best expert of each
test file: it knows the file's name), plain kNN on the same encoder and index, RouterDC without the kNN
fusion, and the per-query oracle.

Quality against cost sweeps the threshold t. Cost per query is the file's own USD cost where it has one
(RouterBench), else the artifact's price for the chosen expert. RouteLLM's definitions, with the priciest
expert as "strong" and the cheapest as "weak":
  PGR(t)  = (acc(t) - acc_weak) / (acc_strong - acc_weak)
  APGR    = area under PGR against the share of calls to the strong expert, over [0, 1]; past the
            router's own largest share the curve is joined linearly to (1, 1) (all calls to strong);
  CPT(x%) = the smallest share of calls to the strong expert at which PGR reaches x%.
AUC is the area under the upper convex hull of accuracy against cost normalised by the cost of always
calling the priciest expert, over [cost_weak, 1] / (1 - cost_weak), in accuracy points; the baseline is a
random mix of the weak and strong experts (the straight line between them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coe.routerdc import RouterDCModel, decide_arrays, load_artifact
from coe.stats import percentile
from router_models.data import RoutingData, load_any
from router_models.objectives import paper_accuracy
from router_models.train import cached_encode

DEFAULT_THRESHOLDS = tuple(float(x) for x in np.round(np.concatenate([np.linspace(0, 0.1, 11),
                                                                      np.linspace(0.125, 0.5, 16),
                                                                      [0.6, 0.8, 1.0, 2.0]]), 4))


@dataclass
class FileResult:
    name: str
    n: int
    n_excluded: int
    accuracy: dict[str, float]  # method -> paper accuracy (x100)
    best_expert: str  # per-task best expert on this file


@dataclass
class SweepPoint:
    threshold: float
    accuracy: float  # mean over files (x100)
    cost: float  # mean cost per query (USD, or price units without per-query costs)
    cost_norm: float  # cost / cost of always calling the priciest expert
    strong_share: float  # share of calls to the priciest expert
    fallback_share: float


@dataclass
class EvalReport:
    files: list[FileResult]
    methods: list[str]
    average: dict[str, float]
    sweep: list[SweepPoint]
    strong: str
    weak: str
    cost_unit: str
    summary: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [f.__dict__ for f in self.files], "average": self.average, "methods": self.methods,
            "sweep": [p.__dict__ for p in self.sweep], "strong": self.strong, "weak": self.weak,
            "cost_unit": self.cost_unit, "summary": self.summary, "latency": self.latency,
        }


def _align(data: RoutingData, model: RouterDCModel) -> RoutingData:
    """Reorder the file's expert columns to the artifact's; refuse a file with other experts."""
    experts = model.params.experts
    if sorted(data.experts) != sorted(experts):
        raise ValueError(f"{data.name} scores experts {sorted(data.experts)}, the router has {sorted(experts)}")
    order = [data.experts.index(x) for x in experts]
    return RoutingData(name=data.name, questions=data.questions, experts=list(experts),
                       scores=data.scores[:, order], costs=None if data.costs is None else data.costs[:, order],
                       tasks=data.tasks)


def _pgr_curve(shares: np.ndarray, pgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by share, starting at (0, 0) and joined to (1, 1)."""
    x = np.concatenate([[0.0], shares, [1.0]])
    y = np.concatenate([[0.0], pgr, [1.0]])
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    # At equal share keep the best PGR (the router can always pick that threshold).
    keep = np.append(x[1:] != x[:-1], True)
    return x[keep], y[keep]


def apgr(shares: np.ndarray, pgr: np.ndarray) -> float:
    """Area under PGR against the share of calls to the strong expert."""
    x, y = _pgr_curve(shares, pgr)
    return float(np.trapezoid(y, x))


def cpt(shares: np.ndarray, pgr: np.ndarray, target: float) -> float:
    """Smallest share of calls to the strong expert reaching PGR >= target (linear between points)."""
    x, y = _pgr_curve(shares, pgr)
    for i in range(len(x)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0)) if y1 > y0 else float(x1)
    return 1.0


def hull_auc(cost_norm: np.ndarray, acc: np.ndarray, lo: float) -> float:
    """Area under the upper convex hull of (cost, accuracy) over [lo, 1], divided by (1 - lo)."""
    pts = sorted(set(zip(np.clip(cost_norm, lo, 1.0).tolist(), acc.tolist())))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] under the chord
                hull.pop()
            else:
                break
        hull.append(p)
    # Keep the non-decreasing part (more cost never needs to buy less accuracy), extend flat to both ends.
    xs, ys = [lo], [hull[0][1]]
    for x, y in hull:
        if y >= ys[-1]:
            xs.append(x)
            ys.append(y)
    xs.append(1.0)
    ys.append(ys[-1])
    return float(np.trapezoid(ys, xs) / max(1.0 - lo, 1e-12))


def _time_ms(fn: Any, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out[i] = (time.perf_counter() - t0) * 1000
    return out


def measure_latency(model: RouterDCModel, encoder: Any, queries: list[str], n: int = 200,
                    batch: int = 32) -> dict[str, float]:
    """Decision latency for one query and throughput for batches, next to the bare encoder on the same input."""
    rng = np.random.default_rng(0)
    qs = [queries[i] for i in rng.choice(len(queries), size=min(n, len(queries)), replace=False)]
    for q in qs[:10]:  # warm-up
        decide_arrays(model, encoder.encode([q]), 0.0)
    # Interleave the two measurements so both see the same machine state.
    enc, dec = np.empty(len(qs)), np.empty(len(qs))
    for i, q in enumerate(qs):
        t0 = time.perf_counter()
        encoder.encode([q])
        t1 = time.perf_counter()
        decide_arrays(model, encoder.encode([q]), 0.0)
        t2 = time.perf_counter()
        enc[i], dec[i] = (t1 - t0) * 1000, (t2 - t1) * 1000
    batches = [qs[i : i + batch] for i in range(0, len(qs) - batch + 1, batch)] or [qs]
    t0 = time.perf_counter()
    for b in batches:
        encoder.encode(b, batch_size=batch)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches:
        decide_arrays(model, encoder.encode(b, batch_size=batch), 0.0)
    t_dec = time.perf_counter() - t0
    nq = sum(len(b) for b in batches)
    return {
        "n": float(len(qs)), "route_p50_ms": percentile(dec, 50), "route_p99_ms": percentile(dec, 99),
        "encoder_p50_ms": percentile(enc, 50), "encoder_p99_ms": percentile(enc, 99),
        "route_over_encoder_p50": percentile(dec, 50) / percentile(enc, 50),
        "batch": float(batch), "route_batch_qps": nq / t_dec, "encoder_batch_qps": nq / t_enc,
    }


def evaluate(router_dir: str | Path, files: list[str | Path], *, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
             latency_queries: int = 200, progress: bool = True) -> EvalReport:
    """The whole evaluation of one artifact on test files (never used for training or tuning)."""
    model, encoder = load_artifact(router_dir)
    experts = model.params.experts
    train_mean = model.knn_quality.mean(axis=0)
    best_single = int(train_mean.argmax())
    results: list[FileResult] = []
    per_file: list[tuple[RoutingData, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    methods = ["random", "best_single", "per_task_best", "knn", "routerdc_only", "group_prior", "coe_router",
               "oracle"]
    for f in files:
        data = _align(load_any(f), model)
        valid = ~np.isnan(data.scores).any(axis=1)  # missing scores: not wrong, just unknown
        n_excl = int((~valid).sum())
        data = data.subset(np.flatnonzero(valid))
        emb = cached_encode(encoder, data.questions, progress=progress)
        correct = np.nan_to_num(data.correct(), nan=0.0)
        parts = model.quality(emb)
        q_knn, _ = model.knn(emb, shrink=False)
        prior_q = model.prior.proba(emb) @ model.prior.mean_quality
        dec = decide_arrays(model, emb, 0.0, parts)
        col_means = correct.mean(axis=0)
        acc = {
            "random": float(correct.mean() * 100),
            "best_single": float(col_means[best_single] * 100),
            "per_task_best": float(col_means.max() * 100),
            "knn": paper_accuracy(correct, q_knn.argmax(1)),
            "routerdc_only": paper_accuracy(correct, parts[1].argmax(1)),
            "group_prior": paper_accuracy(correct, prior_q.argmax(1)),
            "coe_router": paper_accuracy(correct, dec.chosen),
            "oracle": float(correct.max(axis=1).mean() * 100),
        }
        results.append(FileResult(data.name, len(data), n_excl, acc, experts[int(col_means.argmax())]))
        per_file.append((data, correct, parts))
    average = {m: float(np.mean([r.accuracy[m] for r in results])) for m in methods}

    # Cost: per-query USD where every file has it, else the artifact's prices.
    has_costs = all(d.costs is not None for d, _, _ in per_file)
    mean_cost = (np.mean(np.concatenate([d.costs for d, _, _ in per_file]), axis=0)  # type: ignore[misc]
                 if has_costs else model.prices)
    # Price tiers can hold several experts (e.g. equal parameter counts): strong = the most accurate of the
    # priciest tier, weak = the most accurate of the cheapest; the share counts calls to the whole top tier.
    overall = np.mean([c.mean(axis=0) for _, c, _ in per_file], axis=0)
    top_tier = np.flatnonzero(mean_cost >= mean_cost.max() * (1 - 1e-6))
    low_tier = np.flatnonzero(mean_cost <= mean_cost.min() * (1 + 1e-6))
    strong, weak = int(top_tier[overall[top_tier].argmax()]), int(low_tier[overall[low_tier].argmax()])

    def cost_of(chosen_by_file: list[np.ndarray]) -> float:
        total = []
        for (d, _, _), ch in zip(per_file, chosen_by_file):
            total.append(d.costs[np.arange(len(ch)), ch] if has_costs else model.prices[ch])  # type: ignore[index]
        return float(np.concatenate(total).mean())

    def acc_of(chosen_by_file: list[np.ndarray]) -> float:
        return float(np.mean([paper_accuracy(c, ch) for (_, c, _), ch in zip(per_file, chosen_by_file)]))

    const = {j: [np.full(len(d), j) for d, _, _ in per_file] for j in (strong, weak)}
    cost_strong = cost_of(const[strong])
    acc_strong, acc_weak = acc_of(const[strong]), acc_of(const[weak])
    sweep = []
    for t in thresholds:
        decs = [decide_arrays(model, np.empty((len(d), 0)), t, parts) for d, _, parts in per_file]
        chosen = [x.chosen for x in decs]
        allc = np.concatenate(chosen)
        fell_back = np.concatenate([x.ood | x.low_confidence for x in decs])
        c = cost_of(chosen)
        sweep.append(SweepPoint(t, acc_of(chosen), c, c / cost_strong, float(np.isin(allc, top_tier).mean()),
                                float(fell_back.mean())))
    acc_arr = np.array([p.accuracy for p in sweep])
    share = np.array([p.strong_share for p in sweep])
    gap = acc_strong - acc_weak
    pgr = (acc_arr - acc_weak) / gap if abs(gap) > 1e-9 else np.zeros_like(acc_arr)
    lo = cost_of(const[weak]) / cost_strong
    cn = np.array([p.cost_norm for p in sweep])
    summary = {
        "acc_strong": acc_strong, "acc_weak": acc_weak, "cost_strong": cost_strong, "cost_weak": cost_of(const[weak]),
        "apgr": apgr(share, pgr), "apgr_random": 0.5,
        "cpt50": cpt(share, pgr, 0.5), "cpt80": cpt(share, pgr, 0.8),
        "auc_hull": hull_auc(np.append(cn, [lo, 1.0]), np.append(acc_arr, [acc_weak, acc_strong]), lo),
        "auc_random_mix": (acc_weak + acc_strong) / 2,
    }
    summary["auc_ratio"] = summary["auc_hull"] / summary["auc_random_mix"]
    strong_name = experts[strong] + (f" (+{len(top_tier) - 1} at the same price)" if len(top_tier) > 1 else "")
    report = EvalReport(results, methods, average, sweep, strong_name, experts[weak],
                        "USD/query" if has_costs else "price units/query", summary)
    if latency_queries > 0:
        report.latency = measure_latency(model, encoder, [q for d, _, _ in per_file for q in d.questions],
                                         n=latency_queries)
    return report


def plot_report(report: EvalReport, out: str | Path, title: str = "") -> Path:
    """Accuracy against cost and against the share of calls to the priciest expert, plus per-file bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    s = report.summary
    cost = [p.cost for p in report.sweep]
    acc = [p.accuracy for p in report.sweep]
    share = [p.strong_share * 100 for p in report.sweep]
    ax = axes[0]
    ax.plot(cost, acc, "o-", label="coe router (sweep of t)")
    for p in report.sweep:
        if p.threshold in (0.0, 0.05, 0.1, 0.2, 0.5):
            ax.annotate(f"t={p.threshold:g}", (p.cost, p.accuracy), fontsize=8, xytext=(4, -10),
                        textcoords="offset points")
    ax.plot([s["cost_weak"], s["cost_strong"]], [s["acc_weak"], s["acc_strong"]], "k--",
            label=f"random mix {report.weak} / {report.strong}")
    ax.axhline(report.average["per_task_best"], color="tab:green", ls=":", label="per-task best expert")
    ax.set_xlabel(f"cost ({report.cost_unit})")
    ax.set_ylabel("accuracy (mean over files, %)")
    ax.set_title(f"quality vs cost  (hull AUC {s['auc_hull']:.2f} vs {s['auc_random_mix']:.2f} random mix)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(share, acc, "o-", label="coe router")
    ax.plot([0, 100], [s["acc_weak"], s["acc_strong"]], "k--", label="random (APGR 0.5)")
    ax.set_xlabel(f"% of calls to the priciest expert ({report.strong})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"APGR {s['apgr']:.3f}  CPT(50%) {s['cpt50'] * 100:.1f}%  CPT(80%) {s['cpt80'] * 100:.1f}%")
    ax.legend(fontsize=8)
    ax = axes[2]
    names = [f.name for f in report.files] + ["average"]
    show = ["random", "best_single", "per_task_best", "knn", "group_prior", "coe_router", "oracle"]
    width = 0.8 / len(show)
    for i, m in enumerate(show):
        vals = [f.accuracy[m] for f in report.files] + [report.average[m]]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("per file, t = 0")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def wide_console(min_width: int = 150) -> Any:
    """A rich Console at least `min_width` columns wide: a pipe or CI log (80 columns by default) would
    otherwise truncate the tables' method names to "rand…"."""
    from rich.console import Console

    return Console(width=max(Console().width, min_width))


def save_figure(fig: Any, out: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(report: EvalReport) -> None:
    """Rich tables: accuracy per file and method, the t sweep, the cost summary and latency."""
    from rich.table import Table

    con = wide_console()
    t = Table(title="accuracy (RouterDC paper rule, %), t = 0")
    t.add_column("file")
    t.add_column("n", justify="right")
    for m in report.methods:
        t.add_column(m, justify="right")
    for f in report.files:
        t.add_row(f.name + (f" (-{f.n_excluded} NaN)" if f.n_excluded else ""), str(f.n),
                  *[f"{f.accuracy[m]:.2f}" for m in report.methods])
    t.add_row("average", "", *[f"{report.average[m]:.2f}" for m in report.methods], style="bold")
    con.print(t)
    sw = Table(title=f"threshold sweep (strong = {report.strong}, weak = {report.weak})")
    for c in ("t", "accuracy", f"cost ({report.cost_unit})", "cost / strong", "% strong", "% fallback"):
        sw.add_column(c, justify="right")
    for p in report.sweep:
        sw.add_row(f"{p.threshold:g}", f"{p.accuracy:.2f}", f"{p.cost:.3g}", f"{p.cost_norm:.3f}",
                   f"{p.strong_share * 100:.1f}", f"{p.fallback_share * 100:.1f}")
    con.print(sw)
    s = report.summary
    st = Table(title="quality vs cost")
    st.add_column("metric")
    st.add_column("value", justify="right")
    for key, label in (("acc_strong", "accuracy, always strong"), ("acc_weak", "accuracy, always weak"),
                       ("apgr", "APGR (random router = 0.5)"), ("cpt50", "CPT(50%)"), ("cpt80", "CPT(80%)"),
                       ("auc_hull", "hull AUC (acc. points)"), ("auc_random_mix", "random-mix AUC"),
                       ("auc_ratio", "hull AUC / random-mix AUC")):
        v = s[key]
        st.add_row(label, f"{v * 100:.1f}%" if key.startswith("cpt") else f"{v:.3f}")
    con.print(st)
    if report.latency:
        lt = Table(title="decision latency (this machine)")
        lt.add_column("measure")
        lt.add_column("router", justify="right")
        lt.add_column("bare encoder", justify="right")
        lt.add_column("ratio", justify="right")
        la = report.latency
        lt.add_row("one query p50 (ms)", f"{la['route_p50_ms']:.2f}", f"{la['encoder_p50_ms']:.2f}",
                   f"{la['route_p50_ms'] / la['encoder_p50_ms']:.2f}x")
        lt.add_row("one query p99 (ms)", f"{la['route_p99_ms']:.2f}", f"{la['encoder_p99_ms']:.2f}",
                   f"{la['route_p99_ms'] / la['encoder_p99_ms']:.2f}x")
        lt.add_row(f"batch {int(la['batch'])} (queries/s)", f"{la['route_batch_qps']:.0f}",
                   f"{la['encoder_batch_qps']:.0f}", f"{la['route_batch_qps'] / la['encoder_batch_qps']:.2f}x")
        con.print(lt)
