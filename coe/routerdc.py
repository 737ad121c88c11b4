"""The trained RouterDC router (inference side): load an artifact, score experts, decide.

Per query x with encoder embedding E(x):
  * RouterDC score of expert k: cos(W E(x) + b, e_k) / tau  (learned head W, b and expert embeddings e_k);
  * group prior: a softmax classifier over the training groups (the training files, i.e. tasks) gives
    P(g | x); the prior quality is sum_g P(g | x) * mean quality of each expert on group g;
  * kNN quality: each expert's correctness on the nearest training queries (FAISS inner-product index over
    unit embeddings), similarity-weighted and shrunk towards the prior with a per-group strength m_g
    (empirical Bayes: q = (sum_j w_j c_jk + m(x) prior_k) / (sum_j w_j + m(x))), m_g chosen by
    cross-validation on the training files: where neighbours carry signal m_g is small, where they are
    noise it is large;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from coe.control import Overflow, choose_within_threshold, spill_overflow
from coe.encoder import Quantization, SentenceEncoder
from coe.errors import RouterArtifactError
from coe.routing import RoutedText, Router, RoutingDecision, embed_routed, turn_texts
from coe.stats import softmax

ARTIFACT_VERSION = 2
ENCODER_TOP_FILE = "encoder_top.safetensors"


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
    groups: list[str] = field(default_factory=list)  # training groups (tasks) of the prior
    default_threshold: float = 0.0
    encoder_quantization: str = "none"  # SentenceEncoder(quantize=...) it was trained and must serve with
    encoder_finetuned_layers: int = 0  # top encoder blocks replaced by the artifact's encoder_top.safetensors
    version: int = ARTIFACT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


PROBE_MIN_COSINE = 0.9999  # the same encoder on another CPU differs by ~1e-6; int8 against float by ~1e-2


def encoder_probe(encoder: SentenceEncoder) -> np.ndarray:
    """The encoder's embeddings of fixed probe sentences (what an artifact checks its serving encoder by)."""
    long_probe = "shared few-shot prefix " * 200 + "which end of a long input does the encoder keep?"
    return encoder.encode(["coe router fingerprint probe", "2 + 2 = 4", "def f(x): return x", long_probe])


def encoder_fingerprint(encoder: SentenceEncoder, probe: np.ndarray | None = None) -> str:
    """A stable id of the encoder's behaviour: a hash of its (rounded) probe embeddings."""
    probe = encoder_probe(encoder) if probe is None else probe
    return hashlib.sha256(np.round(probe, 4).tobytes()).hexdigest()[:16]


@dataclass
class GroupPrior:
    """P(group | x) by a linear softmax classifier, each group's mean quality, each group's shrinkage m_g."""

    weight: np.ndarray  # (d, G)
    bias: np.ndarray  # (G,)
    mean_quality: np.ndarray  # (G, k)
    strength: np.ndarray  # (G,)

    def proba(self, emb: np.ndarray) -> np.ndarray:
        return softmax(emb @ self.weight + self.bias)


