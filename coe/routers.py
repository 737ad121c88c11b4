"""Which router a config asks for. Its own module: the router implementations (coe.routing, coe.routerdc) import
the interface, and only this factory imports them all."""

from __future__ import annotations

from coe.config import CoeConfig
from coe.errors import RouterArtifactError
from coe.routerdc import RouterDCRouter
from coe.routing import DegradedRouter, EmbeddingRouter, Router


def build_router(config: CoeConfig) -> Router:
    """The router the config asks for (a RouterDC artifact is checked against the config's experts). A missing or
    corrupt artifact gives a :class:`DegradedRouter` unless router.require_artifact (then RouterArtifactError)."""
    rc = config.router
    if rc.kind == "routerdc":
        try:
            return RouterDCRouter(rc.artifact_path(), expected_experts=[e.name for e in config.experts],
                                  threshold=rc.threshold, fallback_expert=rc.fallback_expert,
                                  min_confidence=rc.min_confidence, cache_size=rc.cache_size)
        except RouterArtifactError as err:
            if rc.require_artifact or rc.fallback_expert is None:
                raise
            return DegradedRouter([e.name for e in config.experts], rc.fallback_expert, err.message)
    return EmbeddingRouter(config)
