"""`coe profile` on the real CPU engines: resumable, nothing asked twice, the split recorded once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from router_models.profile import load_profile, matrix_rows, read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, max_tokens: int = 6) -> Path:
    """cpu-default's general and translation experts, answering in a few tokens."""
    from coe.config import load_config

    cfg = load_config("cpu-default")
    cfg.experts = [cfg.expert("general"), cfg.expert("translation")]
    for e in cfg.experts:
        e.sampling.max_tokens = max_tokens
    cfg.router.fallback_expert = "general"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=False)))
    return path


def _suite(tmp: Path, n: int) -> Path:
    path = tmp / "mini.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i}? Answer with a number.", "reference": str(2 * i),
             "scorer": "number"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _profile(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "coe.cli", "profile", *args, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _answers(out: Path) -> list[dict[str, object]]:
    return [r for f in sorted((out / "answers").glob("*.jsonl")) for r in read_jsonl(f)]


def test_profile_is_resumable_and_asks_nothing_twice(tmp_path: Path) -> None:
    n = 12
    cfg, suite, out = _config(tmp_path), _suite(tmp_path, n), tmp_path / "prof"
    args = ["--config", str(cfg), "--suite", f"mini:{suite}", "--out", str(out)]
    first = _profile(args)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if (out / "answers").exists() and len(_answers(out)) >= 4:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # no clean-up at all: a crash or an OOM kill
    first.wait(30)
    before = {(r["expert"], r["id"]): r for r in _answers(out)}
    assert 0 < len(before) < 2 * n, f"the first run should be cut mid-way: {len(before)} answers"

    second = _profile(args)
    text, _ = second.communicate(timeout=300)
    assert second.returncode == 0, text
    after = _answers(out)
    keys = [(r["expert"], r["id"]) for r in after]
    assert len(keys) == len(set(keys)) == 2 * n, "an item was asked twice, or one is missing"
    for k, row in before.items():  # what the first run answered is kept, not asked again
        assert next(r for r in after if (r["expert"], r["id"]) == k) == row
    assert f"{2 * n - len(before)} answers asked, {len(before)} already there" in text, text

    third = _profile(args)
    text3, _ = third.communicate(timeout=120)
    assert "0 answers asked, 24 already there" in text3, text3
    rows = matrix_rows(out)
    assert len(rows) == n and {r["split"] for r in rows} <= {"train", "test"}
    meta, items, answers = load_profile(out)
    assert meta["split"] == {"seed": 0, "train_fraction": 0.8} and len(items) == n
    for r in rows:  # the matrix holds exactly the scores of the answers
        assert r["scores"] == {e: answers[e][("mini", r["id"])]["score"] for e in ("general", "translation")}
    for r in after:
        assert r["cost_usd"] == pytest.approx((r["prompt_tokens"] + r["completion_tokens"]) / 1000 *
                                              meta["experts"][r["expert"]]["price_per_1k_tokens"])
        assert r["latency_s"] > 0 and r["completion_tokens"] <= 6
    train = json.loads((out / "matrix" / "train" / "mini.json").read_text())
    assert {"question", "scores"} == set(train[0]) and len(train) == sum(r["split"] == "train" for r in rows)

    # The cascade's calibration signals: one teacher-forced pass per answer, resumable.
    sig = subprocess.run([sys.executable, "-m", "coe.cli", "profile", "signals", str(out), "--config", str(cfg),
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sig.returncode == 0, sig.stdout + sig.stderr
    assert "{'general': 12, 'translation': 12}" in sig.stdout, sig.stdout
    for expert in ("general", "translation"):
        rows_ = read_jsonl(out / "signals" / f"{expert}.jsonl")
        assert {r["key"] for r in rows_} == {a["key"] for a in answers[expert].values()}
        assert all(r["logprob_min"] <= r["logprob_mean"] <= 0.0 and r["tokens"] >= 1 for r in rows_)
    again = subprocess.run([sys.executable, "-m", "coe.cli", "profile", "signals", str(out), "--config", str(cfg),
                            "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "{'general': 0, 'translation': 0}" in again.stdout, again.stdout


def test_split_is_recorded_once_and_model_changes_invalidate_the_cache(tmp_path: Path) -> None:
    cfg, suite, out = _config(tmp_path), _suite(tmp_path, 3), tmp_path / "prof"
    args = ["--config", str(cfg), "--suite", f"mini:{suite}", "--out", str(out), "--experts", "translation"]
    p = _profile(args)
    text, _ = p.communicate(timeout=180)
    assert p.returncode == 0 and "3 answers asked" in text, text
    p = _profile([*args, "--split", "0.5"])
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 1 and "was split with seed 0 and train fraction 0.8" in text, text
    # A different default sampling is a different model fingerprint: asked again, the old answers ignored.
    cfg2 = _config(tmp_path, max_tokens=4)
    p = _profile(["--config", str(cfg2), "--suite", f"mini:{suite}", "--out", str(out), "--experts", "translation"])
    text, _ = p.communicate(timeout=180)
    assert p.returncode == 0 and "3 answers asked, 0 already there" in text, text
    _, _, answers = load_profile(out)
    assert len(answers["translation"]) == 3 and all(a["completion_tokens"] <= 4 for a in answers["translation"].values())
