"""VLLMEngine on a real GPU. Skips with a reason where there is no NVIDIA GPU or no vllm.

Run on a GPU worker image: `pip install -e .[gpu,test] && pytest tests/gpu`.
The model is COE_TEST_VLLM_MODEL (a hub id or local dir; default Qwen/Qwen2.5-0.5B-Instruct).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

from coe.config import ExpertConfig
from coe.engines import EnginePrompt, SamplingParams
from coe.engines.vllm import VLLMEngine, vllm_available
from coe.errors import ContextLengthExceededError


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_gpu(), reason="no NVIDIA GPU on this machine (vLLM experts need one)"),
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (pip install -e .[gpu])"),
]

MODEL = os.environ.get("COE_TEST_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


def _expert() -> ExpertConfig:
    source = {"path": MODEL} if os.path.exists(MODEL) else {"hub": MODEL}
    return ExpertConfig.model_validate({
        "name": "gpu-test", "description": "test", "domains": ["general"], "engine": "vllm",
        "source": source, "price_per_1k_tokens": 0.001, "resources": {"num_gpus": 1},
        "vllm": {"max_model_len": 2048, "gpu_memory_utilization": 0.5, "enforce_eager": True},
    })


@pytest.fixture(scope="module")
def engine() -> VLLMEngine:
    eng = VLLMEngine(_expert())
    asyncio.run(eng.start())
    return eng


async def test_generate_and_stream_agree(engine: VLLMEngine) -> None:
    prompt = EnginePrompt(messages=({"role": "user", "content": "Name three colours."},))
    params = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)
    full = await engine.generate(prompt, params)
    assert full.text and 0 < full.completion_tokens <= 16 and full.prompt_tokens > 5
    chunks = [c async for c in engine.stream(prompt, params)]
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[-1].completion_tokens == full.completion_tokens


async def test_context_limit(engine: VLLMEngine) -> None:
    prompt = EnginePrompt(text="word " * 3000)
    with pytest.raises(ContextLengthExceededError, match="2048"):
        await engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0))


async def test_concurrent_requests(engine: VLLMEngine) -> None:
    prompt = EnginePrompt(messages=({"role": "user", "content": "Count to five."},))
    params = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)
    results = await asyncio.gather(*[engine.generate(prompt, params) for _ in range(8)])
    assert len({r.text for r in results}) == 1
