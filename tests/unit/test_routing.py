"""The embedding router with the real packaged MiniLM encoder."""

from __future__ import annotations

import pytest

from coe.config import CoeConfig, EmbeddingRouterConfig, load_config


def _embedding_config() -> CoeConfig:
    """cpu-default's experts with the embedding router (cpu-default itself uses the trained RouterDC router)."""
    cfg = load_config("cpu-default")
    cfg.router = EmbeddingRouterConfig(fallback_expert="general")
    return cfg
from coe.routing import EmbeddingRouter


@pytest.fixture(scope="module")
def router() -> EmbeddingRouter:
    return EmbeddingRouter(_embedding_config())


@pytest.mark.parametrize(
    ("query", "expert"),
    [
        ("Write a Python function that checks whether a number is prime.", "code"),
        ("My Rust program panics with index out of bounds, how do I debug it?", "code"),
        ("Translate into French: the weather is lovely today.", "translation"),
        ("How would you say 'see you tomorrow' in French?", "translation"),
        ("What should I pack for a weekend hiking trip?", "general"),
        ("Explain how vaccines train the immune system.", "general"),
    ],
)
def test_routes_held_out_queries_to_their_domain(router: EmbeddingRouter, query: str, expert: str) -> None:
    d = router.route(query)
    assert d.expert == expert, d
    assert set(d.scores) == {"general", "code", "translation"}
    assert 0.0 <= d.confidence <= 1.0


def _router_with(router: EmbeddingRouter, **changes: float | str) -> EmbeddingRouter:
    cfg = _embedding_config()
    for k, v in changes.items():
        setattr(cfg.router, k, v)
    return EmbeddingRouter(cfg, encoder=router._encoder)


def test_query_far_from_every_expert_goes_to_fallback(router: EmbeddingRouter) -> None:
    q = "What should I pack for a weekend hiking trip?"
    assert router.route(q).expert == "general"
    strict = _router_with(router, fallback_expert="translation", min_similarity=0.6)
    d = strict.route(q)
    assert d.expert == "translation" and d.ood
    assert d.reason == "fallback:low_similarity<0.6"


def test_ambiguous_query_goes_to_fallback(router: EmbeddingRouter) -> None:
    strict = _router_with(router, fallback_expert="translation", min_confidence=0.999)
    d = strict.route("Explain how vaccines train the immune system.")
    assert d.expert == "translation" and not d.ood
    assert d.reason.startswith("fallback:low_confidence")


def test_batch_matches_single(router: EmbeddingRouter) -> None:
    qs = ["Write a SQL join", "Translate 'cat' to French", "Tell me a joke"]
    assert [d.expert for d in router.route_batch(qs)] == [router.route(q).expert for q in qs]
