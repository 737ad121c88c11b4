"""scripts/loadtest.py's pure parts: the schedule, the config variant and the analysis (no service needed)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from coe.config import load_config


@pytest.fixture(scope="module")
def lt() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "loadtest.py"
    spec = importlib.util.spec_from_file_location("coe_loadtest", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coe_loadtest"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_schedule_is_open_loop_poisson_and_bounded(lt: ModuleType) -> None:
    phases = [("low", 20.0, 1.0), ("step", 30.0, 5.0), ("after", 40.0, 1.0)]
    shots = lt.schedule(phases, {"code": 0.5, "chat": 0.5}, seed=1, max_requests=10_000)
    assert shots == lt.schedule(phases, {"code": 0.5, "chat": 0.5}, seed=1, max_requests=10_000)  # reproducible
    assert all(a.at <= b.at for a, b in zip(shots, shots[1:]))
    counts = {p: sum(1 for s in shots if s.phase == p) for p, _, _ in phases}
    assert 100 <= counts["step"] <= 200 and counts["low"] < 45 and counts["after"] < 70  # 150, 20, 40 expected
    assert all(20.0 <= s.at < 50.0 for s in shots if s.phase == "step")
    assert {s.kind for s in shots} == {"code", "chat"}
    with pytest.raises(SystemExit, match="max-requests"):
        lt.schedule(phases, {"code": 1.0}, seed=1, max_requests=50)


def test_config_variant(lt: ModuleType) -> None:
    cfg = lt.loadtest_config(load_config("cpu-default"), premium_tokens=200, tokens=12, slo_s=5.0,
                             target_ongoing=8.0, premium_target_ongoing=2.0)
    by = {e.name: e for e in cfg.experts}
    assert by["code"].sampling.max_tokens == 200  # the priciest expert
    assert by["general"].sampling.max_tokens == 12 and by["translation"].sampling.max_tokens == 12
    assert all(e.llama_cpp.n_threads == 1 and e.slo.total_ms == 5000.0 for e in cfg.experts)
    assert by["code"].autoscaling.target_ongoing_requests == 2.0
    assert by["general"].autoscaling.target_ongoing_requests == 8.0


def test_summary_counts_failures_and_finds_the_return_of_t(lt: ModuleType) -> None:
    shots = [lt.Shot(at=float(i), kind="code", prompt="p", phase="step" if 2 <= i < 6 else "low") for i in range(10)]
    outs = [lt.Outcome(s, sent=s.at, latency_ms=100.0 * (i + 1), status=200, expert="code" if i % 2 else "general",
                       threshold=0.0, tokens=10) for i, s in enumerate(shots)]
    outs[3].status, outs[3].error = 503, "overloaded_error"
    outs[4].threshold, outs[3].threshold, outs[5].threshold = 0.15, 0.3, math.nan  # failed / no header: not counted
    run = lt.RunData(name="adaptive", outcomes=outs,
                     t_samples=[(1.0, 0.0, 0.0), (3.0, 0.2, 0.1), (6.5, 0.2, 0.0), (9.0, 0.0, 0.0)],
                     debt={"total": 0.5, "requests": 3})
    s = lt.summarize(run, "code", {"code": 1.0, "general": 0.1}, slo_ms=550.0, step=(2.0, 6.0), resting=0.0)
    assert s["ok"] == 9 and s["errors"] == {"overloaded_error": 1}
    assert math.isinf(s["p99_ms"]) and math.isinf(s["p99_step_ms"])  # a failure is never within the SLO
    assert s["over_slo_pct"] == pytest.approx(60.0)  # 5 of 10 slower than 550 ms, plus the failure
    assert s["t_max_seen"] == 0.2 and s["t_back_after_step_s"] == pytest.approx(3.0)
    assert s["t_applied_max"] == 0.15  # the t answered requests were routed under, not the controller's
    assert s["premium_share_step"] == pytest.approx(1 / 3)  # step: i=2,4,5 answered; 5 went to code
    rows = lt.per_second(run, ["code", "general"], 550.0)
    assert rows[3]["errors"] == 1 and rows[3]["t"] == 0.2
