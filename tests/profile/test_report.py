"""`coe profile report` on the committed cpu-default profile: its numbers are the score matrix's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.cli import default_profile, main
from router_models.profile import load_profile, matrix_rows

PROFILE = default_profile("cpu-default")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    assert PROFILE is not None and (PROFILE / "profile.json").exists()
    out = tmp_path_factory.mktemp("report")
    assert main(["profile", "report", str(PROFILE), "--json", str(out / "r.json"), "--plot", str(out / "r.png")]) == 0
    assert (out / "r.png").stat().st_size > 10_000
    return json.loads((out / "r.json").read_text())


def test_the_committed_profile_covers_every_suite_and_expert() -> None:
    assert PROFILE is not None
    meta, items, answers = load_profile(PROFILE)
    assert set(meta["suites"]) == {"math", "code", "translation", "general"}
    assert set(meta["experts"]) == {"general", "code", "translation"}
    rows = matrix_rows(PROFILE)
    assert len(rows) == len(items), "every profiled item was answered by every expert"
    assert {r["group"] for r in rows} == set(meta["suites"])
    matrix = [json.loads(line) for line in (PROFILE / "matrix.jsonl").read_text().splitlines()]
    assert matrix == rows, "matrix.jsonl is what the answers say"


def test_the_committed_profile_calibrates_the_cascade() -> None:
    from coe.strategies.calibration import CascadeCalibration
    from router_models.profile_signals import load_signals

    meta, _, answers = load_profile(PROFILE)  # type: ignore[arg-type]
    for expert in meta["experts"]:
        have = load_signals(PROFILE, expert)  # type: ignore[arg-type]
        assert {a["key"] for a in answers[expert].values() if not a.get("error")} <= set(have), expert
    cal = CascadeCalibration.from_profile(PROFILE)  # type: ignore[arg-type]
    assert set(cal.experts) == set(meta["experts"])
    for c in cal.experts.values():  # a higher target never lowers the threshold
        thr = [c.threshold(x) for x in (0.1, 0.3, 0.5)]
        known = [x for x in thr if x is not None]
        assert known == sorted(known)


def test_report_numbers_match_the_score_matrix(report: dict) -> None:
    rows = matrix_rows(PROFILE)  # type: ignore[arg-type]
    for suite, info in report["suites"].items():
        srows = [r for r in rows if r["group"] == suite]
        assert info["n"] == len(srows)
        for e, p in info["experts"].items():
            assert p["accuracy"] == pytest.approx(100 * np.mean([r["scores"][e] for r in srows]))
        assert info["oracle"] == pytest.approx(100 * np.mean([max(r["scores"].values()) for r in srows]))


def test_router_is_trained_on_train_and_compared_on_test(report: dict) -> None:
    rows = matrix_rows(PROFILE)  # type: ignore[arg-type]
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    r = report["router"]
    assert r["n_test"] == len(test) and r["n_train"] == len(train)
    methods = r["methods"]
    oracle = methods["oracle"]["average"]
    assert all(m["average"] <= oracle + 1e-9 for m in methods.values())
    suites = sorted({x["group"] for x in train})
    macro = {e: np.mean([np.mean([x["scores"][e] for x in train if x["group"] == s]) for s in suites])
             for e in report["experts"]}
    best = max(macro, key=macro.get)  # type: ignore[arg-type]
    single = methods[f"best single ({best})"]
    for s in r["test_suites"]:  # the baseline's per-suite numbers are the matrix's
        assert single["per_suite"][s] == pytest.approx(
            100 * np.mean([x["scores"][best] for x in test if x["group"] == s]))
    assert [p["t"] for p in r["sweep"]][0] == 0.0
    assert r["sweep"][0]["accuracy"] == pytest.approx(methods["router (t=0)"]["average"])
    costs = [p["cost_usd"] for p in r["sweep"]]
    assert costs[-1] <= costs[0] + 1e-12, "a looser threshold never costs more"
