"""Routing datasets: per-query, per-expert scores (and costs) from RouterDC JSON or RouterBench CSV.

Both formats load into one :class:`RoutingData`: questions, expert names, a score matrix (NaN where a
score is missing) and, for RouterBench, a USD cost matrix. :func:`paper_correct` applies the RouterDC
paper's scoring rule (binarised for its multiple-choice files, the raw score everywhere else).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coe.errors import InvalidRequestError

# The RouterDC files whose score is the gold option's probability when the answer is right: the paper
# binarises them (correct = score > 0). Every other file's score is used as it is (GSM8K and HumanEval
# fractions, RouterBench 0/1, a user's own quality scores).
MULTIPLE_CHOICE_TASKS = ("mmlu", "cmmlu", "arc_challenge")


@dataclass
class RoutingData:
    """Queries with one score per expert; cost in USD per query where the source carries it."""

    name: str
    questions: list[str]
    experts: list[str]
    scores: np.ndarray  # (n, k) float, NaN = missing
    costs: np.ndarray | None = None  # (n, k) USD
    tasks: list[str] = field(default_factory=list)  # per query: the file/task it came from

    def __post_init__(self) -> None:
        n, k = len(self.questions), len(self.experts)
        if self.scores.shape != (n, k):
            raise ValueError(f"{self.name}: scores shape {self.scores.shape} != ({n}, {k})")
        if self.costs is not None and self.costs.shape != (n, k):
            raise ValueError(f"{self.name}: costs shape {self.costs.shape} != ({n}, {k})")
        if not self.tasks:
            self.tasks = [self.name] * n

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: np.ndarray | list[int]) -> RoutingData:
        """The rows `idx`, in that order."""
        idx = np.asarray(idx, dtype=int)
        return RoutingData(
            name=self.name,
            questions=[self.questions[i] for i in idx],
            experts=list(self.experts),
            scores=self.scores[idx],
            costs=None if self.costs is None else self.costs[idx],
            tasks=[self.tasks[i] for i in idx],
        )

    def correct(self) -> np.ndarray:
        """Per-query, per-expert credit under the RouterDC paper's rule (NaN stays NaN)."""
        return paper_correct(self.scores, self.tasks)


def task_of(path: str | Path) -> str:
    """A file's task name: `mmlu_test.json` -> `mmlu`, `gsm8k-train.json` -> `gsm8k`."""
    stem = Path(path).stem.lower()
    for suffix in ("_train", "-train", "_test", "-test", "_val", "-val"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def paper_correct(scores: np.ndarray, tasks: list[str]) -> np.ndarray:
    """Binarise the RouterDC multiple-choice files' scores (score > 0); keep every other score as it is."""
    out = scores.astype(np.float64).copy()
    mc = np.array([t in MULTIPLE_CHOICE_TASKS for t in tasks], dtype=bool)
    if not mc.any():
        return out
    with np.errstate(invalid="ignore"):
        binar = (scores[mc] > 0).astype(np.float64)
    binar[np.isnan(scores[mc])] = np.nan
    out[mc] = binar
    return out


def load_routerdc_json(path: str | Path) -> RoutingData:
    """A JSON list of {"question": str, "scores": {expert: float}} (RouterDC's format)."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidRequestError(f"cannot read routing data {p}: {err}") from None
    if not isinstance(rows, list) or not rows:
        raise InvalidRequestError(f"{p}: expected a non-empty JSON list of {{question, scores}}")
    experts = list(rows[0]["scores"].keys())
    scores = np.full((len(rows), len(experts)), np.nan)
    questions = []
    for i, r in enumerate(rows):
        if "question" not in r or "scores" not in r:
            raise InvalidRequestError(f"{p}: row {i} lacks 'question' or 'scores'")
        questions.append(str(r["question"]))
        for j, e in enumerate(experts):
            v = r["scores"].get(e)
            scores[i, j] = np.nan if v is None else float(v)
    task = task_of(p)
    return RoutingData(name=task, questions=questions, experts=experts, scores=scores, tasks=[task] * len(rows))


def load_routerbench_csv(path: str | Path) -> RoutingData:
    """RouterBench CSV: `prompt`, one 0/1 column per model, `<model>|total_cost` in USD."""
    p = Path(path)
    csv.field_size_limit(1 << 30)
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        experts = [h[: -len("|total_cost")] for h in header if h.endswith("|total_cost")]
        missing = [e for e in experts if e not in header]
        if not experts or "prompt" not in header or missing:
            raise InvalidRequestError(f"{p}: not a RouterBench CSV (needs prompt, <model>, <model>|total_cost)")
        questions, scores, costs = [], [], []
        for row in reader:
            questions.append(row["prompt"])
            scores.append([_num(row[e]) for e in experts])
            costs.append([_num(row[f"{e}|total_cost"]) for e in experts])
    task = task_of(p)
    return RoutingData(
        name=task,
        questions=questions,
        experts=experts,
        scores=np.asarray(scores, dtype=np.float64),
        costs=np.asarray(costs, dtype=np.float64),
        tasks=[task] * len(questions),
    )


def _num(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def load_any(path: str | Path) -> RoutingData:
    """Load a RouterDC JSON or RouterBench CSV file by its extension."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        return load_routerbench_csv(p)
    return load_routerdc_json(p)


def concat(parts: list[RoutingData], name: str = "combined") -> RoutingData:
    """Rows of several files with the same experts, keeping each row's task."""
    if not parts:
        raise ValueError("nothing to concatenate")
    experts = parts[0].experts
    for d in parts[1:]:
        if d.experts != experts:
            raise InvalidRequestError(f"{d.name} has experts {d.experts}, expected {experts}")
    costs = None
    if all(d.costs is not None for d in parts):
        costs = np.concatenate([d.costs for d in parts])  # type: ignore[misc]
    return RoutingData(
        name=name,
        questions=[q for d in parts for q in d.questions],
        experts=list(experts),
        scores=np.concatenate([d.scores for d in parts]),
        costs=costs,
        tasks=[t for d in parts for t in d.tasks],
    )
