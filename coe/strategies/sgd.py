"""Skeleton Graph Decoding across experts (after "Adaptive Skeleton Graph Decoding", arXiv 2402.12280).

A planner expert writes the request's skeleton as JSON (decoding constrained to :func:`plan_schema`): sub-questions
with a domain and a difficulty, and the dependencies between them. Each node is routed on its own text (t from its
difficulty), nodes whose parents are done run at once on their experts' replicas, a node's prompt carries its
parents' answers, and a composer writes the final answer from all of them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from coe.config import AUTO_MODEL, SGDConfig
from coe.strategies import Answer, Backend, StrategyResult
from coe.strategies.plan import Plan, PlanError, PlanNode, mentions, parse_plan, plan_schema, split_enumerated

PLANNER_PROMPT = """You split a user's request into independent sub-questions so that specialists can answer them.
Return JSON only: {{"nodes": [...], "edges": [...]}}.
- One node per distinct part of the request: "id" (1, 2, ...), "question" (self-contained: copy the numbers and
  text it needs), "domain" (one of: {domains}), "difficulty" (1 easy .. 5 hard).
- An edge {{"from": A, "to": B}} when node B needs node A's answer. No edges between independent parts.
- A request with a single part gets a single node. At most {max_nodes} nodes.
Example: "(a) What is 12*4? (b) Translate to French: I am happy."
{{"nodes": [{{"id": 1, "question": "What is 12*4?", "domain": "{d0}", "difficulty": 1}}, {{"id": 2, "question": "Translate to French: I am happy.", "domain": "{d1}", "difficulty": 1}}], "edges": []}}"""

COMPOSER_PROMPT = ("Write the final answer to the user's request from the answers to its parts. Keep each part's "
                   "result; label them as the request does.")


def planner_messages(query: str, domains: list[str], max_nodes: int) -> list[dict[str, str]]:
    d0 = next((d for d in domains if d in ("math", "general")), domains[0])
    d1 = next((d for d in domains if d == "translation"), domains[-1])
    return [{"role": "system", "content": PLANNER_PROMPT.format(domains=", ".join(domains), max_nodes=max_nodes,
                                                                d0=d0, d1=d1)},
            {"role": "user", "content": query}]


def node_messages(plan: Plan, node_id: int, answers: dict[int, str]) -> list[dict[str, str]]:
    node = plan.node(node_id)
    if not node.depends_on:
        return [{"role": "user", "content": node.question}]
    ctx = "\n".join(f"- {plan.node(p).question}\n  Answer: {answers.get(p, '').strip()}" for p in node.depends_on)
    return [{"role": "user", "content": f"Earlier results:\n{ctx}\n\nUsing them, answer: {node.question}"}]


def _label(plan: Plan, node_id: int, i: int) -> str:
    return plan.node(node_id).label or str(i)


def composer_messages(query: str, plan: Plan, answers: dict[int, str]) -> list[dict[str, str]]:
    parts = "\n".join(f"({_label(plan, n, i)}) {plan.node(n).question}\nAnswer: {answers.get(n, '').strip()}"
                      for i, n in enumerate(sorted(answers), start=1))
    return [{"role": "system", "content": COMPOSER_PROMPT},
            {"role": "user", "content": f"Request: {query}\n\nAnswers to its parts:\n{parts}\n\nFinal answer:"}]


def concat_answer(plan: Plan, answers: dict[int, str]) -> str:
    return "\n\n".join(f"({_label(plan, n, i)}) {plan.node(n).question}\n{answers.get(n, '').strip()}"
                       for i, n in enumerate(sorted(answers), start=1))


def domain_experts(domains_of: dict[str, list[str]]) -> dict[str, str]:
    """domain -> the first expert that lists it."""
    out: dict[str, str] = {}
    for name, ds in domains_of.items():
        for d in ds:
            out.setdefault(d, name)
    return out


async def make_plan(backend: Backend, cfg: SGDConfig, planner: str, query: str, domains: list[str]
                    ) -> tuple[Plan | None, Answer, str]:
    """(plan or None, the planner's answer, why it was refused)."""
    schema = json.dumps(plan_schema(domains, cfg.max_nodes))
    ans = await backend.ask(planner, planner_messages(query, domains, cfg.max_nodes),
                            max_tokens=cfg.planner_max_tokens, temperature=0.0, json_schema=schema)
    try:
        plan = parse_plan(ans.text, domains, cfg.max_nodes)
    except PlanError as err:
        return None, ans, str(err)
    if len(plan.nodes) == 1:
        return None, ans, "the plan has a single node"
    return plan, ans, ""


async def parts_plan(backend: Backend, query: str, max_nodes: int, t: float, domains_of: dict[str, list[str]]
                     ) -> Plan | None:
    """The plan of a request that enumerates its parts: one node per part, in order; a part that names an earlier
    one depends on it; each node's domain is that of the expert the router picks for it (difficulty 3)."""
    parts = split_enumerated(query, max_nodes)
    if parts is None:
        return None
    decisions = await asyncio.gather(*(backend.route(text, t) for _, text in parts))
    nodes = []
    for i, ((label, text), d) in enumerate(zip(parts, decisions), start=1):
        deps = tuple(j for j, (lab, _) in enumerate(parts[: i - 1], start=1) if mentions(text, lab))
        nodes.append(PlanNode(i, text, (domains_of.get(d.expert) or ["general"])[0], 3, deps, label))
    return Plan(nodes=nodes, order=[n.id for n in nodes])


async def run_sgd(backend: Backend, cfg: SGDConfig, *, planner: str, composer: str | None, query: str,
                  domains_of: dict[str, list[str]], allowed: Any, t: float,
                  temperature: float | None, seed: int | None, stream_composer: bool = False,
                  plan: Plan | None = None, planner_mode: str | None = None) -> StrategyResult:
    """Plan (unless `plan` is given), answer the nodes level by level as their parents finish, then compose. A
    refused plan returns a result with final=None and info["fallback"] = why: the caller routes the request."""
    result = StrategyResult("sgd", final=None)
    domains = sorted({d for ds in domains_of.values() for d in ds})
    mode = planner_mode or cfg.planner_mode
    if plan is None and mode in ("auto", "parts"):
        start = backend.elapsed_ms()
        plan = await parts_plan(backend, query, cfg.max_nodes, t, domains_of)
        if plan is not None:
            result.steps.append({"role": "planner", "expert": None, "how": "parts", "valid": True,
                                 "start_ms": round(start, 1), "ms": round(backend.elapsed_ms() - start, 1)})
        elif mode == "parts":
            result.info["fallback"] = "the request does not enumerate 2 or more parts"
            result.steps.append({"role": "planner", "expert": None, "how": "parts", "valid": False,
                                 "why": result.info["fallback"]})
            return result
    if plan is None:
        plan, planned, why = await make_plan(backend, cfg, planner, query, domains)
        result.answers.append(planned)
        result.steps.append({"role": "planner", "expert": planner, "how": "model",
                             "start_ms": round(planned.start_ms, 1), "ms": round(planned.ms, 1),
                             "tokens": planned.prompt_tokens + planned.completion_tokens,
                             "valid": plan is not None, **({"why": why} if why else {})})
        if plan is None:
            result.info["fallback"] = why
            result.info["planner_output"] = planned.text[:2000]
            return result
    result.info["plan"] = {**plan.to_dict(), "merged_repeats": plan.merged}
    by_domain = domain_experts(domains_of)
    answers: dict[int, str] = {}
    done: dict[int, asyncio.Event] = {n.id: asyncio.Event() for n in plan.nodes}
    node_steps: dict[int, dict[str, Any]] = {}

    async def run_node(nid: int) -> None:
        node = plan.node(nid)
        try:
            for p in node.depends_on:
                await done[p].wait()
            tn = max(t, cfg.difficulty_threshold[node.difficulty - 1])
            d = await backend.route(node.question, tn)
            expert, how = d.expert, f"routed({d.reason})"
            if ("fallback:" in d.reason or not allowed(expert)) and node.domain in by_domain \
                    and allowed(by_domain[node.domain]):
                expert, how = by_domain[node.domain], f"plan_domain({node.domain}) after {d.reason}"
            ans = await backend.ask(expert, node_messages(plan, nid, answers), max_tokens=cfg.node_max_tokens,
                                    temperature=temperature, seed=seed)
            result.answers.append(ans)
            answers[nid] = ans.text
            node_steps[nid] = {"role": "node", "node": nid, "question": node.question, "domain": node.domain,
                               "difficulty": node.difficulty, "depends_on": list(node.depends_on), "t": tn,
                               "expert": expert, "how": how, "start_ms": round(ans.start_ms, 1),
                               "ms": round(ans.ms, 1), "tokens": ans.prompt_tokens + ans.completion_tokens}
        finally:
            done[nid].set()

    await asyncio.gather(*(run_node(n.id) for n in plan.nodes))
    result.steps.extend(node_steps[n] for n in plan.order)
    if composer is None:  # compose: concat
        text = concat_answer(plan, answers)
        result.final = Answer(AUTO_MODEL, text, 0, 0, "stop", 0.0, backend.elapsed_ms(), 0.0)  # no one expert
        result.steps.append({"role": "composer", "expert": None, "how": "concat"})
        result.reason = f"sgd({len(plan.nodes)} nodes, concat)"
        return result
    msgs = composer_messages(query, plan, answers)
    result.reason = f"sgd({len(plan.nodes)} nodes)"
    if stream_composer:
        result.stream_expert, result.stream_messages = composer, msgs
        result.steps.append({"role": "composer", "expert": composer, "how": "streamed"})
        return result
    final = await backend.ask(composer, msgs, temperature=temperature, seed=seed)
    result.answers.append(final)
    result.final = final
    result.steps.append({"role": "composer", "expert": composer, "start_ms": round(final.start_ms, 1),
                         "ms": round(final.ms, 1), "tokens": final.prompt_tokens + final.completion_tokens})
    return result
