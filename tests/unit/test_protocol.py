"""Wire models: parsing, defaults/limits mapping to engine parameters, error shape."""

from __future__ import annotations

import pickle

import pytest

from coe.config import load_config
from coe.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from coe.engines.base import check_context
from coe.engines.llama_cpp import _stop_holdback
from coe.protocol import ChatCompletionRequest, CompletionRequest, parse_request

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
        ({"model": "coe-auto", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
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
    assert p.text is not None and p.text.endswith("English: Good night\nFrench:")


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
