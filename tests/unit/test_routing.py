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


def test_one_bad_query_fails_only_its_own_slot_of_a_batch() -> None:
    from coe.routing import Router, RoutingDecision, route_isolated

    class Picky(Router):
        def route_batch(self, queries: list[str], *, threshold: float | None = None) -> list[RoutingDecision]:
            if any("boom" in q for q in queries):
                raise ValueError("cannot encode")
            return [RoutingDecision(expert="a", scores={"a": 1.0}, confidence=1.0, reason="x") for _ in queries]

    out = route_isolated(Picky(), ["q1", "boom", "q3"], [0.0, 0.0, 0.0])
    assert [d.expert for d in (out[0], out[2])] == ["a", "a"]  # type: ignore[union-attr]
    assert isinstance(out[1], ValueError)
    assert len(route_isolated(Picky(), ["q1", "q2"], [None, None])) == 2
    assert isinstance(route_isolated(Picky(), ["boom"], [None])[0], ValueError)


def test_fallback_order_tries_the_next_candidates_then_the_fallback() -> None:
    from coe.control import fallback_order

    scores = {"big": 0.80, "mid": 0.78, "small": 0.75, "tiny": 0.40, "general": 0.50}
    prices = {"big": 3.0, "mid": 2.0, "small": 1.0, "tiny": 0.1, "general": 0.5}
    # chosen small (cheapest within t=0.06): then the others within t, cheapest first, then the fallback
    assert fallback_order(scores, prices, "small", 0.06, "general") == ["mid", "big", "general"]
    assert fallback_order(scores, prices, "big", 0.0, "general") == ["general"]
    assert fallback_order(scores, prices, "small", 0.06, "general", allowed={"small", "big"}) == ["big"]
    assert fallback_order(scores, prices, "general", 0.5, "general") == ["tiny", "small", "mid", "big"]
    assert fallback_order({}, prices, "big", 0.1, "general") == ["general"]


def test_a_missing_artifact_degrades_to_the_fallback_unless_required(tmp_path) -> None:  # noqa: ANN001
    from coe.config import parse_config
    from coe.errors import ConfigError, RouterArtifactError
    from coe.routers import build_router
    from coe.routing import DegradedRouter

    cfg = load_config("cpu-default")
    cfg.router.artifact = str(tmp_path / "nothing-here")
    r = build_router(cfg)
    assert isinstance(r, DegradedRouter) and str(tmp_path / "nothing-here") in r.why
    d = r.route("Write a Python function")
    assert (d.expert, d.reason) == ("general", "fallback:router_unavailable")
    cfg.router.require_artifact = True
    with pytest.raises(RouterArtifactError):
        build_router(cfg)
    raw = cfg.model_dump()
    raw["router"].update(require_artifact=False, fallback_expert=None)
    with pytest.raises(ConfigError, match="fallback_expert is needed"):
        parse_config(raw)
