"""Does the encoder carry routing signal within a task? Repeated K-fold CV on the training files only.

The per-task best expert is a strong baseline wherever a query's task is easy to recognise (RouterDC's files:
58.70 on test). Routing beats it only with signal *within* a task: which queries of MMLU suit which expert.
This measures that signal, per training file, before any router choice is made on it:

* ``task best``: each fold's training rows of the task pick one expert (the task is known: an upper bound on
  what task recognition alone gives);
* ``kNN m=...``: the mean quality of the 20 nearest same-task training queries, shrunk towards the task mean
  with strength m (the router's kNN estimator without its fusion);
* ``ridge l=...``: a per-task linear probe (ridge regression of each expert's score on the embedding).

Each method's accuracy gain over ``task best`` is reported with its paired standard error (queries as the
unit, averaged over repeats). A gain within about two standard errors of zero is no evidence of signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

DEFAULT_STRENGTHS: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0)
DEFAULT_RIDGE: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)


@dataclass
class SignalReport:
    """Per group (training file) and method: CV accuracy and its gain over the task's best expert."""

    groups: list[str]
    counts: list[int]
    methods: list[str]
    accuracy: dict[str, list[float]]  # method -> per-group accuracy (%)
    gain: dict[str, list[float]]  # method -> per-group gain over "task best" (points)
    gain_se: dict[str, list[float]]  # method -> per-group paired standard error of the gain
    average_gain: dict[str, float] = field(default_factory=dict)  # task-mean gain
    average_gain_se: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def within_group_signal(emb: np.ndarray, correct: np.ndarray, groups: list[str], *, folds: int = 5,
                        repeats: int = 4, seed: int = 0, k: int = 20,
                        strengths: tuple[float, ...] = DEFAULT_STRENGTHS, ridge: tuple[float, ...] = DEFAULT_RIDGE,
                        progress: bool = True) -> SignalReport:
    """Repeated stratified K-fold CV of within-group routing against each group's best expert."""
    import faiss

    names = sorted(set(groups))
    g = np.array([names.index(x) for x in groups])
    correct = np.nan_to_num(np.asarray(correct, dtype=np.float64), nan=0.0)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    methods = ["task best"] + [f"kNN m={m:g}" for m in strengths] + [f"ridge l={lam:g}" for lam in ridge]
    credit = np.zeros((len(methods), len(emb)))
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(repeats), desc="cross-validating within-task signal", disable=not progress, unit="repeat"):
        fold = np.zeros(len(emb), dtype=int)
        for t in range(len(names)):
            idx = np.flatnonzero(g == t)
            rng.shuffle(idx)
            fold[idx] = np.arange(len(idx)) % folds
        for f in range(folds):
            for t in range(len(names)):
                tr = np.flatnonzero((fold != f) & (g == t))
                va = np.flatnonzero((fold == f) & (g == t))
                if len(tr) == 0 or len(va) == 0:
                    continue
                mean = correct[tr].mean(0)
                preds = [np.broadcast_to(mean, (len(va), len(mean)))]
                index = faiss.IndexFlatIP(emb.shape[1])
                index.add(emb[tr])
                _, ids = index.search(emb[va], min(k, len(tr)))
                near = correct[tr][ids].sum(1)
                preds += [(near + m * mean) / (ids.shape[1] + m) for m in strengths]
                x = emb[tr].astype(np.float64)
                xm = x.mean(0)
                xc = x - xm
                gram, xty = xc.T @ xc, xc.T @ (correct[tr] - mean)
                eye = np.eye(x.shape[1])
                preds += [mean + (emb[va] - xm) @ np.linalg.solve(gram + lam * eye, xty) for lam in ridge]
                for i, q in enumerate(preds):
                    credit[i, va] += correct[va, np.asarray(q).argmax(1)]
    credit = credit / repeats * 100
    counts = np.bincount(g, minlength=len(names))
    report = SignalReport(groups=names, counts=counts.tolist(), methods=methods, accuracy={}, gain={}, gain_se={})
    for i, m in enumerate(methods):
        acc, gain, se = [], [], []
        for t in range(len(names)):
            rows = g == t
            d = credit[i, rows] - credit[0, rows]
            acc.append(float(credit[i, rows].mean()))
            gain.append(float(d.mean()))
            se.append(float(d.std(ddof=1) / np.sqrt(rows.sum())) if rows.sum() > 1 else float("nan"))
        report.accuracy[m], report.gain[m], report.gain_se[m] = acc, gain, se
        report.average_gain[m] = float(np.mean(gain))
        report.average_gain_se[m] = float(np.sqrt(np.sum(np.square(se))) / len(names))
    return report


def print_signal(report: SignalReport) -> None:
    from rich.table import Table

    from router_models.evaluate import wide_console

    table = Table(title="within-task routing signal: CV gain over the task's best expert (points ± SE)")
    table.add_column("method")
    for name, n in zip(report.groups, report.counts):
        table.add_column(f"{name} ({n})", justify="right")
    table.add_column("task mean", justify="right")
    base = report.accuracy["task best"]
    table.add_row("task best (accuracy)", *[f"{a:.2f}" for a in base], f"{np.mean(base):.2f}")
    for m in report.methods[1:]:
        cells = [f"{x:+.2f} ± {s:.2f}" for x, s in zip(report.gain[m], report.gain_se[m])]
        table.add_row(m, *cells, f"{report.average_gain[m]:+.2f} ± {report.average_gain_se[m]:.2f}")
    wide_console().print(table)


def plot_signal(report: SignalReport, out: str | Path, title: str = "") -> Path:
    """Bars of each method's gain per group, with ±2 standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from router_models.evaluate import save_figure

    names = report.groups + ["task mean"]
    methods = report.methods[1:]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = report.gain[m] + [report.average_gain[m]]
        errs = [2 * s for s in report.gain_se[m]] + [2 * report.average_gain_se[m]]
        ax.bar(np.arange(len(names)) + i * width, vals, width, yerr=errs, capsize=2, label=m)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=20)
    ax.set_ylabel("CV accuracy gain over the task's best expert (points, ±2 SE)")
    ax.set_title(title or "within-task routing signal (training files, repeated K-fold CV)")
    ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, out)
