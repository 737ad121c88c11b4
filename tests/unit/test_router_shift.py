"""Evaluation under shift (router_models/shift.py): the helpers, and each protocol on small slices of the real
RouterDC files (skips without ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coe.encoder import SentenceEncoder
from router_models import shift
from router_models.train import TrainConfig
from tests.unit.test_router_eval import RDC, _slice


def test_auroc_matches_its_definition() -> None:
    assert shift.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert shift.auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert shift.auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert shift.auroc(a, b) == pytest.approx(brute)


def test_paired_standard_error_over_files() -> None:
    d1, d2 = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.0, 1.0])
    mean, se = shift.file_mean_diff([d1, d2])
    assert mean == pytest.approx((0.5 + 0.25) / 2 * 100)
    assert se == pytest.approx(np.sqrt((d1.var(ddof=1) / 4 + d2.var(ddof=1) / 4) / 4) * 100)


def test_shifted_proportions_are_at_the_stated_distance_and_sampled_so() -> None:
    p = np.array([0.5, 0.3, 0.2])
    q = shift.shifted_proportions(p, 0.3, seed=1)
    assert q.sum() == pytest.approx(1.0) and (q >= 0).all()
    assert 0.5 * np.abs(q - p).sum() == pytest.approx(0.3)
    assert not np.allclose(q, shift.shifted_proportions(p, 0.3, seed=2))
    groups = np.array(["a"] * 500 + ["b"] * 300 + ["c"] * 200)
    rows = shift.sample_mixture(groups, dict(zip("abc", q)), seed=0)
    got = np.array([(groups[rows] == g).mean() for g in "abc"])
    assert np.abs(got - q).max() < 0.01 and len(set(rows)) == len(rows)
    with pytest.raises(ValueError):
        shift.shifted_proportions(p, 1.0, seed=0)


def test_plain_knn_is_a_softmax_weighted_neighbour_mean() -> None:
    train = np.eye(3, dtype=np.float32)
    credit = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    q = shift.plain_knn(train, credit, np.array([[1.0, 0.0, 0.0]], dtype=np.float32), k=3, temperature=0.1)
    w = np.exp(np.array([1.0, 0.0, 0.0]) / 0.1)
    assert q[0] == pytest.approx((w[:, None] * credit).sum(0) / w.sum())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    if not RDC.exists():
        pytest.fail(f"shared RouterDC data not found at {RDC}")
    d = tmp_path_factory.mktemp("shift")
    pairs = [("mmlu_train", "mmlu_test"), ("gsm8k-train", "gsm8k-test"), ("humaneval_train", "humaneval_test")]
    return {"train": [_slice(RDC / f"{a}.json", 150, d / f"{a}.json") for a, _ in pairs],
            "test": [_slice(RDC / f"{b}.json", 60, d / f"{b}.json") for _, b in pairs]}


CFG = TrainConfig(epochs=5, cv_repeats=1)


def test_merge_groups_trains_without_file_identity(files: dict[str, list[Path]]) -> None:
    res = shift.merge_groups(files["train"], files["test"], encoder=SentenceEncoder(), cfg=CFG, progress=False)
    assert res.files == ["mmlu", "gsm8k", "humaneval"] and set(res.average) == set(shift.METHODS)
    for f in res.files:
        assert all(res.accuracy[f][m] <= res.accuracy[f]["oracle"] + 1e-9 for m in shift.METHODS)
    d, se = res.diff["best_single"]
    assert d == pytest.approx(res.average["router"] - res.average["best_single"]) and se > 0


def test_leave_one_group_out_reports_uncertainty_on_the_held_out_task(files: dict[str, list[Path]]) -> None:
    res = shift.leave_one_group_out(files["train"], files["test"], encoder=SentenceEncoder(), cfg=CFG,
                                    progress=False)
    assert res.files == ["mmlu", "gsm8k", "humaneval"]
    for g, info in res.extra["per_group"].items():
        assert 0.0 <= info["fallback_share_heldout"] <= 1.0 and 0.0 <= info["auroc_ood_score"] <= 1.0
        assert info["best_single_expert"] and info["fallback_expert"]
    assert res.n == {"mmlu": 60, "gsm8k": 60, "humaneval": 49}  # HumanEval's test file has 49 queries
    with pytest.raises(ValueError, match="unpaired"):
        shift.leave_one_group_out(files["train"][:2], files["test"], encoder=SentenceEncoder(), cfg=CFG,
                                  progress=False)


def test_shifted_mix_and_the_cli(files: dict[str, list[Path]], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from coe.cli import main

    out = tmp_path / "shift.json"
    assert main(["router", "eval", "--shift", "0.3", "--seed", "3", "--train", *map(str, files["train"]),
                 "--data", *map(str, files["test"]), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["extra"]["total_variation"] == pytest.approx(0.3, abs=1e-6)
    assert "shifted mix" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--plot is not used by a protocol"):
        main(["router", "eval", "--merge-groups", "--train", str(files["train"][0]), "--data",
              str(files["test"][0]), "--plot", "x.png"])
    with pytest.raises(SystemExit, match="--router is required"):
        main(["router", "eval", "--data", str(files["test"][0])])
