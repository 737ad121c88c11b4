"""Skeleton Graph Decoding plans: the planner's JSON schema, and validation (acyclic, bounded, known domains)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from typing import Any


class PlanError(ValueError):
    """The planner's output is not a usable plan (the request falls back to plain routing, with this reason)."""


@dataclass(frozen=True)
class PlanNode:
    """One sub-question of a plan."""

    id: int
    question: str
    domain: str
    difficulty: int
    depends_on: tuple[int, ...] = ()
    label: str = ""  # the request's own label of this part ("a", "2"), when the plan came from its enumeration


@dataclass
class Plan:
    """A validated skeleton: nodes in a topological order, each with its parents."""

    nodes: list[PlanNode]
    order: list[int] = field(default_factory=list)
    merged: int = 0  # repeated sub-questions merged into one node

    def node(self, node_id: int) -> PlanNode:
        return next(n for n in self.nodes if n.id == node_id)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [{"id": n.id, "question": n.question, "domain": n.domain, "difficulty": n.difficulty}
                          for n in self.nodes],
                "edges": [{"from": p, "to": n.id} for n in self.nodes for p in n.depends_on]}


def plan_schema(domains: list[str], max_nodes: int, max_question_chars: int = 400) -> dict[str, Any]:
    """The JSON schema the planner's decoding is constrained to (llama.cpp grammar, vLLM structured output)."""
    return {
        "type": "object",
        "properties": {
            "nodes": {
                "type": "array", "minItems": 1, "maxItems": max_nodes,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": max_nodes},
                        "question": {"type": "string", "minLength": 1, "maxLength": max_question_chars},
                        "domain": {"type": "string", "enum": list(domains)},
                        "difficulty": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                    },
                    "required": ["id", "question", "domain", "difficulty"],
                    "additionalProperties": False,
                },
            },
            "edges": {
                "type": "array", "maxItems": max_nodes * max_nodes,
                "items": {
                    "type": "object",
                    "properties": {"from": {"type": "integer", "minimum": 1, "maximum": max_nodes},
                                   "to": {"type": "integer", "minimum": 1, "maximum": max_nodes}},
                    "required": ["from", "to"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["nodes", "edges"],
        "additionalProperties": False,
    }


def parse_plan(text: str | dict[str, Any], domains: list[str], max_nodes: int) -> Plan:
    """Validate a planner's output; :class:`PlanError` says what is wrong (bad JSON, unknown ids or domains, a
    self-dependency, a cycle, too many nodes)."""
    if isinstance(text, str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"the plan is not JSON ({err.msg} at character {err.pos})") from None
    else:
        data = text
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise PlanError("the plan needs a list of nodes")
    raw_nodes, raw_edges = data["nodes"], data.get("edges", [])
    if not isinstance(raw_edges, list):
        raise PlanError("edges must be a list")
    if not raw_nodes:
        raise PlanError("the plan has no nodes")
    if len(raw_nodes) > max_nodes:
        raise PlanError(f"the plan has {len(raw_nodes)} nodes; at most {max_nodes}")
    parents: dict[int, list[int]] = {}
    fields: dict[int, tuple[str, str, int]] = {}
    for n in raw_nodes:
        if not isinstance(n, dict):
            raise PlanError("a node must be an object")
        nid, q, dom, diff = n.get("id"), n.get("question"), n.get("domain"), n.get("difficulty")
        if not isinstance(nid, int) or isinstance(nid, bool):
            raise PlanError("a node id must be an integer")
        if nid in fields:
            raise PlanError(f"node id {nid} is repeated")
        if not isinstance(q, str) or not q.strip():
            raise PlanError(f"node {nid} has no question")
        if dom not in domains:
            raise PlanError(f"node {nid}: unknown domain {dom!r} (known: {domains})")
        if not isinstance(diff, int) or isinstance(diff, bool) or not 1 <= diff <= 5:
            raise PlanError(f"node {nid}: difficulty must be 1-5")
        fields[nid] = (q.strip(), str(dom), diff)
        parents[nid] = []
    for e in raw_edges:
        if not isinstance(e, dict) or not isinstance(e.get("from"), int) or not isinstance(e.get("to"), int):
            raise PlanError("an edge must be {\"from\": id, \"to\": id}")
        a, b = e["from"], e["to"]
        if a not in fields or b not in fields:
            raise PlanError(f"edge {a}->{b} names a node that does not exist")
        if a == b:
            raise PlanError(f"node {a} depends on itself")
        if a not in parents[b]:
            parents[b].append(a)
    try:
        order = list(TopologicalSorter(parents).static_order())
    except CycleError as err:
        cycle = " -> ".join(str(x) for x in err.args[1])
        raise PlanError(f"the plan has a cycle ({cycle})") from None
    # The same sub-question twice (small planners repeat nodes) is asked once: later copies merge into the first,
    # and whatever depended on a copy depends on the node it merged into.
    first: dict[str, int] = {}
    alias: dict[int, int] = {}
    for nid in order:
        alias[nid] = first.setdefault(" ".join(fields[nid][0].lower().split()), nid)
    merged = sum(1 for nid in fields if alias[nid] != nid)
    deps: dict[int, set[int]] = {nid: set() for nid in fields if alias[nid] == nid}
    for nid, ps in parents.items():
        for p in ps:
            if alias[p] != alias[nid]:
                deps[alias[nid]].add(alias[p])
    nodes = [PlanNode(nid, *fields[nid], depends_on=tuple(sorted(deps[nid]))) for nid in deps]
    try:
        order = list(TopologicalSorter({n.id: list(n.depends_on) for n in nodes}).static_order())
    except CycleError:
        raise PlanError("the plan's repeated questions depend on each other") from None
    return Plan(nodes=nodes, order=order, merged=merged)


_ENUM = re.compile(r"(?:^|(?<=\s))(?:\(([a-h])\)|([a-h])\)|\(([1-9])\)|([1-9])[.)])\s+", re.MULTILINE)


def split_enumerated(query: str, max_nodes: int) -> list[tuple[str, str]] | None:
    """[(label, text)] when the request enumerates its parts in order: (a) (b) ..., a) b) ..., (1) (2) ... or 1. 2.
    ...; None unless there are 2 to max_nodes of them. Text before the first label is left out (instructions)."""
    marks = []
    for m in _ENUM.finditer(query):
        label = next(g for g in m.groups() if g)
        marks.append((label, m.start(), m.end()))
    for labels in ("abcdefgh", "123456789"):
        seq, want = [], 0
        for label, start, end in marks:
            if want < len(labels) and label == labels[want]:
                seq.append((label, start, end))
                want += 1
        if len(seq) >= 2:
            break
    else:
        return None
    if len(seq) > max_nodes:
        return None
    out = []
    for i, (label, _, end) in enumerate(seq):
        stop = seq[i + 1][1] if i + 1 < len(seq) else len(query)
        text = query[end:stop].strip()
        if not text:
            return None
        out.append((label, text))
    return out


def mentions(text: str, label: str) -> bool:
    """Whether a part refers to an earlier part by its label: "(a)", "part a", "answer to a"."""
    lab = re.escape(label)
    return bool(re.search(rf"\({lab}\)|\bpart {lab}\b|\banswer (?:to|of|from) {lab}\b", text, re.IGNORECASE))
