"""The app builder: typed args, one deployment per expert with the config's resources."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coe.config import load_config
from deployments.app import AppArgs, build_app, ingress_deployment_options
from deployments.expert import expert_deployment_options


def test_build_app_accepts_serve_style_args() -> None:
    app = build_app({"config": "cpu-default"})
    assert type(app).__name__ == "Application"


def test_build_app_rejects_unknown_args() -> None:
    with pytest.raises(ValidationError):
        build_app({"confg": "cpu-default"})
    with pytest.raises(ValueError, match="either"):
        AppArgs(config="cpu-default", config_inline={}).load()


def test_inline_config_is_validated_strictly() -> None:
    raw = load_config("cpu-default").model_dump()
    raw["experts"][0]["max_ongoing_request"] = 3
    from coe.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'max_ongoing_request'"):
        AppArgs(config_inline=raw).load()


def test_expert_options_carry_resources_and_autoscaling() -> None:
    cfg = load_config("gpu-experts")
    opts = expert_deployment_options(cfg.expert("general"))
    assert opts["name"] == "general"
    assert opts["ray_actor_options"] == {"num_cpus": 8, "num_gpus": 2}
    assert opts["autoscaling_config"]["max_replicas"] == 8
    assert opts["max_ongoing_requests"] == 128
    ingress = ingress_deployment_options(cfg)
    assert ingress["autoscaling_config"]["min_replicas"] == 2
    fixed = expert_deployment_options(load_config("cpu-default").expert("code"))
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed


def test_replica_affinity_is_on_where_an_expert_may_have_several_replicas() -> None:
    from coe.config import AutoscalingConfig
    from deployments.expert import AFFINITY_ROUTER

    one = load_config("cpu-default").expert("general")
    assert "request_router_config" not in expert_deployment_options(one)
    many = one.model_copy(update={"autoscaling": AutoscalingConfig(min_replicas=1, max_replicas=3)})
    assert expert_deployment_options(many)["request_router_config"].request_router_class == AFFINITY_ROUTER
    off = many.model_copy(update={"replica_affinity": False})
    assert "request_router_config" not in expert_deployment_options(off)
    forced = one.model_copy(update={"replica_affinity": True})
    assert "request_router_config" in expert_deployment_options(forced)
