"""`coe router signal`: within-task routing signal by repeated CV, with the real encoder and FAISS."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coe.encoder import SentenceEncoder
from router_models.signal import within_group_signal

EXPERTS = ["coder", "mathematician", "translator"]


def _one_task() -> tuple[list[str], np.ndarray]:
    """Three kinds of query in ONE task; each kind has its own best expert (signal within the task)."""
    code = [f"How do I {v} a {o} in {lang}?" for v, o, lang in itertools.product(
        ["sort", "reverse", "serialize", "parse"], ["list", "dictionary", "string"], ["Python", "JavaScript"])]
    math = [f"What is {a} {op} {b}? Show the arithmetic." for a, op, b in itertools.product(
        [12, 37, 145, 9], ["plus", "times"], [3, 8, 21])]
    french = [f"Translate into French: {s}" for s in [
        "the cat sleeps", "I like apples", "where is the station", "good morning friends", "the weather is cold",
        "my brother is tall", "we are going to the beach", "this book is long", "she sings well",
        "the bread is fresh", "open the window", "I lost my keys", "the garden is green", "he drinks coffee",
        "they play football", "the car is red", "I am tired today", "the museum is closed", "see you tomorrow",
        "the soup is hot", "my phone is broken", "we eat at noon", "the river is wide", "children like games"]]
    questions = code + math + french
    kind = [0] * len(code) + [1] * len(math) + [2] * len(french)
    scores = np.array([[1.0 if e == k else 0.0 for e in range(3)] for k in kind])
    return questions, scores


@pytest.fixture(scope="module")
def encoded() -> tuple[list[str], np.ndarray, np.ndarray]:
    questions, scores = _one_task()
    return questions, SentenceEncoder().encode(questions), scores


def test_signal_within_a_task_is_found(encoded) -> None:  # noqa: ANN001
    _, emb, scores = encoded
    r = within_group_signal(emb, scores, ["gsm8k"] * len(emb), repeats=2, progress=False)
    assert r.accuracy["task best"][0] < 40  # one expert for the whole task: only its own kind is right
    gain, se = r.gain["kNN m=3"][0], r.gain_se["kNN m=3"][0]
    assert gain > 40 and gain > 5 * se, (gain, se)
    assert r.gain["ridge l=10"][0] > 30
    assert r.average_gain["kNN m=3"] == pytest.approx(gain)  # one group: the task mean is that group


def test_no_signal_in_shuffled_scores(encoded) -> None:  # noqa: ANN001
    _, emb, scores = encoded
    noise = np.random.default_rng(1).permutation(scores)  # scores no longer follow the queries
    r = within_group_signal(emb, noise, ["gsm8k"] * len(emb), repeats=2, progress=False)
    for m in r.methods[1:]:
        assert abs(r.gain[m][0]) <= 3 * r.gain_se[m][0] + 1e-9, (m, r.gain[m], r.gain_se[m])


def test_groups_are_scored_separately(encoded) -> None:  # noqa: ANN001
    _, emb, scores = encoded
    # Split by kind: every group now has one best expert, and nothing is left to route within it.
    kind = scores.argmax(1)
    groups = [["arc_challenge", "gsm8k", "mmlu"][k] for k in kind]
    r = within_group_signal(emb, scores, groups, repeats=1, progress=False)
    assert r.groups == ["arc_challenge", "gsm8k", "mmlu"]
    assert r.accuracy["task best"] == [100.0, 100.0, 100.0]
    assert all(g <= 1e-9 for m in r.methods[1:] for g in r.gain[m])


def test_cli_prints_the_table_and_writes_plot_and_json(encoded, tmp_path: Path) -> None:  # noqa: ANN001
    questions, _, scores = encoded
    f = tmp_path / "train.json"
    f.write_text(json.dumps([{"question": q, "scores": dict(zip(EXPERTS, map(float, s)))}
                             for q, s in zip(questions, scores)]))
    out = subprocess.run([sys.executable, "-m", "coe.cli", "router", "signal", "--data", str(f), "--repeats", "1",
                          "--encoder-quantization", "none", "--plot", str(tmp_path / "s.png"),
                          "--json", str(tmp_path / "s.json")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "within-task routing signal" in out.stdout and "kNN m=3" in out.stdout
    assert (tmp_path / "s.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["methods"][0] == "task best" and report["counts"] == [len(questions)]
