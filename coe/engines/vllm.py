"""GPU engine over vLLM's async engine. vLLM is imported only when an expert starts.

vLLM pins its own torch/transformers, so this module runs in the GPU worker image
(`pip install coe[gpu]`), never in the CPU environment.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from coe.config import ExpertConfig
from coe.engines.base import (
    EnginePrompt,
    GenerationResult,
    LogprobStats,
    SamplingParams,
    StreamChunk,
    check_context,
    collect,
)
from coe.errors import GenerationError, ModelLoadError
from coe.models import resolve_local_model

logger = logging.getLogger(__name__)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a chat rendered by the tokenizer's chat template, with the generation prompt.

    transformers 5 returns a BatchEncoding (a mapping, not a dict) from ``apply_chat_template(tokenize=True)``;
    taking ``list()`` of it gave the keys ``['input_ids', 'attention_mask']`` as the "ids". Ask for a plain list
    and accept any mapping.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    out = [int(i) for i in ids]
    if not out:
        raise GenerationError("the chat template produced no tokens")
    return out


def engine_arg_names() -> set[str]:
    """The fields vllm.AsyncEngineArgs accepts (needs vllm)."""
    import dataclasses

    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def vllm_available() -> bool:
    """Whether vllm can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """vLLM AsyncLLMEngine for one expert (tensor parallel inside the replica's GPUs)."""

    def __init__(self, expert: ExpertConfig) -> None:
        assert expert.vllm is not None
        self._expert = expert
        self._opts = expert.vllm
        self._engine: Any = None
        self._tokenizer: Any = None

    @property
    def context_length(self) -> int:
        return self._opts.max_model_len

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for vllm.AsyncEngineArgs (testable without vllm)."""
        src = self._expert.source
        model = src.hub if src.hub else str(resolve_local_model(src))
        o = self._opts
        args: dict[str, Any] = {
            "model": model,
            "served_model_name": [self._expert.name],
            "tensor_parallel_size": o.tensor_parallel_size,
            "pipeline_parallel_size": o.pipeline_parallel_size,
            "max_model_len": o.max_model_len,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "dtype": o.dtype,
            "enable_prefix_caching": o.enable_prefix_caching,
            "max_num_seqs": o.max_num_seqs,
            "enforce_eager": o.enforce_eager,
            "trust_remote_code": o.trust_remote_code,
            "disable_log_stats": not o.engine_metrics,
        }
        if o.tensor_parallel_size * o.pipeline_parallel_size > 1:
            # The replica actor holds all its GPUs (resources.num_gpus == TP x PP, one node): vLLM's multiprocessing
            # executor starts one worker per GPU inside it. Ray Serve LLM's alternative (a placement group of one
            # GPU bundle per rank and the Ray executor) would let ranks span nodes; coe does not do that.
            args["distributed_executor_backend"] = "mp"
        if src.revision:
            args["revision"] = src.revision
        if o.quantization:
            args["quantization"] = o.quantization
        if o.download_dir:
            args["download_dir"] = o.download_dir
        clash = sorted(set(o.engine_kwargs) & set(args))
        if clash:  # the config model refuses these already; this keeps engine_args honest on its own
            raise ModelLoadError(f"vllm.engine_kwargs may not set {clash}: coe sets them")
        args.update(o.engine_kwargs)
        return args

    def check_engine_args(self) -> dict[str, Any]:
        """engine_args(), refusing keys vllm.AsyncEngineArgs does not have (needs vllm)."""
        args = self.engine_args()
        unknown = sorted(set(args) - engine_arg_names())
        if unknown:
            raise ModelLoadError(f"expert '{self._expert.name}': vllm.engine_kwargs {unknown} are not fields of "
                                 "vllm.AsyncEngineArgs in the installed vllm")
        return args

    async def start(self) -> None:
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as err:
            raise ModelLoadError(
                f"expert '{self._expert.name}' uses engine vllm but vllm is not installed here; run it on a "
                "GPU worker image with `pip install coe[gpu]`"
            ) from err
        args = self.check_engine_args()
        try:
            loggers: dict[str, Any] = {}
            if self._opts.engine_metrics:
                from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

                loggers["stat_loggers"] = [RayPrometheusStatLogger]
            self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args), **loggers)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types at load
            raise ModelLoadError(f"vLLM could not load expert '{self._expert.name}': {err}") from err
        tok = self._engine.get_tokenizer()
        self._tokenizer = await tok if inspect.isawaitable(tok) else tok

    def _prompt_ids(self, prompt: EnginePrompt) -> list[int]:
        if prompt.messages is not None:
            return chat_prompt_ids(self._tokenizer, list(prompt.messages))
        assert prompt.text is not None
        return list(self._tokenizer.encode(prompt.text))

    async def stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[StreamChunk]:
        from vllm import SamplingParams as VllmSamplingParams

        ids = self._prompt_ids(prompt)
        check_context(len(ids), params.max_tokens, self.context_length)
        extra: dict[str, Any] = {}
        if params.logprobs:
            extra["logprobs"] = 0  # the sampled token's own log-probability, nothing more
        if params.json_schema:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        sp = VllmSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            **extra,
        )
        request_id = uuid.uuid4().hex
        sent = 0
        finished = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": ids}, sp, request_id):
                o = out.outputs[0]
                if len(o.text) > sent:
                    yield StreamChunk(text=o.text[sent:])
                    sent = len(o.text)
                if out.finished:
                    finished = True
                    reason = "length" if o.finish_reason == "length" else "stop"
                    yield StreamChunk(
                        text="", finish_reason=reason, prompt_tokens=len(ids), completion_tokens=len(o.token_ids),
                        extra=sampled_logprobs(o.token_ids, o.logprobs) if params.logprobs else {},
                    )
        except GeneratorExit:
            raise
        except Exception as err:  # noqa: BLE001
            if not finished:
                raise GenerationError(f"vLLM generation failed: {type(err).__name__}: {err}") from err
        finally:
            if not finished:
                await self._engine.abort(request_id)  # client gone: free the sequence's KV blocks

    async def generate(self, prompt: EnginePrompt, params: SamplingParams) -> GenerationResult:
        return await collect(self.stream(prompt, params))

    async def check_health(self) -> None:
        if self._engine is None:
            raise GenerationError(f"expert '{self._expert.name}' has no engine")
        check = getattr(self._engine, "check_health", None)
        if check is not None:
            res = check()
            if inspect.isawaitable(res):
                await res

    async def shutdown(self) -> None:
        if self._engine is not None and hasattr(self._engine, "shutdown"):
            self._engine.shutdown()
        self._engine = None


def sampled_logprobs(token_ids: Any, logprobs: Any) -> dict[str, object]:
    """The final chunk's logprob_mean / logprob_min from vLLM's per-token logprob dicts (token id -> Logprob)."""
    stats = LogprobStats()
    for tok, row in zip(list(token_ids), list(logprobs or [])):
        entry = row.get(tok) if row else None
        if entry is not None:
            stats.add(float(getattr(entry, "logprob", entry)))
    return stats.extra()
