"""scripts/simulate.py: the discrete-event simulation of the load-aware controller (small scenarios, no Ray)."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from coe.config import ControllerConfig, load_config
from coe.routerdc import RouterDCModel

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "simulate.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    """The script, imported as a module (importing it must have no side effects)."""
    spec = importlib.util.spec_from_file_location("coe_simulate_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(mod)
    return mod


def small_burst(sim: ModuleType, **over: object) -> object:
    """5 experts, 60 -> 200 req/s between 10 s and 30 s, 90 s in all."""
    kw: dict[str, object] = {
        "n_experts": 5, "base_rps": 60.0, "burst_rps": 200.0, "burst_start": 10.0, "burst_end": 30.0,
        "duration": 90.0, "seed": 2, "provision_load": 0.4, "min_replicas_floor": 4, "max_replicas_factor": 3.0,
        "slo_factor": 6.0, "latency_window_s": 10.0,
    }
    return sim.Scenario(**{**kw, **over})


def test_route_is_the_routers_rule(sim: ModuleType) -> None:
    rng = np.random.default_rng(0)
    q = rng.uniform(0.0, 1.0, (500, 6))
    prices = np.array([0.1, 0.4, 0.2, 3.0, 1.0, 0.05])
    model = SimpleNamespace(prices=prices)  # choose() reads only the prices
    pen = np.array([0.0, 0.3, 0.0, 0.1, 0.0, 0.2])
    for t in (0.0, 0.05, 0.2, 1.0):
        assert np.array_equal(sim.route(q, prices, t, None), RouterDCModel.choose(model, q, t))
        assert np.array_equal(sim.route(q, prices, t, pen), RouterDCModel.choose(model, q, t, pen))


def test_no_queueing_latency_is_the_service_time(sim: ModuleType) -> None:
    """Deterministic service times and ample replicas: every latency equals its expert's median."""
    scn = sim.Scenario(n_experts=3, base_rps=50.0, burst_rps=50.0, burst_start=0.0, burst_end=0.0, duration=20.0,
                       sigma=0.0, provision_load=0.2)
    cfg = ControllerConfig(t_min=0.0, t_max=0.1)
    results, experts, _ = sim.run_both(scn, cfg, progress=False)
    medians = np.array([e.median_ms for e in experts])
    for res in results.values():
        assert not np.isnan(res.latency_ms).any()
        np.testing.assert_allclose(res.latency_ms, medians[res.chosen], rtol=1e-6)
        assert not res.over_slo.any()
    assert max(t for _, t in results["adaptive"].tick_t) == 0.0  # underloaded: the controller stays put


def test_burst_adaptive_vs_fixed(sim: ModuleType, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    scn = small_burst(sim)
    # The product defaults, pinned so config edits do not move this test; the overflow rule off, so this run
    # shows the slow loop (t) alone: with the rule on, spills absorb much of the burst (see the next test).
    cfg = ControllerConfig(t_max=0.1, overflow_load=None)
    results, _, traffic = sim.run_both(scn, cfg, progress=False)
    fixed, adaptive = results["fixed"], results["adaptive"]
    sf = sim.summarize(fixed, scn, traffic, cfg.t_min)
    sa = sim.summarize(adaptive, scn, traffic, cfg.t_min)

    # fixed: t never moves, nothing given up
    assert all(t == cfg.t_min for _, t in fixed.tick_t)
    assert sf["debt"] == 0.0
    # adaptive: t rises during the burst and is back at t_min (and stays there) before the run ends
    in_burst = [t for now, t in adaptive.tick_t if scn.burst_start <= now < scn.burst_end]
    assert max(in_burst) >= cfg.t_min + 0.05
    before = [t for now, t in adaptive.tick_t if now < scn.burst_start]
    assert max(before) == cfg.t_min
    assert sa["t_back_s"] is not None and sa["t_back_s"] < scn.duration - scn.burst_end
    last = [t for now, t in adaptive.tick_t if now < scn.duration][-1]
    assert last == cfg.t_min
    # the controller pays quality for latency during the burst
    assert sa["debt"] > 0.0 and sa["given_up_mean"] > 0.0
    assert sa["burst_p99_ms"] <= sf["burst_p99_ms"]
    assert sa["cost_usd"] < sf["cost_usd"]
    # the per-tick debt column is cumulative and ends at the total
    debt = [r["debt_cum"] for r in adaptive.rows]
    assert all(b >= a for a, b in itertools.pairwise(debt))
    assert debt[-1] == pytest.approx(sa["debt"], rel=1e-6)
    # every request finished
    assert sf["unfinished"] == 0 and sa["unfinished"] == 0

    assert adaptive.spilled == 0

    csv_path, png_path = sim.write_outputs(results, scn, cfg, tmp_path / "out")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["run"] for r in rows} == {"fixed", "adaptive"}
    assert len(rows) == len(fixed.rows) + len(adaptive.rows)
    assert {"t", "p99_ms", "slo_violation_share", "share_top3", "replicas", "debt_cum"} <= set(rows[0])
    assert sum(int(r["arrivals"]) for r in rows if r["run"] == "adaptive") == len(traffic.times)
    assert time.perf_counter() - t0 < 10.0


def test_controller_config_overrides_the_packaged_one(sim: ModuleType) -> None:
    packaged = load_config("cpu-default").controller
    cfg = sim.controller_config(sim.parse_args(["--t-max", "0.07", "--target-load", "0.6"]))
    assert (cfg.t_max, cfg.target_load) == (0.07, 0.6)
    assert (cfg.kp, cfg.ki, cfg.max_step, cfg.cooldown_s) == (packaged.kp, packaged.ki, packaged.max_step,
                                                              packaged.cooldown_s)


def test_main_writes_outputs(sim: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    summaries = sim.main(["--experts", "4", "--base-rps", "30", "--burst-rps", "90", "--burst-start", "5",
                          "--burst-end", "15", "--duration", "25", "--t-max", "0.1", "--no-progress",
                          "--out", str(out)])
    assert set(summaries) == {"fixed", "adaptive"}
    assert (out / "simulate.csv").stat().st_size > 0
    assert (out / "simulate.png").stat().st_size > 0


def test_burst_with_the_overflow_rule(sim: ModuleType) -> None:
    scn = small_burst(sim)
    cfg = ControllerConfig(t_max=0.1, overflow_load=1.0)
    results, _, traffic = sim.run_both(scn, cfg, progress=False)
    sf = sim.summarize(results["fixed"], scn, traffic, cfg.t_min)
    sa = sim.summarize(results["adaptive"], scn, traffic, cfg.t_min)
    assert results["fixed"].spilled == 0 and sa["spilled"] > 0  # only the adaptive run has the rule
    assert sa["burst_p99_ms"] <= sf["burst_p99_ms"] and sa["over_slo"] <= sf["over_slo"]
    assert 0.0 < sa["given_up_mean"] <= cfg.t_max  # never more than t_max below the best
    assert sa["unfinished"] == 0
