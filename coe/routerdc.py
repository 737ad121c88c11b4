"""The trained RouterDC router (inference side): load an artifact, score experts, decide.

Per query x with encoder embedding E(x):
  * RouterDC score of expert k: cos(W E(x) + b, e_k) / tau  (learned head W, b and expert embeddings e_k);
  * kNN quality: similarity-weighted mean of each expert's correctness on the nearest training queries
    (FAISS inner-product index over unit embeddings);
  * predicted quality q_k: alpha * softmax(RouterDC scores)_k rescaled to the kNN range + (1 - alpha) * kNN_k,
    with alpha fitted on a validation split;
  * confidence: temperature-scaled softmax over q (temperature fitted on validation);
  * out-of-distribution: nearest-neighbour similarity below a quantile of the validation queries';
  * threshold t (HybridLLM): the cheapest expert with q_k >= max(q) - t.
Low confidence or OOD sends the query to the fallback expert.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coe.encoder import SentenceEncoder
from coe.errors import RouterArtifactError
from coe.routing import Router, RoutingDecision

ARTIFACT_VERSION = 1


@dataclass
class RouterDCParams:
    """Everything the artifact's config.json holds."""

    encoder: str
    encoder_fingerprint: str
    experts: list[str]
    prices: dict[str, float]
    tau: float
    knn_k: int
    knn_tau: float
    alpha: float
    calib_temperature: float
    ood_min_similarity: float
    min_confidence: float
    fallback_expert: str
    default_threshold: float = 0.0
    version: int = ARTIFACT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def encoder_fingerprint(encoder: SentenceEncoder) -> str:
    """A stable id of the encoder's behaviour: a hash of its embeddings of fixed probe sentences."""
    probe = encoder.encode(["coe router fingerprint probe", "2 + 2 = 4", "def f(x): return x"])
    return hashlib.sha256(np.round(probe, 4).tobytes()).hexdigest()[:16]


def softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = x / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class RouterDCModel:
    """The numeric part of the router, shared by training-time evaluation and serving."""

    def __init__(self, params: RouterDCParams, head_w: np.ndarray, head_b: np.ndarray, expert_emb: np.ndarray,
                 index: Any, knn_quality: np.ndarray) -> None:
        self.params = params
        self.head_w = head_w.astype(np.float32)
        self.head_b = head_b.astype(np.float32)
        e = expert_emb.astype(np.float32)
        self.expert_emb = e / np.linalg.norm(e, axis=1, keepdims=True)
        self.index = index
        self.knn_quality = np.nan_to_num(knn_quality.astype(np.float32), nan=0.0)
        self.prices = np.array([params.prices.get(x, 0.0) for x in params.experts], dtype=np.float64)

    def dc_logits(self, emb: np.ndarray) -> np.ndarray:
        h = emb @ self.head_w.T + self.head_b
        h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-8)
        return (h @ self.expert_emb.T) / self.params.tau

    def knn(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quality estimate (n, k), nearest similarity (n,))."""
        sims, ids = self.index.search(np.ascontiguousarray(emb, dtype=np.float32), self.params.knn_k)
        w = softmax(sims, self.params.knn_tau)
        q = np.einsum("nj,njk->nk", w, self.knn_quality[ids])
        return q, sims[:, 0]

    def quality(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fused predicted quality, RouterDC probabilities, nearest-neighbour similarity)."""
        p_dc = softmax(self.dc_logits(emb))
        q_knn, nn_sim = self.knn(emb)
        return self.fuse(p_dc, q_knn), p_dc, nn_sim

    def fuse(self, p_dc: np.ndarray, q_knn: np.ndarray) -> np.ndarray:
        """alpha-mix of the RouterDC distribution (put on the kNN quality scale) and the kNN quality."""
        lo, hi = q_knn.min(axis=1, keepdims=True), q_knn.max(axis=1, keepdims=True)
        p_scaled = lo + (hi - lo) * (p_dc / np.maximum(p_dc.max(axis=1, keepdims=True), 1e-8))
        a = self.params.alpha
        return a * p_scaled + (1 - a) * q_knn

    def choose(self, q: np.ndarray, threshold: float) -> np.ndarray:
        """Cheapest expert within `threshold` of the best predicted quality, per row."""
        ok = q >= q.max(axis=1, keepdims=True) - threshold - 1e-12
        # Cheapest admissible expert; among equal prices, the higher predicted quality.
        best = np.empty(len(q), dtype=int)
        for i in range(len(q)):
            cand = np.flatnonzero(ok[i])
            best[i] = cand[np.lexsort((-q[i, cand], self.prices[cand]))[0]]
        return best


