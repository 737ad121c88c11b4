"""Evaluation under shift: the router off its training distribution (`coe router eval --merge-groups |
--leave-one-group-out | --shift S`).

Each protocol trains the router itself (training files in, test files out; the test files never tune anything)
and prints it beside, in the same run:
- best single: the expert with the best mean credit on the training data the router saw;
- plain kNN with fixed defaults: frozen encoder, the k = 100 nearest training queries, softmax weights over
  cosine similarity at temperature 0.1, nothing tuned;
- the oracle.
Accuracy is the RouterDC paper's (router_models.data.paper_correct), averaged over test files; differences come
with a paired standard error (per query, then combined over files).

1. No labels (`--merge-groups`): the training files are merged into one group before training, so nothing can
   use which file a query came from.
2. Unseen task (`--leave-one-group-out`): for each group, train on the others and test on that group's test
   file. Reports the share of held-out queries the router sent to its fallback expert next to that share on
   the other groups' (in-distribution) test queries, the AUROC of the out-of-distribution score (nearest
   training similarity) and of 1 - confidence for "held-out vs in-distribution", and the accuracy of what the
   router kept vs what it sent to the fallback.
3. Shifted mix (`--shift S`): test on a mixture of the test files whose group proportions are at total
   variation distance S from the training proportions (a seeded direction), sampled without replacement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coe.encoder import SentenceEncoder
from coe.routerdc import RouterDCModel, decide_arrays
from router_models.data import RoutingData, concat, load_any, task_of
from router_models.train import TrainConfig, cached_encode, train_router

PLAIN_KNN_K = 100
PLAIN_KNN_TEMPERATURE = 0.1
METHODS = ("router", "best_single", "plain_knn", "oracle")


def plain_knn(train_emb: np.ndarray, train_credit: np.ndarray, emb: np.ndarray, k: int = PLAIN_KNN_K,
              temperature: float = PLAIN_KNN_TEMPERATURE) -> np.ndarray:
    """Predicted quality per expert: softmax(cos / temperature)-weighted mean credit of the k nearest queries."""
    import faiss

    index = faiss.IndexFlatIP(train_emb.shape[1])
    index.add(np.ascontiguousarray(train_emb, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(emb, dtype=np.float32), min(k, len(train_emb)))
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nke->ne", w, train_credit[idx])


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    allv = np.concatenate([positive, negative])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(positive)].sum()
    return float((r_pos - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def file_mean_diff(diffs: list[np.ndarray]) -> tuple[float, float]:
    """Mean over files of each file's mean per-query difference, and its paired standard error (x100)."""
    means = [d.mean() for d in diffs]
    var = sum(d.var(ddof=1) / len(d) if len(d) > 1 else 0.0 for d in diffs) / len(diffs) ** 2
    return float(np.mean(means) * 100), float(np.sqrt(var) * 100)


def shifted_proportions(p: np.ndarray, amount: float, seed: int) -> np.ndarray:
    """Proportions at total variation distance `amount` from `p`, towards a seeded random mixture."""
    if not 0.0 <= amount < 1.0:
        raise ValueError("--shift must be in [0, 1)")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        v = rng.dirichlet(np.full(len(p), 0.5))
        tv = 0.5 * np.abs(v - p).sum()
        if tv >= amount:
            lam = amount / tv if tv > 0 else 0.0
            return (1 - lam) * p + lam * v
    raise ValueError(f"cannot shift {len(p)} groups by {amount}: choose a smaller --shift")


def sample_mixture(groups: np.ndarray, target: dict[str, float], seed: int) -> np.ndarray:
    """Indices (without replacement) whose group shares match `target`, as many as the rarest allows."""
    rng = np.random.default_rng(seed)
    avail = {g: np.flatnonzero(groups == g) for g in target}
    n_total = min(len(avail[g]) / q for g, q in target.items() if q > 0)
    out = []
    for g, q in target.items():
        n = int(round(q * n_total))
        if n:
            out.append(rng.choice(avail[g], size=min(n, len(avail[g])), replace=False))
    return np.sort(np.concatenate(out))


@dataclass
class Scored:
    """One test set, encoded, with per-query credit (paper rule) and its file of origin."""

    data: RoutingData
    emb: np.ndarray
    credit: np.ndarray
    files: np.ndarray


def _load_test(files: list[str | Path], experts: list[str], encoder: SentenceEncoder, progress: bool) -> Scored:
    parts = []
    for f in files:
        d = load_any(f)
        if sorted(d.experts) != sorted(experts):
            raise ValueError(f"{f} scores {sorted(d.experts)}, training had {sorted(experts)}")
        order = [d.experts.index(x) for x in experts]
        d = RoutingData(d.name, d.questions, list(experts), d.scores[:, order],
                        None if d.costs is None else d.costs[:, order], d.tasks)
        valid = ~np.isnan(d.scores).any(axis=1)
        parts.append(d.subset(np.flatnonzero(valid)))
    data = concat(parts, name="test")
    credit = np.nan_to_num(data.correct(), nan=0.0)
    return Scored(data, cached_encode(encoder, data.questions, progress=progress), credit, np.array(data.tasks))