class RouterDCModel:
    """The numeric part of the router, shared by training-time evaluation and serving."""

    def __init__(self, params: RouterDCParams, head_w: np.ndarray, head_b: np.ndarray, expert_emb: np.ndarray,
                 index: Any, knn_quality: np.ndarray, prior: GroupPrior,
                 encoder_top_layers: dict[str, Any] | None = None, encoder_probe: np.ndarray | None = None) -> None:
        self.params = params
        self.encoder_probe = encoder_probe  # the training encoder's probe embeddings (see load_artifact)
        self.encoder_top_layers = encoder_top_layers or {}  # fine-tuned encoder blocks (saved with the artifact)
        self.head_w = head_w.astype(np.float32)
        self.head_b = head_b.astype(np.float32)
        e = expert_emb.astype(np.float32)
        self.expert_emb = e / np.linalg.norm(e, axis=1, keepdims=True)
        self.index = index
        self.knn_quality = np.nan_to_num(knn_quality.astype(np.float32), nan=0.0)
        self.prior = prior
        self.prices = np.array([params.prices.get(x, 0.0) for x in params.experts], dtype=np.float64)

    def dc_logits(self, emb: np.ndarray) -> np.ndarray:
        h = emb @ self.head_w.T + self.head_b
        h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-8)
        return (h @ self.expert_emb.T) / self.params.tau

    def neighbours(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (n, knn_k), training-row ids (n, knn_k)) of the nearest training queries."""
        return self.index.search(np.ascontiguousarray(emb, dtype=np.float32), self.params.knn_k)

    def knn(self, emb: np.ndarray, nn: tuple[np.ndarray, np.ndarray] | None = None,
            shrink: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(quality estimate (n, k), nearest similarity (n,)); shrink=False is the plain kNN baseline."""
        sims, ids = nn if nn is not None else self.neighbours(emb)
        w = np.exp((sims - sims[:, :1]) / self.params.knn_tau)  # the nearest neighbour weighs 1
        num = np.einsum("nj,njk->nk", w, self.knn_quality[ids])
        den = w.sum(axis=1, keepdims=True)
        if not shrink:
            return num / den, sims[:, 0]
        p = self.prior.proba(emb)
        m = (p @ self.prior.strength)[:, None]
        return (num + m * (p @ self.prior.mean_quality)) / (den + m), sims[:, 0]

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

    def choose(self, q: np.ndarray, threshold: float | np.ndarray,
               penalties: np.ndarray | None = None) -> np.ndarray:
        """Cheapest expert within `threshold` of the best predicted quality, load penalties applied."""
        return choose_within_threshold(q, self.prices, threshold, penalties)


class RouterDCRouter(Router):
    """The serving router over a saved artifact (see router_models/ for training)."""

    def __init__(self, artifact_dir: str | Path, *, expected_experts: list[str] | None = None,
                 encoder: SentenceEncoder | None = None, threshold: float | None = None,
                 fallback_expert: str | None = None, min_confidence: float | None = None,
                 cache_size: int = 0) -> None:
        self.model, self.encoder = load_artifact(artifact_dir, expected_experts=expected_experts, encoder=encoder)
        self._cache = EmbeddingCache(cache_size)
        self.default_threshold = self.model.params.default_threshold if threshold is None else threshold
        if fallback_expert is not None:
            if fallback_expert not in self.model.params.experts:
                raise RouterArtifactError(f"fallback expert '{fallback_expert}' is not one of the artifact's experts")
            self.model.params.fallback_expert = fallback_expert
        if min_confidence is not None:
            self.model.params.min_confidence = min_confidence

    @property
    def experts(self) -> list[str]:
        return list(self.model.params.experts)

    @property
    def uses_threshold(self) -> bool:
        return True

    @property
    def fallback_expert(self) -> str | None:
        return self.model.params.fallback_expert

    def route_batch(self, queries: list[RoutedText], *, threshold: float | None = None) -> list[RoutingDecision]:
        return self.route_each(queries, [threshold] * len(queries))

    def route_each(self, queries: list[RoutedText], thresholds: list[float | None],
                   penalties: dict[str, float] | None = None,
                   overflow: Overflow | None = None) -> list[RoutingDecision]:
        """One encoder pass for the batch; each query with its own threshold (None: the default)."""
        t = np.array([self.default_threshold if x is None else x for x in thresholds], dtype=np.float64)
        # Penalties only remove loaded experts from a request's candidates, and the overflow rule moves a request
        # at most its t_spill (never above its own cap): premium requests (cap 0) are never moved by load.
        return decide(self.model, self.embed(queries), t, penalties, overflow)

    def embed(self, queries: list[RoutedText]) -> np.ndarray:
        """The queries' embeddings (a conversation's: the weighted mean of its turns'), each text from the cache when
        it holds the exact text; the misses in one encoder pass. A conversation's earlier turns were routed before,
        so usually only its new turn is encoded."""

        def encode(texts: list[str]) -> list[np.ndarray]:
            rows = [self._cache.get(t) for t in texts]
            missing = [i for i, r in enumerate(rows) if r is None]
            if missing:
                fresh = self.encoder.encode([texts[i] for i in missing])
                for j, i in enumerate(missing):
                    rows[i] = fresh[j]
                    self._cache.put(texts[i], fresh[j])
            return rows  # type: ignore[return-value]

        return embed_routed(encode, queries)

    def is_cached(self, query: RoutedText) -> bool:
        """Whether a decision for `query` needs no encoder pass (every text of it cached)."""
        return all(self._cache.has(t) for t in turn_texts(query))


