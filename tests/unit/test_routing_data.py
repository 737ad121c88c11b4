"""Routing data loaders and the RouterDC paper's scoring rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from coe.errors import InvalidRequestError
from router_models.data import concat, load_any, paper_correct, task_of

SHARED = Path(os.environ.get("COE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def test_task_names() -> None:
    assert task_of("x/mmlu_test.json") == "mmlu"
    assert task_of("gsm8k-train.json") == "gsm8k"
    assert task_of("winograde_train.csv") == "winograde"


def test_paper_rule_binarises_multiple_choice_only() -> None:
    s = np.array([[0.3, 0.0], [0.7, np.nan], [0.3, 0.0]])
    c = paper_correct(s, ["mmlu", "gsm8k", "humaneval"])
    assert c[0].tolist() == [1.0, 0.0]
    assert c[1, 0] == 0.7 and np.isnan(c[1, 1])
    assert c[2].tolist() == [0.3, 0.0]


def test_json_and_csv_round_trip(tmp_path: Path) -> None:
    j = tmp_path / "mmlu_train.json"
    j.write_text(json.dumps([{"question": "q1", "scores": {"a": 0.5, "b": 0}},
                             {"question": "q2", "scores": {"a": 0, "b": 0.9}}]))
    d = load_any(j)
    assert d.experts == ["a", "b"] and d.questions == ["q1", "q2"] and d.tasks == ["mmlu", "mmlu"]
    assert d.correct().tolist() == [[1.0, 0.0], [0.0, 1.0]]
    c = tmp_path / "arc_train.csv"
    c.write_text("prompt,eval_name,a,c,a|total_cost,c|total_cost\nhello,arc,1,,0.001,0.01\n")
    b = load_any(c)
    assert b.experts == ["a", "c"] and np.isnan(b.scores[0, 1]) and b.costs is not None
    assert b.costs[0].tolist() == [0.001, 0.01]
    both = concat([d, d.subset([1])])
    assert len(both) == 3 and both.tasks == ["mmlu"] * 3
    with pytest.raises(InvalidRequestError):
        concat([d, b])


def test_bad_files_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_any(bad)
    csvf = tmp_path / "y.csv"
    csvf.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidRequestError, match="RouterBench"):
        load_any(csvf)


def test_shared_single_model_accuracies_match_the_published_table() -> None:
    """The loaders + rule reproduce ../shared/data/README.md's single-model averages."""
    assert (SHARED / "routing").exists(), f"shared routing data not found at {SHARED}: set COE_SHARED_DATA"
    files = ["mmlu_test.json", "gsm8k-test.json", "cmmlu_test.json", "arc_challenge_test.json", "humaneval_test.json"]
    per_file = [np.nanmean(load_any(SHARED / "routing" / "routerdc" / f).correct(), axis=0) * 100 for f in files]
    avg = np.mean(per_file, axis=0)
    assert np.round(avg, 2).tolist()[-1] == pytest.approx(54.56, abs=0.01)  # dolphin-2.9-llama3-8b
    assert np.round(per_file[0], 2).tolist()[0] == pytest.approx(62.14, abs=0.01)  # Mistral-7B on MMLU