@dataclass
class ProtocolResult:
    """Accuracy per test file and method, differences to the router with paired SEs, extra measurements."""

    protocol: str
    files: list[str]
    accuracy: dict[str, dict[str, float]]  # file -> method -> accuracy x100
    average: dict[str, float]
    diff: dict[str, tuple[float, float]]  # baseline -> (router - baseline, paired SE), over files
    extra: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)


def _evaluate(model: RouterDCModel, train: RoutingData, train_emb: np.ndarray, test: Scored, protocol: str,
              rows: np.ndarray | None = None) -> tuple[ProtocolResult, Any, dict[str, np.ndarray]]:
    """All methods on `test` (optionally only `rows` of it), per file."""
    idx = np.arange(len(test.data)) if rows is None else rows
    credit, emb, files = test.credit[idx], test.emb[idx], test.files[idx]
    train_credit = np.nan_to_num(train.correct(), nan=0.0)
    best_single = int(train_credit.mean(axis=0).argmax())
    dec = decide_arrays(model, emb, 0.0)
    chosen = {
        "router": dec.chosen,
        "best_single": np.full(len(idx), best_single),
        "plain_knn": plain_knn(train_emb, train_credit, emb).argmax(axis=1),
        "oracle": credit.argmax(axis=1),
    }
    got = {m: credit[np.arange(len(idx)), c] for m, c in chosen.items()}
    names = list(dict.fromkeys(files.tolist()))
    acc = {f: {m: float(got[m][files == f].mean() * 100) for m in METHODS} for f in names}
    average = {m: float(np.mean([acc[f][m] for f in names])) for m in METHODS}
    diff = {m: file_mean_diff([got["router"][files == f] - got[m][files == f] for f in names])
            for m in METHODS if m != "router"}
    res = ProtocolResult(protocol, names, acc, average, diff, n={f: int((files == f).sum()) for f in names})
    res.extra["best_single_expert"] = train.experts[best_single]
    res.extra["fallback_share"] = float(np.mean(dec.ood | dec.low_confidence))
    return res, dec, got


def _train(data: RoutingData, encoder: SentenceEncoder, prices: dict[str, float] | None, cfg: TrainConfig,
           progress: bool) -> tuple[RouterDCModel, np.ndarray]:
    model, _ = train_router(data, encoder, prices=prices, cfg=cfg, progress=progress)
    return model, cached_encode(encoder, data.questions, progress=progress)


def merged(data: RoutingData) -> RoutingData:
    """The same rows as one group: credit under the paper rule first (it needs the file), then no file identity."""
    return RoutingData("merged", data.questions, data.experts, data.correct(), data.costs, ["merged"] * len(data))


def merge_groups(train_files: list[str | Path], test_files: list[str | Path], *, encoder: SentenceEncoder,
                 prices: dict[str, float] | None = None, cfg: TrainConfig | None = None,
                 progress: bool = True) -> ProtocolResult:
    """Protocol 1: train on the merged training files, test on every test file."""
    train = merged(concat([load_any(f) for f in train_files], name="train"))
    model, train_emb = _train(train, encoder, prices, cfg or TrainConfig(), progress)
    test = _load_test(test_files, train.experts, encoder, progress)
    res, _, _ = _evaluate(model, train, train_emb, test, "no labels (--merge-groups)")
    return res


def leave_one_group_out(train_files: list[str | Path], test_files: list[str | Path], *, encoder: SentenceEncoder,
                        prices: dict[str, float] | None = None, cfg: TrainConfig | None = None,
                        progress: bool = True) -> ProtocolResult:
    """Protocol 2: for each group, train on the other groups' training files and test on its test file."""
    trains = {task_of(f): load_any(f) for f in train_files}
    tests = {task_of(f): f for f in test_files}
    missing = sorted(set(trains) ^ set(tests))
    if missing:
        raise ValueError(f"--leave-one-group-out pairs training and test files by task; unpaired: {missing}")
    if len(trains) < 2:
        raise ValueError("--leave-one-group-out needs at least two groups")
    experts = next(iter(trains.values())).experts
    test_all = _load_test([tests[g] for g in trains], experts, encoder, progress)
    acc: dict[str, dict[str, float]] = {}
    diffs: dict[str, list[np.ndarray]] = {m: [] for m in METHODS if m != "router"}
    per_group: dict[str, dict[str, float]] = {}
    n: dict[str, int] = {}
    for g in trains:
        train = concat([d for h, d in trains.items() if h != g], name=f"without-{g}")
        model, train_emb = _train(train, encoder, prices, cfg or TrainConfig(), progress)
        held = np.flatnonzero(test_all.files == g)
        res, dec, got = _evaluate(model, train, train_emb, test_all, "unseen task", rows=held)
        acc[g] = res.accuracy[g]
        n[g] = res.n[g]
        for m in diffs:
            diffs[m].append(got["router"] - got[m])
        # Uncertainty: held-out queries against the other groups' test queries (in distribution here).
        ind = np.flatnonzero(test_all.files != g)
        d_in = decide_arrays(model, test_all.emb[ind], 0.0)
        fell_held = dec.ood | dec.low_confidence
        kept_acc = float(got["router"][~fell_held].mean() * 100) if (~fell_held).any() else float("nan")
        fb_acc = float(got["router"][fell_held].mean() * 100) if fell_held.any() else float("nan")
        per_group[g] = {
            "fallback_share_heldout": float(fell_held.mean()),
            "fallback_share_in_distribution": float(np.mean(d_in.ood | d_in.low_confidence)),
            "auroc_ood_score": auroc(-dec.nn_similarity, -d_in.nn_similarity),
            "auroc_low_confidence": auroc(1 - dec.confidence, 1 - d_in.confidence),
            "accuracy_kept": kept_acc, "accuracy_sent_to_fallback": fb_acc,
            "best_single_expert": res.extra["best_single_expert"], "fallback_expert": model.params.fallback_expert,
        }
    names = list(trains)
    average = {m: float(np.mean([acc[g][m] for g in names])) for m in METHODS}
    return ProtocolResult("unseen task (--leave-one-group-out)", names, acc, average,
                          {m: file_mean_diff(d) for m, d in diffs.items()}, {"per_group": per_group}, n)


