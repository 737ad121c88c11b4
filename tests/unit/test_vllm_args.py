"""The vLLM engine's arguments are derived from the config without importing vllm."""

from __future__ import annotations

import sys

from coe.config import load_config
from coe.engines.vllm import VLLMEngine


def test_engine_args_follow_config_and_vllm_is_not_imported() -> None:
    cfg = load_config("gpu-experts")
    general = cfg.expert("general")
    args = VLLMEngine(general).engine_args()
    assert args["model"] == general.source.hub
    assert args["tensor_parallel_size"] == 2 and args["max_model_len"] == general.vllm.max_model_len
    assert args["served_model_name"] == ["general"]
    assert "vllm" not in sys.modules  # lazily imported: only an expert start loads it
