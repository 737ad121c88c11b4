"""cpu-default's router is trained from the committed measured profile, and retrained when that changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coe.cli import default_profile, ensure_router_artifact
from coe.config import load_config
from coe.errors import RouterArtifactError


def test_default_router_trains_from_the_profile_once_and_again_when_it_is_stale(tmp_path: Path) -> None:
    config = load_config("cpu-default")
    config.router.artifact = str(tmp_path / "router")
    profile = default_profile("cpu-default")
    assert profile is not None and (profile / "matrix.jsonl").exists()
    ensure_router_artifact(config, train_from=profile)
    art = Path(config.router.artifact)
    stamp = json.loads((art / "trained_from.json").read_text())
    weights = (art / "weights.npz").stat().st_mtime_ns
    ensure_router_artifact(config, train_from=profile)  # same profile: kept
    assert (art / "weights.npz").stat().st_mtime_ns == weights
    (art / "trained_from.json").write_text(json.dumps({**stamp, "digest": "from-another-profile"}))
    ensure_router_artifact(config, train_from=profile)  # stale: retrained
    assert (art / "weights.npz").stat().st_mtime_ns != weights
    assert json.loads((art / "trained_from.json").read_text()) == stamp
    from coe.routerdc import RouterDCRouter

    router = RouterDCRouter(art, expected_experts=[e.name for e in config.experts])
    assert router.fallback_expert == "general"


def test_a_profile_of_other_experts_is_refused(tmp_path: Path) -> None:
    config = load_config("cpu-default")
    config.router.artifact = str(tmp_path / "router")
    config.experts = config.experts[:2]
    with pytest.raises(RouterArtifactError, match="measured experts"):
        ensure_router_artifact(config, train_from=default_profile("cpu-default"))
