"""Wire models: parsing, defaults/limits mapping to engine parameters, error shape."""

from __future__ import annotations

import json
import pickle

import pytest

from coe.config import load_config
from coe.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from coe.engines.base import check_context
from coe.engines.llama_cpp import _stop_holdback
from coe.protocol import ChatCompletionRequest, CompletionRequest, check_request, parse_request, read_json_body

CFG = load_config("cpu-default")


def chat(**kw: object) -> ChatCompletionRequest:
    body = {"model": "coe-auto", "messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_request(ChatCompletionRequest, body)


def test_defaults_and_limits_come_from_the_expert() -> None:
    e = CFG.expert("code")
    p = chat().to_sampling_params(e)
    assert p.max_tokens == e.sampling.max_tokens and p.temperature == e.sampling.temperature
    p = chat(max_tokens=7, temperature=0.0, top_p=0.5, stop="END").to_sampling_params(e)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (7, 0.0, 0.5, ("END",))
    assert chat(max_completion_tokens=9, max_tokens=100).to_sampling_params(e).max_tokens == 9


@pytest.mark.parametrize("mt", [0, -3])
def test_non_positive_max_tokens_is_400(mt: int) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        chat(max_tokens=mt).to_sampling_params(CFG.expert("general"))
    assert exc.value.status_code == 400 and exc.value.param == "max_tokens"


def test_max_tokens_above_limit_names_the_limit() -> None:
    e = CFG.expert("general")
    with pytest.raises(InvalidRequestError, match=str(e.sampling.max_tokens_limit)):
        chat(max_tokens=e.sampling.max_tokens_limit + 1).to_sampling_params(e)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "coe-auto", "messages": []}, "messages"),
        ({"model": "coe-auto"}, "messages"),
        ({"model": "coe-auto", "messages": "hi"}, "messages"),
        ({"model": "coe-auto", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "coe-auto", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        parse_request(ChatCompletionRequest, body)
    assert exc.value.status_code == 400
    assert exc.value.param == param


def test_unknown_fields_are_accepted_and_reported() -> None:
    req = chat(logit_bias={"1": 2}, presence_penalty=0.1)
    assert req.ignored_fields() == ["logit_bias", "presence_penalty"]


def test_chat_prompt_gets_system_prompt_and_template_experts_get_text() -> None:
    req = chat()
    p = req.to_engine_prompt(CFG.expert("code"))
    assert p.messages is not None and p.messages[0]["role"] == "system"
    p = chat(messages=[{"role": "user", "content": "Good night"}]).to_engine_prompt(CFG.expert("translation"))
    assert p.text is not None and p.text.endswith("Request: Good night\nAnswer:")


def test_router_query_is_last_user_turn() -> None:
    req = chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": [{"type": "text", "text": "c"}]}])
    assert req.query_text() == "c"
    with pytest.raises(InvalidRequestError):
        chat(messages=[{"role": "system", "content": "only system"}]).query_text()


def test_completion_request_single_prompt() -> None:
    assert parse_request(CompletionRequest, {"model": "general", "prompt": ["x"]}).query_text() == "x"
    with pytest.raises(InvalidRequestError):
        parse_request(CompletionRequest, {"model": "general", "prompt": ["x", "y"]})


def test_errors_pickle_across_actors_and_keep_their_shape() -> None:
    err = pickle.loads(pickle.dumps(ModelNotFoundError("no such model", param="model")))
    assert isinstance(err, ModelNotFoundError) and err.status_code == 404
    assert err.to_body() == {"error": {"message": "no such model", "type": "invalid_request_error",
                                       "param": "model", "code": "model_not_found"}}


def test_context_check_names_the_limit() -> None:
    check_context(100, 100, 200)
    with pytest.raises(ContextLengthExceededError, match="2048"):
        check_context(2000, 100, 2048)


def test_stop_holdback_keeps_possible_stop_prefixes() -> None:
    assert _stop_holdback("hello wor", ("world",)) == 3
    assert _stop_holdback("hello", ("\n",)) == 0
    assert _stop_holdback("abc<|", ("<|end|>", "zz")) == 2


# ---------------------------------------------------------------------------------------------------------------
# bounds and hostile input (server.limits)

LIM = CFG.server.limits


def _full(raw: bytes, kind: type = ChatCompletionRequest, limits: object = LIM) -> list[str]:
    """What the ingress does with a body: decode, parse, check; returns the dropped parameters."""
    return check_request(parse_request(kind, read_json_body(raw, limits)), limits)  # type: ignore[arg-type]


def _msg(content: object, **kw: object) -> bytes:
    return json.dumps({"model": "coe-auto", "messages": [{"role": "user", "content": content}], **kw}).encode()


HOSTILE = [
    ("body over the limit", b'{"model": "x", "pad": "' + b"a" * LIM.max_body_bytes + b'"}', 413, "body"),
    ("nesting 10,000 deep", b"[" * 10_000 + b"]" * 10_000, 400, "body"),
    ("nesting past max_json_depth", _msg("x", extra=json.loads("[" * 40 + "]" * 40)), 400, "body"),
    ("invalid UTF-8", b'{"model": "coe-auto", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "body"),
    ("lone surrogate", _msg("\ud800 hi"), 400, "messages.0.content"),
    ("lone surrogate in a text part", _msg([{"type": "text", "text": "a\udfffb"}]), 400, "messages.0.content"),
    ("NUL", _msg("a\u0000b"), 400, "messages.0.content"),
    ("control character", _msg("bell \u0007"), 400, "messages.0.content"),
    ("10,000 messages", json.dumps({"model": "coe-auto", "messages": [{"role": "user", "content": "x"}] * 10_000}
                                   ).encode(), 400, "messages"),
    ("a message over max_message_chars", _msg("x" * (LIM.max_message_chars + 1)), 400, "messages.0.content"),
    ("a 1 MB stop string", _msg("hi", stop="s" * 1_000_000), 400, "stop"),
    ("5 stop strings", _msg("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("a stop string with NUL", _msg("hi", stop="\u0000"), 400, "stop"),
    ("negative seed", _msg("hi", seed=-1), 400, "seed"),
    ("enormous seed", _msg("hi", seed=2**70), 400, "seed"),
    ("a number with 5,000 digits", b'{"model": "coe-auto", "seed": ' + b"9" * 5000 + b"}", 400, "body"),
    ("NaN temperature", b'{"model": "coe-auto", "messages": [], "temperature": NaN}', 400, "body"),
    ("enormous temperature", _msg("hi", temperature=1e308), 400, "temperature"),
    ("negative top_p", _msg("hi", top_p=-1), 400, "top_p"),
    ("wrong type", _msg(42), 400, "messages.0.content"),
    ("unknown role", json.dumps({"model": "coe-auto", "messages": [{"role": "god", "content": "x"}]}).encode(),
     400, "messages.0.role"),
    ("empty model", json.dumps({"model": "", "messages": [{"role": "user", "content": "x"}]}).encode(), 400,
     "model"),
    ("empty user message", _msg("   "), 400, "messages"),
    ("duplicate keys", b'{"model": "coe-auto", "model": "general", "messages": []}', 400, "model"),
    ("not an object", b"[1, 2]", 400, None),
    ("logprobs", _msg("hi", logprobs=True), 400, "logprobs"),
    ("tools", _msg("hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("response_format json", _msg("hi", response_format={"type": "json_object"}), 400, "response_format"),
    ("n = 2", _msg("hi", n=2), 400, "n"),
    ("logit_bias", _msg("hi", logit_bias={"1": 5}), 400, "logit_bias"),
]


@pytest.mark.parametrize(("what", "raw", "status", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_4xx_naming_the_parameter(what: str, raw: bytes, status: int, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as e:
        _full(raw)
    assert e.value.status_code == status, e.value.message
    assert e.value.param == param, (what, e.value.message)


def test_unsupported_parameters_at_their_no_op_value_pass_and_drop_params_drops_the_rest() -> None:
    assert _full(_msg("hi", logprobs=False, tools=[], n=1, presence_penalty=0, response_format={"type": "text"},
                      tool_choice="none", metadata={"a": "b"}, store=False)) == []
    assert _full(_msg("hi", logprobs=True, tools=[{"type": "function"}], drop_params=True)) == ["logprobs", "tools"]
    loose = LIM.model_copy(update={"drop_params": True})
    assert _full(_msg("hi", echo=True), limits=loose) == ["echo"]  # config drop_params
    raw = json.dumps({"model": "general", "prompt": "x", "echo": True}).encode()
    with pytest.raises(InvalidRequestError, match="echo"):
        _full(raw, CompletionRequest)
    assert _full(raw, CompletionRequest, loose) == ["echo"]


def test_limits_are_configurable() -> None:
    tight = LIM.model_copy(update={"max_messages": 2, "max_total_chars": 5, "max_stop_sequences": 1, "seed_max": 10})
    with pytest.raises(InvalidRequestError, match="the limit is 2"):
        _full(json.dumps({"model": "m", "messages": [{"role": "user", "content": "a"}] * 3}).encode(), limits=tight)
    with pytest.raises(InvalidRequestError, match="characters; the limit is 5"):
        _full(_msg("abcdef"), limits=tight)
    with pytest.raises(InvalidRequestError) as e:
        _full(_msg("a", seed=11), limits=tight)
    assert e.value.param == "seed"
    assert _full(_msg("a\tb\n", seed=10, stop="x"), limits=tight) == []  # tab and newline are fine
