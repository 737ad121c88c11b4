"""Routing a conversation: the routed text of a request with earlier turns, and the weighted embedding."""

from __future__ import annotations

import numpy as np
import pytest

from coe.config import ConversationConfig
from coe.protocol import ChatCompletionRequest, CompletionRequest
from coe.routing import combine, embed_routed, last_turn, turn_texts


def _req(*msgs: tuple[str, str]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "coe-auto", "messages": [{"role": r, "content": c} for r, c in msgs]})


def test_a_single_question_routes_on_its_text_alone() -> None:
    conv = ConversationConfig()
    assert _req(("user", "Write a sort in Go.")).routed_text(conv) == "Write a sort in Go."
    assert _req(("system", "Be brief."), ("user", "Hi")).routed_text(conv) == "Hi"  # system left out by default
    assert CompletionRequest.model_validate({"model": "coe-auto", "prompt": "p"}).routed_text(conv) == "p"


def test_turns_decay_back_from_the_last_user_turn() -> None:
    conv = ConversationConfig(decay=0.5, assistant_weight=0.5, turns=6)
    req = _req(("system", "sys"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
               ("user", "Thanks! Now make it shorter."))
    turns = req.routed_text(conv)
    assert turns == (("Thanks! Now make it shorter.", 1.0), ("a2", 0.25), ("u2", 0.25), ("a1", 0.0625), ("u1", 0.0625))
    assert last_turn(turns) == "Thanks! Now make it shorter."
    limited = req.routed_text(ConversationConfig(turns=2))
    assert [t for t, _ in limited] == ["Thanks! Now make it shorter.", "a2"]
    with_system = req.routed_text(ConversationConfig(system_weight=0.2))
    assert with_system[-1] == ("sys", 0.2)


def test_weighted_embedding_is_the_normalised_weighted_mean() -> None:
    rows = {"a": np.array([1.0, 0.0], dtype=np.float32), "b": np.array([0.0, 1.0], dtype=np.float32)}
    assert np.allclose(combine("a", rows), rows["a"])
    v = combine((("a", 1.0), ("b", 0.5)), rows)
    assert np.allclose(v, np.array([1.0, 0.5]) / np.linalg.norm([1.0, 0.5]))
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> list[np.ndarray]:
        calls.append(texts)
        return [rows[t] for t in texts]

    out = embed_routed(encode, ["a", (("a", 1.0), ("b", 1.0)), "b"])
    assert calls == [["a", "b"]]  # each distinct text encoded once for the batch
    assert out.shape == (3, 2) and np.allclose(out[1], np.array([1.0, 1.0]) / np.sqrt(2))
    assert turn_texts((("x", 1.0), ("y", 0.1))) == ["x", "y"]


def test_conversation_config_is_strict() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ConversationConfig.model_validate({"decay": 0})
    with pytest.raises(ValidationError):
        ConversationConfig.model_validate({"sticky_margin": 0.1})


def _decision(expert: str, reason: str = "best_predicted_quality", t: float = 0.0):  # noqa: ANN202
    from coe.routing import RoutingDecision

    return RoutingDecision(expert=expert, scores={"general": 0.30, "code": 0.42, "translation": 0.10},
                           confidence=0.5, reason=reason, threshold=t)


def test_stickiness_keeps_switches_and_yields_to_load() -> None:
    from coe.conversations import stick

    d, keep = stick(_decision("code"), None, 0.05)  # a new conversation: the decision, remembered
    assert (d.expert, keep, d.reason) == ("code", "code", "best_predicted_quality")
    d, keep = stick(_decision("code"), "code", 0.05)  # the router agrees
    assert (d.expert, keep) == ("code", "code") and d.reason.startswith("sticky(code);")
    # general is 0.12 below the best: within t + margin it stays, beyond it switches.
    d, keep = stick(_decision("code", t=0.10), "general", 0.05)
    assert (d.expert, keep) == ("general", "general") and d.reason.startswith("sticky(general);router:")
    assert d.extra["router_choice"] == "code"  # not counted as load debt (coe.load)
    d, keep = stick(_decision("code"), "general", 0.05)
    assert (d.expert, keep) == ("code", "code") and d.reason.startswith("switch(general->code,0.120);")
    # What the load controller forced stands for this turn; the conversation keeps its expert.
    for reason in ("load_shift(t=0.1)", "overflow(t=0.2)"):
        d, keep = stick(_decision("translation", reason), "code", 0.05)
        assert (d.expert, keep) == ("translation", None) and d.reason.endswith("sticky_broken_this_turn(code)")
    # An expert the caller may no longer use, or one without a score, is not kept.
    d, keep = stick(_decision("code"), "general", 1.0, usable={"code", "translation"})
    assert (d.expert, keep) == ("code", "code")
    d, keep = stick(_decision("code"), "retired", 1.0)
    assert (d.expert, keep) == ("code", "code")
