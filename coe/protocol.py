"""OpenAI wire models (requests and responses) and their mapping to engine parameters.

Requests accept unknown fields (OpenAI clients send many); the ingress logs what it ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coe.config import ExpertConfig
from coe.engines.base import EnginePrompt, SamplingParams
from coe.errors import InvalidRequestError


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        """Unknown fields the client sent (accepted, not used)."""
        return sorted((self.model_extra or {}).keys())


class CoeOptions(BaseModel):
    """coe's own request options, under the `coe` key of a request body."""

    model_config = ConfigDict(extra="forbid")

    quality_threshold: float | None = Field(None, ge=0.0, le=1.0)
    max_quality_threshold: float | None = Field(None, ge=0.0, le=1.0)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types are refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content part type '{part.type}' is not supported; only text", param="messages"
                )
            out.append(part.text)
        return "".join(out)


class _SamplingRequest(_Wire):
    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    coe: CoeOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, expert: ExpertConfig) -> SamplingParams:
        """Apply the expert's defaults and limits (400 when a request exceeds them)."""
        d = expert.sampling
        max_tokens = self.requested_max_tokens()
        if max_tokens is None:
            max_tokens = d.max_tokens
        elif max_tokens <= 0:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        elif max_tokens > d.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} exceeds expert '{expert.name}' limit of {d.max_tokens_limit}",
                param="max_tokens",
            )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            stop=tuple(dict.fromkeys(stop + expert.prompt.stop)),
            seed=self.seed,
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def query_text(self) -> str:
        """The text the router looks at: the last user turn."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        raise InvalidRequestError("messages must contain a user message", param="messages")

    def to_engine_prompt(self, expert: ExpertConfig) -> EnginePrompt:
        """Chat messages for chat-template experts; the filled template for base-model experts."""
        query = self.query_text()
        if expert.prompt.template is not None:
            return EnginePrompt(text=expert.prompt.template.replace("{prompt}", query))
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if expert.prompt.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": expert.prompt.system_prompt})
        return EnginePrompt(messages=tuple(msgs))


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported")
        if (v if isinstance(v, str) else v[0]) == "":
            raise ValueError("prompt must not be empty")
        return v

    def query_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_engine_prompt(self, expert: ExpertConfig) -> EnginePrompt:
        text = self.query_text()
        if expert.prompt.template is not None:
            text = expert.prompt.template.replace("{prompt}", text)
        return EnginePrompt(text=text)


def parse_request(model: type[ChatCompletionRequest] | type[CompletionRequest], body: Any):  # noqa: ANN201
    """Validate a decoded JSON body; a 400 names the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise InvalidRequestError(f"{loc}: {first['msg']}", param=loc or None) from None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(
    rid: str, model: str, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    """A `chat.completion` object."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return chunk


def completion_response(
    rid: str, model: str, text: str, finish_reason: str | None, usage: Usage | None, created: int | None = None
) -> dict[str, Any]:
    """A `text_completion` object (also its stream chunks)."""
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage.model_dump()
    return out