class RouterDCRouter(Router):
    """The serving router over a saved artifact (see router_models/ for training)."""

    def __init__(self, artifact_dir: str | Path, *, expected_experts: list[str] | None = None,
                 encoder: SentenceEncoder | None = None, threshold: float | None = None) -> None:
        self.model, self.encoder = load_artifact(artifact_dir, expected_experts=expected_experts, encoder=encoder)
        self.default_threshold = self.model.params.default_threshold if threshold is None else threshold

    @property
    def experts(self) -> list[str]:
        return list(self.model.params.experts)

    def route_batch(self, queries: list[str], *, threshold: float | None = None) -> list[RoutingDecision]:
        t = self.default_threshold if threshold is None else threshold
        emb = self.encoder.encode(queries)
        return decide(self.model, emb, t)


def decide(model: RouterDCModel, emb: np.ndarray, threshold: float) -> list[RoutingDecision]:
    """Decisions for encoder embeddings (shared by serving and evaluation)."""
    p = model.params
    q, _, nn_sim = model.quality(emb)
    conf = softmax(q, p.calib_temperature)
    chosen = model.choose(q, threshold)
    out = []
    for i in range(len(emb)):
        k = int(chosen[i])
        best = int(q[i].argmax())
        confidence = float(conf[i, best])
        ood = bool(nn_sim[i] < p.ood_min_similarity)
        if ood:
            expert, reason = p.fallback_expert, f"fallback:ood(nn_sim={nn_sim[i]:.3f}<{p.ood_min_similarity:.3f})"
        elif confidence < p.min_confidence:
            expert, reason = p.fallback_expert, f"fallback:low_confidence({confidence:.3f}<{p.min_confidence})"
        elif k != best:
            expert, reason = p.experts[k], f"cheaper_within_threshold(t={threshold:g})"
        else:
            expert, reason = p.experts[k], "best_predicted_quality"
        out.append(RoutingDecision(
            expert=expert,
            scores={name: round(float(v), 4) for name, v in zip(p.experts, q[i])},
            confidence=confidence,
            reason=reason,
            ood=ood,
            threshold=threshold,
            extra={"nn_similarity": round(float(nn_sim[i]), 4)},
        ))
    return out


def load_artifact(path: str | Path, *, expected_experts: list[str] | None = None,
                  encoder: SentenceEncoder | None = None) -> tuple[RouterDCModel, SentenceEncoder]:
    """Load and check an artifact directory; fails clearly on a mismatch."""
    import faiss

    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise RouterArtifactError(f"{d} is not a router artifact (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
        params = RouterDCParams(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise RouterArtifactError(f"{cfg_file} is corrupt or from another version: {err}") from None
    if params.version != ARTIFACT_VERSION:
        raise RouterArtifactError(f"{d}: artifact version {params.version}, this coe reads {ARTIFACT_VERSION}")
    if expected_experts is not None and sorted(expected_experts) != sorted(params.experts):
        raise RouterArtifactError(
            f"router artifact {d} was trained for experts {sorted(params.experts)} but the serving config has "
            f"{sorted(expected_experts)}; retrain with `coe router train` or fix the config"
        )
    try:
        arrays = np.load(d / "weights.npz")
        index = faiss.read_index(str(d / "index.faiss"))
    except (OSError, RuntimeError, KeyError) as err:
        raise RouterArtifactError(f"{d}: cannot read weights or index: {err}") from None
    encoder = encoder or SentenceEncoder(params.encoder or None)
    fp = encoder_fingerprint(encoder)
    if fp != params.encoder_fingerprint:
        raise RouterArtifactError(
            f"{d} was trained with encoder fingerprint {params.encoder_fingerprint}, the loaded encoder "
            f"'{encoder.name}' has {fp}"
        )
    model = RouterDCModel(params, arrays["head_w"], arrays["head_b"], arrays["expert_emb"], index,
                          arrays["knn_quality"])
    return model, encoder


def save_artifact(path: str | Path, model: RouterDCModel) -> Path:
    """Write config.json, weights.npz and index.faiss."""
    import faiss

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.params.to_json(), indent=2))
    np.savez(d / "weights.npz", head_w=model.head_w, head_b=model.head_b, expert_emb=model.expert_emb,
             knn_quality=model.knn_quality)
    faiss.write_index(model.index, str(d / "index.faiss"))
    return d