class EmbeddingCache:
    """A bounded LRU of text -> embedding, safe across the routing threads."""

    def __init__(self, size: int) -> None:
        import threading
        from collections import OrderedDict

        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def has(self, text: str) -> bool:
        return self.size > 0 and text in self._items

    def get(self, text: str) -> np.ndarray | None:
        if self.size <= 0:
            return None
        with self._lock:
            row = self._items.get(text)
            if row is None:
                self.misses += 1
                return None
            self._items.move_to_end(text)
            self.hits += 1
            return row

    def put(self, text: str, row: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[text] = row
            self._items.move_to_end(text)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class Decisions:
    """Vectorised decisions for a batch (what `decide` turns into RoutingDecision objects)."""

    chosen: np.ndarray  # (n,) expert index actually used (after fallback)
    best: np.ndarray  # (n,) expert with the highest predicted quality
    quality: np.ndarray  # (n, k) fused predicted quality
    confidence: np.ndarray  # (n,) calibrated probability that `best` is the best expert
    margin: np.ndarray  # (n,) calibrated probability gap between the top two experts
    nn_similarity: np.ndarray  # (n,) similarity to the nearest training query
    ood: np.ndarray  # (n,) bool
    low_confidence: np.ndarray  # (n,) bool
    load_shifted: np.ndarray  # (n,) bool: the load penalties changed the choice
    overflowed: np.ndarray  # (n,) bool: the overflow rule moved the request off a full expert


def decide_arrays(model: RouterDCModel, emb: np.ndarray, threshold: float | np.ndarray,
                  parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                  penalties: dict[str, float] | np.ndarray | None = None,
                  overflow: Overflow | None = None) -> Decisions:
    """Decisions for encoder embeddings; `parts` = a precomputed `model.quality(emb)` (for t sweeps).

    `penalties` (expert -> quality points, from the load controller) take loaded experts out of each request's
    candidates (:func:`coe.control.choose_within_threshold`); the scores reported stay unpenalised.
    `overflow`: requests whose choice is full move at once (:func:`coe.control.spill_overflow`; fallbacks stay).
    """
    p = model.params
    q, _, nn_sim = parts if parts is not None else model.quality(emb)
    if isinstance(penalties, dict):
        penalties = np.array([penalties.get(x, 0.0) for x in p.experts])[None, :] if penalties else None
    conf = softmax(q, p.calib_temperature)
    top2 = np.sort(conf, axis=1)[:, -2:] if conf.shape[1] > 1 else np.concatenate([conf * 0, conf], 1)
    best = q.argmax(axis=1)
    confidence = conf[np.arange(len(q)), best]
    ood = nn_sim < p.ood_min_similarity
    low = ~ood & (confidence < p.min_confidence)
    chosen = model.choose(q, threshold, penalties)
    shifted = chosen != model.choose(q, threshold) if penalties is not None else np.zeros(len(q), dtype=bool)
    chosen = np.where(ood | low, p.experts.index(p.fallback_expert), chosen)
    spilled = np.zeros(len(q), dtype=bool)
    if overflow is not None:
        t_row = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(q),))
        eligible = ~(ood | low) & (np.asarray(overflow.t_spill, dtype=np.float64) > t_row + 1e-12)
        chosen, spilled = spill_overflow(q, model.prices, chosen, eligible, overflow, penalties)
    return Decisions(chosen=chosen, best=best, quality=q, confidence=confidence, margin=top2[:, 1] - top2[:, 0],
                     nn_similarity=nn_sim, ood=ood, low_confidence=low,
                     load_shifted=shifted & ~(ood | low) & ~spilled, overflowed=spilled)


