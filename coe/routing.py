"""The router interface and the first real router (nearest expert by sentence embedding).

A router maps query text to one expert name with per-expert scores. The trained RouterDC router
(router_models/) implements the same interface and replaces this one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coe.config import CoeConfig
from coe.encoder import SentenceEncoder
from coe.stats import softmax

if TYPE_CHECKING:
    from coe.control import Overflow


# A conversation's recent turns as (text, weight); a router decides on the weighted mean of their embeddings.
Turns = tuple[tuple[str, float], ...]
RoutedText = str | Turns


def turn_texts(query: RoutedText) -> list[str]:
    """The texts a routed query is made of."""
    return [query] if isinstance(query, str) else [t for t, _ in query]


def combine(query: RoutedText, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The query's embedding from its texts' (unit norm): a single text's own, a conversation's weighted mean,
    normalised."""
    if isinstance(query, str):
        return rows[query]
    v = sum(w * rows[t] for t, w in query)
    return np.asarray(v / max(float(np.linalg.norm(v)), 1e-12), dtype=np.float32)


def embed_routed(encode: Any, queries: list[RoutedText]) -> np.ndarray:
    """Embeddings of routed queries with one `encode` call for their distinct texts."""
    texts = list(dict.fromkeys(t for q in queries for t in turn_texts(q)))
    rows = dict(zip(texts, encode(texts))) if texts else {}
    return np.stack([combine(q, rows) for q in queries])


def last_turn(query: RoutedText) -> str:
    """The text a routed query leads with (its last user turn)."""
    return query if isinstance(query, str) else query[0][0]


@dataclass
class RoutingDecision:
    """Which expert answers, and why."""

    expert: str
    scores: dict[str, float]
    confidence: float
    reason: str
    ood: bool = False
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Router(abc.ABC):
    """Picks one expert per query."""

    @abc.abstractmethod
    def route_batch(self, queries: list[RoutedText], *, threshold: float | None = None) -> list[RoutingDecision]:
        """Decisions for a batch of queries (texts, or conversations' weighted turns), in order."""

    def route_each(self, queries: list[RoutedText], thresholds: list[float | None],
                   penalties: dict[str, float] | None = None,
                   overflow: Overflow | None = None) -> list[RoutingDecision]:
        """Decisions for a batch where each query has its own threshold (routers without t ignore t, the load
        penalties and the overflow rule)."""
        return self.route_batch(queries)

    @property
    def uses_threshold(self) -> bool:
        """Whether the cost/quality threshold t changes this router's decisions."""
        return False

    def is_cached(self, query: RoutedText) -> bool:
        """Whether deciding `query` needs no encoder pass (a cache hit): the caller may decide it inline."""
        return False

    @property
    def fallback_expert(self) -> str | None:
        """The safe generalist uncertain queries go to (and the last candidate when calls fail)."""
        return None

    def route(self, query: RoutedText, *, threshold: float | None = None) -> RoutingDecision:
        """The decision for one query."""
        return self.route_batch([query], threshold=threshold)[0]


class _ConfiguredRouter(Router):
    """A router whose experts and fallback come from the coe config (not from a trained artifact)."""

    def __init__(self, experts: list[str], fallback_expert: str) -> None:
        self._experts = list(experts)
        self._fallback = fallback_expert

    @property
    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def fallback_expert(self) -> str | None:
        return self._fallback


class DegradedRouter(_ConfiguredRouter):
    """Stands in while the trained router cannot load: every coe-auto request goes to the fallback expert."""

    def __init__(self, experts: list[str], fallback_expert: str, why: str) -> None:
        super().__init__(experts, fallback_expert)
        self.why = why

    def route_batch(self, queries: list[RoutedText], *, threshold: float | None = None) -> list[RoutingDecision]:
        return [RoutingDecision(expert=self._fallback, scores={}, confidence=0.0,
                                reason="fallback:router_unavailable") for _ in queries]


def route_isolated(router: Router, queries: list[RoutedText], thresholds: list[float | None],
                   penalties: dict[str, float] | None = None,
                   overflow: Overflow | None = None) -> list[RoutingDecision | Exception]:
    """One decision per query, batched; if the batch fails, each query is routed alone, so a bad one yields its
    own exception in its slot and the others their decisions (the overflow rule is skipped on that path)."""
    try:
        return list(router.route_each(queries, thresholds, penalties, overflow))
    except Exception as batch_err:  # noqa: BLE001 - find the bad item(s)
        if len(queries) == 1:
            return [batch_err]
    out: list[RoutingDecision | Exception] = []
    for q, t in zip(queries, thresholds):
        try:
            out.append(router.route_each([q], [t], penalties, None)[0])
        except Exception as err:  # noqa: BLE001 - this query's own error
            out.append(err)
    return out


class EmbeddingRouter(_ConfiguredRouter):
    """Nearest expert: cosine similarity of the query to each expert's description and examples.

    An expert's score is its best similarity over its reference texts; softmax over scores gives
    the confidence. Below `min_similarity` (far from every expert) or `min_confidence` (no clear
    winner) the query goes to the fallback expert, as Samba-CoE does.
    """

    def __init__(self, config: CoeConfig, encoder: SentenceEncoder | None = None) -> None:
        rc = config.router
        super().__init__([e.name for e in config.experts], rc.fallback_expert)
        self._encoder = encoder or SentenceEncoder(rc.encoder)
        self._min_similarity = rc.min_similarity
        self._temperature = rc.temperature
        self._min_confidence = rc.min_confidence
        texts: list[str] = []
        owner: list[int] = []
        for i, e in enumerate(config.experts):
            refs = [e.description, *(f"{d} question" for d in e.domains), *e.examples]
            texts.extend(refs)
            owner.extend([i] * len(refs))
        self._refs = self._encoder.encode(texts)
        self._owner = np.asarray(owner)

    def route_batch(self, queries: list[RoutedText], *, threshold: float | None = None) -> list[RoutingDecision]:
        q = embed_routed(self._encoder.encode, queries)
        sims = q @ self._refs.T  # (n, refs)
        scores = np.full((len(queries), len(self._experts)), -1.0, dtype=np.float32)
        for k in range(len(self._experts)):
            scores[:, k] = sims[:, self._owner == k].max(axis=1)
        probs = softmax(scores, self._temperature)
        out = []
        for row, p in zip(scores, probs):
            best = int(row.argmax())
            per = {name: round(float(s), 4) for name, s in zip(self._experts, row)}
            reason = None
            if float(row[best]) < self._min_similarity:
                reason = f"fallback:low_similarity<{self._min_similarity}"
            elif float(p[best]) < self._min_confidence:
                reason = f"fallback:low_confidence<{self._min_confidence}"
            if reason is not None:
                out.append(
                    RoutingDecision(
                        expert=self._fallback,
                        scores=per,
                        confidence=float(p[best]),
                        reason=reason,
                        ood=reason.startswith("fallback:low_similarity"),
                    )
                )
            else:
                out.append(
                    RoutingDecision(
                        expert=self._experts[best],
                        scores=per,
                        confidence=float(p[best]),
                        reason="nearest_expert",
                    )
                )
        return out
