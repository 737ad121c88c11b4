"""Engines behind the :class:`Engine` protocol. vLLM is imported lazily (GPU extra only)."""

from __future__ import annotations

from coe.config import ExpertConfig
from coe.engines.base import Engine, EnginePrompt, GenerationResult, SamplingParams, StreamChunk

__all__ = ["Engine", "EnginePrompt", "GenerationResult", "SamplingParams", "StreamChunk", "make_engine"]


def make_engine(expert: ExpertConfig) -> Engine:
    """The engine an expert's config asks for (not started yet)."""
    if expert.engine == "llama_cpp":
        from coe.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(expert)
    from coe.engines.vllm import VLLMEngine

    return VLLMEngine(expert)
