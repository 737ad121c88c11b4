"""VLLMEngine and a vLLM expert in the real service, on a GPU. Skips with a reason without a GPU or vllm.

vLLM has not run in this project yet: see tests/gpu/README.md for the exact steps on a GPU machine.
The model is COE_TEST_VLLM_MODEL (a local directory or a hub id; default Qwen/Qwen2.5-0.5B-Instruct).

One event loop for the whole module (vLLM's async engine binds its output handler to the loop it started on),
the engine shut down at teardown, and a timeout on every test, so a stuck engine fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from coe.config import ExpertConfig
from coe.engines import EnginePrompt, SamplingParams
from coe.engines.vllm import VLLMEngine, vllm_available
from coe.errors import ContextLengthExceededError


def _gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return len([ln for ln in r.stdout.splitlines() if ln.startswith("GPU ")]) if r.returncode == 0 else 0


GPUS = _gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason="no NVIDIA GPU on this machine (vLLM experts need one)"),
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (see tests/gpu/README.md)"),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
]

MODEL = os.environ.get("COE_TEST_VLLM_MODEL", "Qwen/Qwen2.5-0.5B-Instruct")


def _expert(tp: int = 1, **vllm: object) -> ExpertConfig:
    source = {"path": MODEL} if os.path.exists(MODEL) else {"hub": MODEL}
    return ExpertConfig.model_validate({
        "name": "gpu-test", "description": "test", "domains": ["general"], "engine": "vllm",
        "source": source, "price_per_1k_tokens": 0.001, "resources": {"num_gpus": tp},
        "vllm": {"max_model_len": 2048, "gpu_memory_utilization": 0.4, "enforce_eager": True,
                 "tensor_parallel_size": tp, **vllm},
    })


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> AsyncIterator[VLLMEngine]:
    eng = VLLMEngine(_expert())
    await asyncio.wait_for(eng.start(), 600)
    try:
        yield eng
    finally:
        await eng.shutdown()


def test_engine_args_are_async_engine_args_fields() -> None:
    from coe.engines.vllm import engine_arg_names

    e = _expert(engine_kwargs={"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                      "prompt_lookup_max": 3}})
    args = VLLMEngine(e).check_engine_args()
    assert set(args) <= engine_arg_names()


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


async def test_logprobs_of_the_generated_tokens(engine: VLLMEngine) -> None:
    prompt = EnginePrompt(messages=({"role": "user", "content": "What is 2 + 2? Answer with a number."},))
    res = await engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, logprobs=True))
    assert res.logprob_mean is not None and res.logprob_min is not None
    assert res.logprob_min <= res.logprob_mean <= 0.0
    plain = await engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0))
    assert plain.logprob_mean is None and plain.text == res.text


async def test_json_schema_constrains_the_output(engine: VLLMEngine) -> None:
    import json

    from coe.strategies.plan import parse_plan, plan_schema

    domains = ["general", "math", "translation"]
    prompt = EnginePrompt(messages=({"role": "user", "content": "Split into parts: (a) 2+2 (b) say hi in French"},))
    res = await engine.generate(prompt, SamplingParams(max_tokens=256, temperature=0.0, top_p=1.0,
                                                       json_schema=json.dumps(plan_schema(domains, 4))))
    data = json.loads(res.text)
    assert 1 <= len(data["nodes"]) <= 4 and all(n["domain"] in domains for n in data["nodes"])
    try:
        parse_plan(data, domains, 4)
    except ValueError as err:  # a schema-valid plan may still be refused (a cycle): never a parse error
        assert "JSON" not in str(err)


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    """The real service with one vLLM expert (0.4 of the GPU's memory, next to the engine fixture's 0.4)."""
    import ray
    from ray import serve

    from coe.cli import start_local_serve
    from coe.config import parse_config
    from tests.serve.api import wait_ready

    tp = 2 if GPUS >= 2 else 1
    e = _expert(tp).model_dump()
    e["name"] = "general"
    cfg = parse_config({"router": {"kind": "embedding", "fallback_expert": "general"}, "experts": [e],
                        "controller": {"enabled": False}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    info = start_local_serve(cfg, port=port, dashboard=False)
    try:
        wait_ready(info["url"], timeout=900)
        yield info["url"]
    finally:
        serve.shutdown()
        ray.shutdown()


def test_chat_and_stream_through_the_service(service: str) -> None:
    """Tensor parallel 2 where two GPUs are present."""
    from openai import OpenAI

    key = os.environ.get("COE_ADMIN_KEY") or "unused"
    client = OpenAI(base_url=f"{service}/v1", api_key=key, max_retries=0, timeout=300)
    r = client.chat.completions.with_raw_response.create(
        model="coe-auto", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert r.headers["x-coe-expert"] == "general" and r.parse().choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="general", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True)
        if c.choices]
    assert "".join(parts)
