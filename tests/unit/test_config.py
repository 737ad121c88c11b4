"""Config validation: the packaged configs load; typos and inconsistencies are refused clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from coe.config import PACKAGED_CONFIGS, load_config, packaged_config_path, parse_config
from coe.errors import ConfigError


def _raw(name: str = "cpu-default") -> dict:
    return yaml.safe_load(packaged_config_path(name).read_text())


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_load(name: str) -> None:
    cfg = load_config(name)
    assert cfg.router.fallback_expert in [e.name for e in cfg.experts]
    assert len(cfg.experts) >= 3


def test_cpu_default_needs_no_gpu_and_no_hub() -> None:
    cfg = load_config("cpu-default")
    assert all(e.engine == "llama_cpp" and e.resources.num_gpus == 0 for e in cfg.experts)
    assert all(e.source.hub is None for e in cfg.experts)
    assert sum(e.resources.num_cpus for e in cfg.experts) + cfg.server.ingress_num_cpus <= 2


def test_gpu_config_is_vllm_with_enough_gpus() -> None:
    cfg = load_config("gpu-experts")
    for e in cfg.experts:
        assert e.engine == "vllm" and e.vllm is not None
        assert e.resources.num_gpus >= e.vllm.tensor_parallel_size


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("server", "prot"), "prot"),
        (("experts", 0, "num_gpu"), "num_gpu"),
        (("experts", 0, "resources", "num_gpu"), "num_gpu"),
        (("experts", 1, "autoscaling", "max_replica"), "max_replica"),
        (("router", "fallback"), "fallback"),
    ],
)
def test_unknown_key_is_an_error_naming_key_and_file(tmp_path: Path, path: tuple, key: str) -> None:
    raw = _raw()
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = 1
    f = tmp_path / "typo.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(str(f))
    assert f"unknown key '{key}'" in exc.value.message
    assert str(f) in exc.value.message


def test_invalid_values_are_refused() -> None:
    bad = _raw()
    bad["experts"][0]["autoscaling"] = {"min_replicas": 3, "max_replicas": 1}
    with pytest.raises(ConfigError, match="min_replicas must be <= max_replicas"):
        parse_config(bad)

    bad = _raw()
    bad["experts"][1]["name"] = bad["experts"][0]["name"]
    with pytest.raises(ConfigError, match="unique"):
        parse_config(bad)

    bad = _raw()
    bad["router"]["fallback_expert"] = "nobody"
    with pytest.raises(ConfigError, match="fallback_expert"):
        parse_config(bad)

    bad = _raw()
    bad["experts"][0]["name"] = "coe-auto"
    with pytest.raises(ConfigError, match="reserved"):
        parse_config(bad)

    bad = _raw()
    bad["experts"][2]["prompt"]["template"] = "no placeholder"
    with pytest.raises(ConfigError, match="placeholder"):
        parse_config(bad)

    bad = _raw()
    bad["experts"][0]["source"] = {"package": "x", "hub": "y/z"}
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config(bad)


def test_vllm_expert_needs_gpus_for_its_parallelism() -> None:
    raw = _raw("gpu-experts")
    raw["experts"][0]["resources"]["num_gpus"] = 1
    raw["experts"][0]["vllm"]["tensor_parallel_size"] = 2
    with pytest.raises(ConfigError, match="num_gpus"):
        parse_config(raw)


def test_engine_options_must_match_engine() -> None:
    raw = copy.deepcopy(_raw())
    raw["experts"][0]["vllm"] = {"tensor_parallel_size": 1}
    with pytest.raises(ConfigError, match="vllm"):
        parse_config(raw)


def test_missing_config_is_clear() -> None:
    with pytest.raises(ConfigError, match="neither a file nor a packaged config"):
        load_config("does-not-exist")
