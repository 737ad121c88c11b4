"""The cascade's acceptance rule, calibrated on a profile's train split.

Per expert, a logistic model maps an answer's (mean, minimum) token log-probability to the probability that it is
right (the profile's score: 0/1, or chrF in [0, 1] as a soft label). Ranking the train answers by that probability
gives, for every cut, the mean score of the answers above it; the acceptance threshold for a target accuracy is the
lowest cut whose accepted answers reach the target. Under load the cascade's target drops by the controller's t.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_ACCEPTED = 5  # a cut must keep this many train answers before its accuracy counts


def _features(mean: np.ndarray, low: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(mean), mean, low], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """Newton's method for L2-regularised logistic regression with soft labels y in [0, 1]."""
    w = np.zeros(x.shape[1])
    reg = l2 * np.eye(x.shape[1])
    reg[0, 0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


@dataclass
class ExpertCalibration:
    """One expert's confidence model and its accuracy-by-cut curve on the train split."""

    coef: list[float]
    cuts: list[float]  # probability cuts, descending
    accuracy: list[float]  # mean score of the train answers at or above each cut
    kept: list[int]

    def confidence(self, logprob_mean: float, logprob_min: float) -> float:
        z = float(np.dot(self.coef, [1.0, logprob_mean, logprob_min]))
        return 1.0 / (1.0 + float(np.exp(-np.clip(z, -30, 30))))

    def threshold(self, target: float) -> float | None:
        """The lowest cut whose accepted train answers score at least `target` on average; None: no cut does
        (this expert's answers are never accepted on confidence alone)."""
        best = None
        for cut, acc, n in zip(self.cuts, self.accuracy, self.kept):
            if n >= MIN_ACCEPTED and acc >= target:
                best = cut
        return best


@dataclass
class CascadeCalibration:
    """Calibration of every profiled expert; `source` says where it came from."""

    experts: dict[str, ExpertCalibration]
    source: str
    train_answers: int

    @classmethod
    def fit(cls, rows: dict[str, list[dict[str, Any]]], source: str) -> CascadeCalibration:
        """From per-expert train rows {"score", "logprob_mean", "logprob_min"}."""
        out: dict[str, ExpertCalibration] = {}
        for name, rs in rows.items():
            if len(rs) < 2 * MIN_ACCEPTED:
                continue
            mean = np.array([r["logprob_mean"] for r in rs], dtype=np.float64)
            low = np.array([r["logprob_min"] for r in rs], dtype=np.float64)
            y = np.clip(np.array([r["score"] for r in rs], dtype=np.float64), 0.0, 1.0)
            x = _features(mean, low)
            w = fit_logistic(x, y)
            p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
            order = np.argsort(-p, kind="stable")
            acc = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
            out[name] = ExpertCalibration([float(v) for v in w], [float(v) for v in p[order]],
                                          [float(v) for v in acc], list(range(1, len(y) + 1)))
        return cls(out, source, sum(len(r) for r in rows.values()))

    @classmethod
    def from_profile(cls, profile: Path) -> CascadeCalibration:
        """Fit on a `coe profile` folder's train split (needs `coe profile signals` to have run on it)."""
        from router_models.profile_signals import signal_rows

        rows = signal_rows(profile, "train")
        if not any(rows.values()):
            from coe.errors import ConfigError

            raise ConfigError(f"profile {profile} has no log-probability signals: run "
                              f"`coe profile signals {profile} --config <config>` first")
        return cls.fit(rows, str(profile))

    def summary(self, target: float) -> dict[str, Any]:
        return {"source": self.source, "train_answers": self.train_answers,
                "thresholds": {e: c.threshold(target) for e, c in self.experts.items()}}
