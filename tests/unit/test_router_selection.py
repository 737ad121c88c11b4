"""How the router chooses its settings off the training distribution (router_models/train.py): fold weights,
pseudo-groups for unlabelled data, scoring candidates on held-out groups, and the learned fallback threshold.
Synthetic embeddings with known structure, so each expected outcome is computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from router_models.train import (TrainConfig, _leave_one_group_out_accuracy, assign_folds, calibrate_fallback,
                                 pseudo_groups)

DIM = 16


def blobs(n_per: int, centres: list[int], seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors scattered tightly around basis vectors e_c; returns (embeddings, blob index per row)."""
    rng = np.random.default_rng(seed)
    rows, ids = [], []
    for j, c in enumerate(centres):
        x = np.zeros((n_per, DIM), np.float32)
        x[:, c] = 1.0
        x += rng.normal(0, spread, x.shape).astype(np.float32)
        rows.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        ids += [j] * n_per
    return np.concatenate(rows).astype(np.float32), np.array(ids)


def test_fold_weights_give_each_group_or_cluster_the_same_say() -> None:
    emb, blob = blobs(60, [0, 1, 2, 3, 4], spread=0.02)
    cfg = TrainConfig(cv_folds=5, cv_clusters=5)
    # Labelled: each group's queries sum to 1 whatever their count.
    groups = np.array([0] * 240 + [1] * 60)
    folds, w = assign_folds(emb, groups, 2, cfg, 1, np.random.default_rng(0))  # k-means seed 1 finds the 5 blobs
    assert w[groups == 0].sum() == pytest.approx(1.0) and w[groups == 1].sum() == pytest.approx(1.0)
    assert w[groups == 1][0] == pytest.approx(4 * w[groups == 0][0])
    # Cluster folds keep each blob whole in one fold.
    assert all(len(set(folds[blob == b])) == 1 for b in range(5))
    # Unlabelled: the clusters (here the five blobs) weigh the same.
    one = np.zeros(len(emb), dtype=int)
    _, w1 = assign_folds(emb, one, 1, cfg, 1, np.random.default_rng(0))
    assert [round(w1[blob == b].sum(), 6) for b in range(5)] == [0.2] * 5
    _, wr = assign_folds(emb, one, 1, TrainConfig(cv_folds_by="random"), 0, np.random.default_rng(0))
    assert np.allclose(wr, 1 / len(emb))


def test_pseudo_groups_stand_in_for_missing_task_labels() -> None:
    emb, blob = blobs(100, [0, 5, 9])
    grp, names = pseudo_groups(emb, np.arange(len(emb)), TrainConfig(pseudo_groups=3))
    assert names == ["cluster-0", "cluster-1", "cluster-2"]
    # The clusters recover the blobs (up to naming).
    assert all(len(set(grp[blob == b])) == 1 for b in range(3)) and len(set(grp)) == 3
    grp, names = pseudo_groups(emb, np.arange(len(emb)), TrainConfig(pseudo_groups=0))
    assert names == ["all"] and not grp.any()
    # Too few queries for k-means (39 per centroid): one group.
    assert pseudo_groups(emb[:50], np.arange(50), TrainConfig(pseudo_groups=8))[1] == ["all"]


def two_tasks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two far-apart tasks; expert g is right on every query of task g, expert 2 on 60% of both."""
    emb, groups = blobs(100, [0, 8])
    correct = np.zeros((len(emb), 3))
    correct[groups == 0, 0] = 1
    correct[groups == 1, 1] = 1
    correct[np.arange(len(emb)) % 5 < 3, 2] = 1
    return emb, groups, correct


def test_held_out_group_scoring_routes_with_the_other_groups_only() -> None:
    emb, groups, correct = two_tasks()
    cfg = TrainConfig(knn_taus=(0.1,), strengths=(1.0, 100.0))
    cands = {(0, 0): [np.array([0, 0]), np.array([1, 1])]}
    out = _leave_one_group_out_accuracy(emb, correct, groups, 2, cfg, [10], cands)
    # Held out task 0, its neighbours and the prior come from task 1 (expert 1 right, credit 0 here): whichever
    # strength, the router picks expert 1 on task 0 and expert 0 on task 1; nothing learned transfers.
    assert out[0, 0] == [0.0, 0.0]


def test_fallback_threshold_is_learned_where_the_router_loses_to_the_fallback() -> None:
    emb, groups, correct = two_tasks()
    cfg = TrainConfig(knn_taus=(0.1,))
    strength = np.array([1.0, 1.0])
    # Seen traffic: queries right next to the training ones, where the router is always right.
    seen = (np.full(50, 0.99), np.ones(50), correct[:50, 2])
    thr, rep = calibrate_fallback(emb, correct, groups, 2, cfg, 10, 0.1, strength, 2, seen)
    # A held-out task's queries are far from every training query (similarity near 0) and routed wrongly: they
    # go to the fallback (60% right instead of 0); seen queries stay with the router.
    assert -1.0 < thr < 0.99
    assert rep["fallback_cv_unseen_acc_never"] == pytest.approx(0.0)
    assert rep["fallback_cv_unseen_acc"] > 50 and rep["fallback_cv_seen_acc"] == pytest.approx(100.0)
    # Where the router is right on held-out tasks too, the fallback never triggers.
    same = np.zeros_like(correct)
    same[:, 0] = 1
    thr, rep = calibrate_fallback(emb, same, groups, 2, cfg, 10, 0.1, strength, 2, (np.full(50, 0.99), np.ones(50),
                                                                                    np.zeros(50)))
    assert thr == -1.0 and rep["fallback_cv_unseen_share"] == 0.0


def test_fallback_threshold_never_sends_more_than_the_allowed_share_of_seen_queries() -> None:
    emb, groups, correct = two_tasks()
    cfg = TrainConfig(knn_taus=(0.1,), fallback_max_seen_share=0.05)
    # Seen queries as far from their neighbours as the held-out ones, and the fallback as good as the router
    # there: only the cap keeps the threshold from sweeping them all to the fallback.
    sims = np.linspace(-0.2, 1.0, 100)
    thr, rep = calibrate_fallback(emb, correct, groups, 2, cfg, 10, 0.1, np.array([1.0, 1.0]), 2,
                                  (sims, np.full(100, 0.6), np.full(100, 0.6)))
    assert np.mean(sims < thr) <= 0.05 and rep["fallback_cv_unseen_share"] < 0.5
