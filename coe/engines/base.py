"""The engine protocol every expert backend implements (llama.cpp on CPU, vLLM on GPU)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters after defaults and limits were applied by the expert server."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False  # report the mean and minimum log-probability of the generated tokens
    json_schema: str | None = None  # constrain the output to this JSON schema (the engine's structured output)


@dataclass(frozen=True)
class EnginePrompt:
    """Input to an engine: chat messages (rendered with the model's chat template) or raw text."""

    messages: tuple[dict[str, str], ...] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("EnginePrompt needs exactly one of messages or text")


@dataclass
class GenerationResult:
    """A finished generation with real token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprob_mean: float | None = None  # of the generated tokens, natural log, at temperature 1 (when asked)
    logprob_min: float | None = None


@dataclass
class StreamChunk:
    """One streamed delta. The last chunk has finish_reason set, the final token counts and, when asked, the
    generated tokens' log-probabilities (`extra`: logprob_mean, logprob_min)."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """An LLM backend owned by one expert replica.

    Cancelling the task that iterates :meth:`stream` (client disconnect) must stop generation.
    Errors are :class:`coe.errors.CoeError` subclasses (context length -> 400, failures -> 500).
    """

    @property
    def context_length(self) -> int:
        """Maximum prompt + completion tokens."""
        ...

    async def start(self) -> None:
        """Load the model; called once per replica before serving."""
        ...

    async def generate(self, prompt: EnginePrompt, params: SamplingParams) -> GenerationResult:
        """Generate a whole completion."""
        ...

    def stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[StreamChunk]:
        """Generate incrementally."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    async def shutdown(self) -> None:
        """Release the model."""
        ...


async def collect(chunks: AsyncIterator[StreamChunk]) -> GenerationResult:
    """Join a stream into one result (engines implement generate() with it)."""
    parts: list[str] = []
    last = StreamChunk(text="")
    async for chunk in chunks:
        parts.append(chunk.text)
        last = chunk
    if last.finish_reason is None:
        raise RuntimeError("engine stream ended without a final chunk")
    return GenerationResult("".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason,
                            _opt_float(last.extra.get("logprob_mean")), _opt_float(last.extra.get("logprob_min")))


def _opt_float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


class LogprobStats:
    """Running mean and minimum of the generated tokens' log-probabilities."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.low = 0.0

    def add(self, lp: float) -> None:
        self.total += lp
        self.count += 1
        self.low = min(self.low, lp)

    def extra(self) -> dict[str, object]:
        """The final chunk's `extra` (empty when no token was scored)."""
        if not self.count:
            return {}
        return {"logprob_mean": self.total / self.count, "logprob_min": self.low}


def check_context(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """Raise a 400 naming the limit when prompt + max_tokens does not fit the context."""
    from coe.errors import ContextLengthExceededError

    if prompt_tokens + max_tokens > context_length:
        raise ContextLengthExceededError(
            f"This expert's maximum context length is {context_length} tokens. Your request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} completion tokens "
            f"({prompt_tokens + max_tokens} in total). Shorten the prompt or lower max_tokens.",
            param="messages",
        )
