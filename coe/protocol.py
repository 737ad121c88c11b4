"""OpenAI wire models (requests and responses) and their mapping to engine parameters, and the bounds every
request body is held to (:func:`read_json_body`, :func:`check_request`).

Requests accept unknown fields (OpenAI clients send many); the ingress logs what it ignored. OpenAI parameters
that coe does not implement (:data:`UNSUPPORTED`) are a 400 naming the parameter when set to anything but
their no-op value, unless the request or the config says ``drop_params``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coe.config import ConversationConfig, ExpertConfig, RequestLimits
from coe.engines.base import EnginePrompt, SamplingParams
from coe.errors import InvalidRequestError, RequestTooLargeError

# NUL and C0 control characters other than tab, newline and carriage return; lone UTF-16 surrogates.
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def check_text(text: str) -> str:
    """ValueError (a 400 naming the field, through :func:`parse_request`) for text an engine cannot take: lone
    surrogates (not encodable as UTF-8), NUL and other control characters (tab, newline, CR are fine)."""
    m = _BAD_TEXT.search(text)
    if m is not None:
        ch = m.group()
        what = "a lone UTF-16 surrogate" if "\ud800" <= ch <= "\udfff" else f"control character U+{ord(ch):04X}"
        raise ValueError(f"contains {what} at position {m.start()}")
    return text


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise InvalidRequestError(f"request body has the key '{k}' twice in one object", param=k)
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise InvalidRequestError(f"request body contains {name}, which is not JSON", param="body")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequestError(f"request body has the number {text[:40]}, beyond what a float holds",
                                  param="body")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, [] is 1), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = v.values()
        elif isinstance(v, list):
            items = v
        else:
            continue
        depth = max(depth, d)
        stack.extend((x, d + 1) for x in items if isinstance(x, (dict, list)))
    return depth


def read_json_body(raw: bytes, limits: RequestLimits) -> Any:
    """Decode a request body: 413 above max_body_bytes, 400 for invalid UTF-8 or JSON, duplicate keys, NaN or
    Infinity, numbers too long to convert, nesting beyond max_json_depth."""
    if len(raw) > limits.max_body_bytes:
        raise RequestTooLargeError(f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}",
                                   param="body")
    try:
        body = json.loads(raw, object_pairs_hook=_no_dupes, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise InvalidRequestError(f"request body is nested deeper than {limits.max_json_depth} levels",
                                  param="body") from None
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"request body is not valid UTF-8 (byte {err.start})", param="body") from None
    except InvalidRequestError:
        raise
    except ValueError as err:  # JSONDecodeError, and int() of a number with too many digits
        raise InvalidRequestError(f"request body is not valid JSON: {err}", param="body") from None
    if json_depth(body) > limits.max_json_depth:
        raise InvalidRequestError(f"request body is nested deeper than {limits.max_json_depth} levels",
                                  param="body")
    return body


def _falsy(v: Any) -> bool:
    return v is None or v is False or v == 0 or v == [] or v == {}


# OpenAI parameters coe does not implement -> whether a value is their no-op (then it is accepted and ignored).
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logprobs": _falsy,
    "top_logprobs": _falsy,
    "tools": _falsy,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _falsy,
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logit_bias": _falsy,
    "presence_penalty": _falsy,
    "frequency_penalty": _falsy,
    "echo": _falsy,
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
    "audio": _falsy,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": _falsy,
    "web_search_options": _falsy,
    "n": lambda v: v is None or v == 1,
}


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
    strategy: Literal["route", "cascade", "sgd"] | None = Field(
        None, description="route: one expert; cascade: cheapest acceptable first, escalating; sgd: Skeleton Graph "
        "Decoding across experts. Default: the config's strategies.default. coe-auto only.")
    sgd_planner: Literal["auto", "model", "parts"] | None = Field(
        None, description="sgd only: overrides strategies.sgd.planner_mode for this request.")
    sgd_compose: Literal["model", "concat"] | None = Field(
        None, description="sgd only: overrides strategies.sgd.compose for this request (concat: each part's answer "
        "under its sub-question, no composer call).")
    max_steps: int | None = Field(None, ge=1, le=8, description="cascade only: at most this many experts asked "
                                  "(at most the config's strategies.cascade.max_steps).")
    budget_s: float | None = Field(None, gt=0.0, description="cascade only: no new step after this many seconds.")
    budget_usd: float | None = Field(None, gt=0.0, description="cascade only: no new step once the steps so far "
                                     "cost this much.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _clean(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        for text in [v] if isinstance(v, str) else [p.text for p in v or [] if p.text is not None]:
            check_text(text)
        return v

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
    coe: CoeOptions | None = None
    drop_params: bool = Field(False, description="Drop unsupported OpenAI parameters instead of a 400.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty")
        for s in items:
            check_text(s)
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

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
        stop = self.stops()
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
        """The last user turn (what a single question routes on, and what the decision log shows)."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        raise InvalidRequestError("messages must contain a user message", param="messages")

    def routed_text(self, conv: ConversationConfig) -> str | tuple[tuple[str, float], ...]:
        """What coe-auto routes on. A request without earlier turns: its user turn, as a single question routes.
        A conversation: its recent turns as (text, weight), the last user turn weighing 1 and each message before it
        `conv.decay` times less (an assistant message also times `assistant_weight`), up to `conv.turns` messages;
        the system prompt with `conv.system_weight` (0: left out). The router embeds each text and decides on the
        weighted mean of the embeddings."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "user"), default=None)
        if last is None:
            raise InvalidRequestError("messages must contain a user message", param="messages")
        turns: list[tuple[str, float]] = [(self.messages[last].text(), 1.0)]
        weight = 1.0
        earlier = [m for m in self.messages[:last] if m.role in ("user", "assistant")][::-1][: conv.turns - 1]
        for m in earlier:
            weight *= conv.decay
            w = weight * (conv.assistant_weight if m.role == "assistant" else 1.0)
            text = m.text()
            if w > 0 and text.strip():
                turns.append((text, w))
        if conv.system_weight > 0:
            turns += [(m.text(), conv.system_weight) for m in self.messages
                      if m.role in ("system", "developer") and m.text().strip()]
        return turns[0][0] if len(turns) == 1 else tuple(turns)

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
        check_text(v if isinstance(v, str) else v[0])
        return v

    def query_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def routed_text(self, conv: ConversationConfig) -> str | tuple[tuple[str, float], ...]:
        """A completion has one prompt: it routes on it."""
        return self.query_text()

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
        # A union's member ("str", "list[ContentPart]") is not part of the parameter's name.
        loc = ".".join(str(x) for x in first["loc"] if isinstance(x, int) or not _TYPE_TAG.match(str(x)))
        cause = (first.get("ctx") or {}).get("error")
        msg = str(cause) if isinstance(cause, ValueError) else first["msg"]
        raise InvalidRequestError(f"{loc}: {msg}", param=loc or None) from None


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\]-]")


def check_request(req: ChatCompletionRequest | CompletionRequest, limits: RequestLimits) -> list[str]:
    """Hold a parsed request to `limits` (400 naming the parameter) and to what coe implements: returns the
    unsupported parameters dropped (drop_params), or raises 400 naming the first one set."""
    if isinstance(req, ChatCompletionRequest):
        if len(req.messages) > limits.max_messages:
            raise InvalidRequestError(f"{len(req.messages)} messages; the limit is {limits.max_messages}",
                                      param="messages")
        total = 0
        for i, m in enumerate(req.messages):
            n = len(m.text()) if m.content is not None else 0
            if n > limits.max_message_chars:
                raise InvalidRequestError(f"message {i} has {n} characters; the limit is {limits.max_message_chars}",
                                          param=f"messages.{i}.content")
            total += n
        if total > limits.max_total_chars:
            raise InvalidRequestError(f"messages have {total} characters; the limit is {limits.max_total_chars}",
                                      param="messages")
        if not req.query_text().strip():
            raise InvalidRequestError("the last user message is empty", param="messages")
    else:
        n = len(req.query_text())
        if n > limits.max_message_chars:
            raise InvalidRequestError(f"prompt has {n} characters; the limit is {limits.max_message_chars}",
                                      param="prompt")
    stops = req.stops()
    if len(stops) > limits.max_stop_sequences:
        raise InvalidRequestError(f"{len(stops)} stop sequences; the limit is {limits.max_stop_sequences}",
                                  param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise InvalidRequestError(f"a stop sequence is longer than {limits.max_stop_chars} characters", param="stop")
    if req.seed is not None and not limits.seed_min <= req.seed <= limits.seed_max:
        raise InvalidRequestError(f"seed must be within [{limits.seed_min}, {limits.seed_max}]", param="seed")
    given = {**(req.model_extra or {})}
    if isinstance(req, CompletionRequest):
        given["echo"] = req.echo
    set_ = [k for k, is_noop in UNSUPPORTED.items() if k in given and not is_noop(given[k])]
    if set_ and not (req.drop_params or limits.drop_params):
        raise InvalidRequestError(
            f"'{set_[0]}' is not supported by coe; leave it out, or send \"drop_params\": true to drop it",
            param=set_[0], code="unsupported_parameter")
    return set_


class CreateKeyRequest(BaseModel):
    """POST /v1/coe/keys (documentation of the body; coe.auth.Authenticator.create_key validates it)."""

    model_config = ConfigDict(extra="forbid")

    team: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    budget_usd: float | None = Field(None, ge=0)
    period: Literal["day", "week", "month"] | None = None
    experts: list[str] | None = None
    expires_at: str | float | None = Field(None, description="ISO date or datetime (UTC), or Unix time.")


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