def shifted_mix(train_files: list[str | Path], test_files: list[str | Path], amount: float, *, seed: int = 0,
                encoder: SentenceEncoder, prices: dict[str, float] | None = None, cfg: TrainConfig | None = None,
                progress: bool = True) -> ProtocolResult:
    """Protocol 3: train on the files as they are, test on a mixture at TV distance `amount` from training."""
    train = concat([load_any(f) for f in train_files], name="train")
    model, train_emb = _train(train, encoder, prices, cfg or TrainConfig(), progress)
    test = _load_test(test_files, train.experts, encoder, progress)
    groups = sorted(set(train.tasks))
    p = np.array([train.tasks.count(g) for g in groups], dtype=float)
    p /= p.sum()
    q = shifted_proportions(p, amount, seed)
    rows = sample_mixture(test.files, dict(zip(groups, q)), seed)
    res, _, got = _evaluate(model, train, train_emb, test, f"shifted mix (--shift {amount})", rows=rows)
    # The mixture's average weighs files by their share in it (what the traffic would see), not equally; so do
    # the paired differences (over all queries of the mix).
    total = len(rows)
    res.average = {m: float(got[m].mean() * 100) for m in METHODS}
    res.diff = {m: (float((got["router"] - got[m]).mean() * 100),
                    float((got["router"] - got[m]).std(ddof=1) / np.sqrt(total) * 100)) for m in METHODS if m != "router"}
    res.extra.update({"train_proportions": dict(zip(groups, p.round(4).tolist())),
                      "test_proportions": dict(zip(groups, q.round(4).tolist())),
                      "total_variation": float(0.5 * np.abs(q - p).sum()), "seed": seed, "n_test": total})
    return res


def print_protocol(res: ProtocolResult) -> None:
    """A table per protocol: accuracy per file and method, then router - baseline with paired SEs."""
    from rich.table import Table

    from router_models.evaluate import wide_console

    con = wide_console()
    t = Table(title=f"{res.protocol}: accuracy (RouterDC paper rule, %)")
    t.add_column("test file")
    t.add_column("n", justify="right")
    for m in METHODS:
        t.add_column(m, justify="right")
    for f in res.files:
        t.add_row(f, str(res.n.get(f, "")), *[f"{res.accuracy[f][m]:.2f}" for m in METHODS])
    t.add_row("average", "", *[f"{res.average[m]:.2f}" for m in METHODS], style="bold")
    con.print(t)
    over = "over the mix's queries" if "total_variation" in res.extra else "mean over files"
    con.print("router - " + ", router - ".join(f"{m}: {d:+.2f} ± {se:.2f}" for m, (d, se) in res.diff.items())
              + f"  ({over}, paired SE)")
    for g, info in res.extra.get("per_group", {}).items():
        con.print(f"  held out {g}: fallback {info['fallback_share_heldout'] * 100:.1f}% of held-out vs "
                  f"{info['fallback_share_in_distribution'] * 100:.1f}% in-distribution; AUROC ood "
                  f"{info['auroc_ood_score']:.3f}, low confidence {info['auroc_low_confidence']:.3f}; accuracy kept "
                  f"{info['accuracy_kept']:.2f} vs sent to fallback ({info['fallback_expert']}) "
                  f"{info['accuracy_sent_to_fallback']:.2f}")
    if "total_variation" in res.extra:
        con.print(f"  training mix {res.extra['train_proportions']} -> test mix {res.extra['test_proportions']} "
                  f"(TV {res.extra['total_variation']:.2f}, seed {res.extra['seed']}, {res.extra['n_test']} queries; "
                  "average weighted by the mix)")