def decide(model: RouterDCModel, emb: np.ndarray, threshold: float | np.ndarray,
           penalties: dict[str, float] | np.ndarray | None = None,
           overflow: Overflow | None = None) -> list[RoutingDecision]:
    """Decisions for encoder embeddings (shared by serving and evaluation)."""
    p = model.params
    d = decide_arrays(model, emb, threshold, penalties=penalties, overflow=overflow)
    ts = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(emb),))
    out = []
    for i in range(len(emb)):
        threshold_i = float(overflow.t_spill[i]) if d.overflowed[i] and overflow is not None else float(ts[i])
        k, best, nn = int(d.chosen[i]), int(d.best[i]), float(d.nn_similarity[i])
        confidence = float(d.confidence[i])
        if d.ood[i]:
            reason = f"fallback:ood(nn_sim={nn:.3f}<{p.ood_min_similarity:.3f})"
        elif d.low_confidence[i]:
            reason = f"fallback:low_confidence({confidence:.3f}<{p.min_confidence})"
        elif d.overflowed[i]:
            reason = f"overflow(t={threshold_i:g})"
        elif d.load_shifted[i]:
            reason = f"load_shift(t={threshold_i:g})"
        elif k != best:
            reason = f"cheaper_within_threshold(t={threshold_i:g})"
        else:
            reason = "best_predicted_quality"
        out.append(RoutingDecision(
            expert=p.experts[k],
            scores={name: round(float(v), 4) for name, v in zip(p.experts, d.quality[i])},
            confidence=confidence,
            reason=reason,
            ood=bool(d.ood[i]),
            threshold=threshold_i,
            extra={"nn_similarity": round(nn, 4), "margin": round(float(d.margin[i]), 4),
                   "best_expert": p.experts[best]},
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
        arrays = dict(np.load(d / "weights.npz"))
        index = faiss.read_index(str(d / "index.faiss"))
        prior = GroupPrior(arrays["group_w"], arrays["group_b"], arrays["group_mean_quality"],
                           arrays["group_strength"])
        head = (arrays["head_w"], arrays["head_b"], arrays["expert_emb"], arrays["knn_quality"])
        trained_probe = arrays.get("encoder_probe")
    except (OSError, RuntimeError, KeyError) as err:
        raise RouterArtifactError(f"{d}: cannot read weights or index: {err}") from None
    top_layers: dict[str, Any] = {}
    if params.encoder_finetuned_layers:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            top_layers = load_file(str(d / ENCODER_TOP_FILE))
        except (OSError, SafetensorError) as err:
            raise RouterArtifactError(f"{d}: cannot read the fine-tuned encoder blocks ({ENCODER_TOP_FILE}): "
                                      f"{err}") from None
    if encoder is None:  # the encoder it was trained with (ModelLoadError names a missing or unknown one)
        quantize = cast(Quantization, params.encoder_quantization)
        encoder = SentenceEncoder(params.encoder or None, quantize=quantize, top_layers=top_layers)
    probe = encoder_probe(encoder)
    fp = encoder_fingerprint(encoder, probe)
    # The probe embeddings decide when the artifact has them: the hash of rounded values can differ between
    # CPUs (an image trained on one machine, served on another) where the embeddings agree to ~1e-6.
    if trained_probe is not None and trained_probe.shape == probe.shape:
        worst = float((trained_probe * probe).sum(axis=1).min())
        same = worst >= PROBE_MIN_COSINE
    else:
        worst, same = float("nan"), fp == params.encoder_fingerprint
    if not same:
        raise RouterArtifactError(
            f"{d} was trained with encoder fingerprint {params.encoder_fingerprint}, the loaded encoder "
            f"'{encoder.name}' (quantization {encoder.quantize}) has {fp} (probe cosine {worst:.4f}, needs "
            f"{PROBE_MIN_COSINE})"
        )
    model = RouterDCModel(params, head[0], head[1], head[2], index, head[3], prior, encoder_top_layers=top_layers,
                          encoder_probe=trained_probe)
    return model, encoder


def save_artifact(path: str | Path, model: RouterDCModel) -> Path:
    """Write config.json, weights.npz, index.faiss and, when fine-tuned, the encoder's top blocks."""
    import faiss

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.params.to_json(), indent=2))
    probe = {} if model.encoder_probe is None else {"encoder_probe": model.encoder_probe}
    np.savez(d / "weights.npz", head_w=model.head_w, head_b=model.head_b, expert_emb=model.expert_emb,
             knn_quality=model.knn_quality, group_w=model.prior.weight, group_b=model.prior.bias,
             group_mean_quality=model.prior.mean_quality, group_strength=model.prior.strength, **probe)
    faiss.write_index(model.index, str(d / "index.faiss"))
    if model.encoder_top_layers:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.encoder_top_layers.items()}, str(d / ENCODER_TOP_FILE))
    else:
        (d / ENCODER_TOP_FILE).unlink(missing_ok=True)  # a stale one from an earlier artifact in this directory
    return d
