"""Request strategies beyond one-shot routing: cascade (cheapest acceptable expert first, escalate when its answer
looks wrong) and Skeleton Graph Decoding (a plan of sub-questions answered across experts, then composed).

They run against a :class:`Backend` (the ingress implements it with its expert handles), so the orchestration
is the same in the service and in tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from coe.routing import RoutingDecision


@dataclass
class Answer:
    """One expert call's result."""

    expert: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cost_usd: float
    start_ms: float  # since the request began
    ms: float
    logprob_mean: float | None = None
    logprob_min: float | None = None


@dataclass
class StrategyResult:
    """What a strategy decided: the final answer (or the expert whose answer is to be streamed), its steps for
    the response's `coe` field, and the answers whose usage is charged."""

    strategy: str
    final: Answer | None
    stream_expert: str | None = None
    stream_messages: list[dict[str, str]] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def usage(self) -> tuple[int, int]:
        return (sum(a.prompt_tokens for a in self.answers), sum(a.completion_tokens for a in self.answers))


class Backend(Protocol):
    """What a strategy may do: ask an expert, route a text, read the clock."""

    async def ask(self, expert: str, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None, logprobs: bool = False,
                  json_schema: str | None = None, stop: list[str] | None = None) -> Answer:
        """One generation by `expert` for chat `messages` (the expert's own prompt and defaults apply)."""
        ...

    async def route(self, text: str, threshold: float) -> RoutingDecision:
        """The router's decision for `text` at threshold t."""
        ...

    def elapsed_ms(self) -> float:
        """Milliseconds since the request began."""
        ...
