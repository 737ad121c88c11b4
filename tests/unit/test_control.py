"""The load-aware threshold controller on synthetic load traces (no clock, no I/O)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from coe.config import ControllerConfig, SLOConfig, parse_config
from coe.control import (
    ExpertLoad,
    LatencyWindow,
    Overflow,
    ServiceRate,
    ThresholdController,
    ThresholdState,
    capacity_per_replica,
    quality_given_up,
    slo_capacity,
    spill_overflow,
)

CFG = ControllerConfig(
    interval_s=1.0, t_min=0.0, t_max=0.1, target_load=0.8, kp=0.05, ki=0.02,
    deadband=0.1, max_step=0.02, cooldown_s=5.0, queue_penalty=0.05,
)


def occupancy(ratio: float, expert: str = "a", now: float = 0.0) -> ExpertLoad:
    """A load whose ratio is `ratio` (capacity 100 on one replica, no latency samples)."""
    return ExpertLoad(
        expert=expert, in_flight=round(ratio * 100), replicas=1, capacity_per_replica=100.0,
        slo=SLOConfig(), timestamp=now,
    )


def run(ctrl: ThresholdController, trace: list[float], start: float = 0.0) -> list[ThresholdState]:
    return [ctrl.step({"a": occupancy(r)}, now=start + i * CFG.interval_s) for i, r in enumerate(trace)]


def direction_changes(ts: list[float]) -> int:
    signs = [math.copysign(1, b - a) for a, b in itertools.pairwise(ts) if b != a]
    return sum(1 for a, b in itertools.pairwise(signs) if a != b)


def test_load_ratio_takes_the_worst_signal() -> None:
    slo = SLOConfig(ttft_ms=1000, total_ms=10000)
    base = {"expert": "a", "replicas": 2, "capacity_per_replica": 4.0, "slo": slo, "timestamp": 0.0}
    assert ExpertLoad(in_flight=4, queued=2, **base).load_ratio() == pytest.approx(6 / 8)
    assert ExpertLoad(in_flight=1, ttft_p99_ms=1500, **base).load_ratio() == pytest.approx(1.5)
    assert ExpertLoad(in_flight=1, total_p99_ms=12000, ttft_p99_ms=None, **base).load_ratio() == pytest.approx(1.2)
    zero = dict(base, replicas=0)
    assert ExpertLoad(in_flight=4, **zero).load_ratio() == pytest.approx(1.0)  # replicas<1 counts as 1
    load = ExpertLoad(in_flight=3, queued=1, ttft_p99_ms=900.0, **base)
    assert ExpertLoad.from_dict(load.to_dict()) == load


def test_capacity_per_replica_from_config() -> None:
    cfg = parse_config({
        "router": {"kind": "embedding", "fallback_expert": "a"},
        "experts": [
            {"name": "a", "description": "x", "domains": ["g"], "engine": "llama_cpp",
             "source": {"path": "/m.gguf"}, "price_per_1k_tokens": 0, "max_ongoing_requests": 6,
             "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}},
            {"name": "b", "description": "x", "domains": ["g"], "engine": "llama_cpp",
             "source": {"path": "/m.gguf"}, "price_per_1k_tokens": 0,
             "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 3}},
        ],
    })
    assert capacity_per_replica(cfg.expert("a")) == 2.0  # the target, not the admission limit
    assert capacity_per_replica(cfg.expert("b")) == 3.0


def test_t_rises_under_sustained_load_and_each_step_is_bounded() -> None:
    ctrl = ThresholdController(CFG)
    states = run(ctrl, [1.5] * 30)
    ts = [CFG.t_min] + [s.t for s in states]
    assert states[0].t > CFG.t_min
    assert all(b >= a for a, b in itertools.pairwise(ts))
    assert max(abs(b - a) for a, b in itertools.pairwise(ts)) <= CFG.max_step + 1e-12
    assert states[-1].t == pytest.approx(CFG.t_max)
    assert [s.version for s in states] == list(range(1, 31))
    assert states[-1].load == pytest.approx(1.5) and states[-1].reason.startswith("hold: at t_max")


def test_falls_back_to_t_min_after_the_burst_but_not_before_cooldown() -> None:
    ctrl = ThresholdController(CFG)
    burst = run(ctrl, [2.0] * 15)
    assert burst[-1].t == pytest.approx(CFG.t_max)
    last_overloaded = burst[-1].updated_at
    after = run(ctrl, [0.0] * 30, start=15.0)
    ts = [s.t for s in after]
    # Nothing falls within cooldown_s of the last overloaded step, then t falls.
    cooling = [s for s in after if s.updated_at - last_overloaded < CFG.cooldown_s]
    assert cooling and all(s.t == CFG.t_max and "cooldown" in s.reason for s in cooling)
    assert after[len(cooling)].t < CFG.t_max
    assert all(b <= a for a, b in itertools.pairwise(ts))
    # Back at rest within the bound: cooldown + ceil(range / max_step) periods.
    bound = CFG.cooldown_s + math.ceil((CFG.t_max - CFG.t_min) / CFG.max_step) + 1
    first_rest = next(i for i, t in enumerate(ts) if t == CFG.t_min)
    assert first_rest <= bound
    assert after[-1].t == CFG.t_min and after[-1].reason.startswith("hold: at t_min")
    assert max(abs(b - a) for a, b in itertools.pairwise(ts)) <= CFG.max_step + 1e-12


def test_low_but_nonzero_load_also_returns_t_to_rest() -> None:
    ctrl = ThresholdController(CFG)
    run(ctrl, [1.5] * 12)
    after = run(ctrl, [0.3] * 40, start=12.0)
    assert after[-1].t == CFG.t_min


def test_returns_to_t_min_with_zero_gains() -> None:
    cfg = CFG.model_copy(update={"kp": 0.0, "ki": 0.0})
    ctrl = ThresholdController(cfg, initial=ThresholdState(t=0.1, version=7))
    states = run(ctrl, [0.0] * 20)
    assert states[0].version == 8
    assert states[-1].t == cfg.t_min


@pytest.mark.parametrize("level", [5.0, 50.0, 1e6])
def test_stays_within_bounds_under_extreme_load(level: float) -> None:
    ctrl = ThresholdController(CFG)
    rng = random.Random(1)
    trace = [level * rng.random() * 2 for _ in range(100)] + [0.0] * 20 + [level] * 20
    for s in run(ctrl, trace):
        assert CFG.t_min <= s.t <= CFG.t_max


def test_flat_trace_at_target_with_noise_inside_deadband_does_not_move_t() -> None:
    ctrl = ThresholdController(CFG, initial=ThresholdState(t=0.05))
    rng = random.Random(0)
    trace = [CFG.target_load + rng.uniform(-0.09, 0.09) for _ in range(200)]
    ts = [s.t for s in run(ctrl, trace)]
    assert set(ts) == {0.05}
    assert direction_changes(ts) == 0


def test_flat_overloaded_trace_converges_to_t_max_without_oscillating() -> None:
    ctrl = ThresholdController(CFG)
    rng = random.Random(2)
    trace = [1.2 + rng.uniform(-0.05, 0.05) for _ in range(120)]
    ts = [s.t for s in run(ctrl, trace)]
    assert direction_changes(ts) == 0
    assert ts[-1] == pytest.approx(CFG.t_max)


def test_mildly_overloaded_trace_rises_monotonically() -> None:
    ctrl = ThresholdController(CFG)
    ts = [s.t for s in run(ctrl, [0.95] * 200)]  # error 0.15, just outside the deadband
    assert direction_changes(ts) == 0 and all(b >= a for a, b in itertools.pairwise(ts))
    assert ts[-1] == pytest.approx(CFG.t_max)


def test_cluster_load_is_the_relievable_experts_mean_load_and_penalties() -> None:
    loads = {"a": occupancy(2.0, "a"), "b": occupancy(0.2, "b"), "c": occupancy(0.9, "c")}
    assert ThresholdController.cluster_load(loads) == pytest.approx(2.0)
    share = {"a": 0.25, "b": 0.75}
    assert ThresholdController.cluster_load(loads, share) == pytest.approx(0.25 * 2.0 + 0.75 * 0.2)
    # c is busy but no movable request prefers it: a higher t cannot relieve it, so it does not drive t.
    assert ThresholdController.cluster_load(loads, {"b": 0.75, "c": 0.0}) == pytest.approx(0.2)
    # Experts absent from the relievable demand (t cannot move their traffic) do not dilute a busy one.
    assert ThresholdController.cluster_load(loads, {"a": 1.0}) == pytest.approx(2.0)
    assert ThresholdController.cluster_load(loads, {"a": 0.01, "b": 0.99}, min_share=0.05) == pytest.approx(0.2)
    assert ThresholdController.cluster_load(loads, {"x": 1.0}) == pytest.approx(2.0)  # no known expert: max
    assert ThresholdController.cluster_load({}) == 0.0
    state = ThresholdController(CFG).step(loads, now=0.0, traffic_share=share)
    assert set(state.penalties) == {"a", "c"}
    assert state.penalties["a"] == pytest.approx(CFG.queue_penalty * (2.0 - 0.8))
    assert state.penalties["c"] == pytest.approx(CFG.queue_penalty * (0.9 - 0.8))
    assert ThresholdState.from_dict(state.to_dict()) == state


def test_quality_given_up() -> None:
    scores = {"big": 0.9, "small": 0.85, "tiny": 0.5}
    assert quality_given_up(scores, "big") == 0.0
    assert quality_given_up(scores, "small") == pytest.approx(0.05)
    assert quality_given_up(scores, "missing") == 0.0
    assert quality_given_up({}, "x") == 0.0


def test_latency_window_percentiles_and_expiry() -> None:
    w = LatencyWindow(window_s=30.0, max_samples=1000)
    assert w.p99() == (None, None)
    for i in range(100):
        w.add(float(i) * 0.1, ttft_ms=float(i + 1), total_ms=float(10 * (i + 1)))
    assert w.p50() == (50.0, 500.0)
    assert w.p99() == (99.0, 990.0)
    w.add(10.0, ttft_ms=None, total_ms=5.0)  # no ttft: only total counts it
    assert len(w) == 101 and w.p99().ttft_ms == 99.0
    # Samples older than window_s expire as time moves on.
    assert w.p99(now=35.0) == (100.0, 1000.0)  # those after t=5.0 remain
    assert w.p99(now=41.0) == (None, None) and len(w) == 0


def test_latency_window_caps_samples() -> None:
    w = LatencyWindow(window_s=1e9, max_samples=10)
    for i in range(100):
        w.add(float(i), float(i), float(i))
    assert len(w) == 10 and w.p50() == (94.0, 94.0)


# -- the routing rule under load ------------------------------------------------------------------------


def test_choose_without_penalties_is_hybridllm() -> None:
    from coe.control import choose_within_threshold

    rng = np.random.default_rng(3)
    q = rng.uniform(0, 1, (400, 5))
    prices = np.array([5.0, 1.0, 3.0, 0.5, 2.0])
    for t in (0.0, 0.1, 0.3, 1.0):
        got = choose_within_threshold(q, prices, t)
        for row, k in zip(q, got):
            ok = np.flatnonzero(row >= row.max() - t - 1e-12)
            assert k == ok[np.argmin(prices[ok])]  # the cheapest within t (no ties in random data)


def test_penalties_never_route_beyond_t_and_drop_loaded_alternatives() -> None:
    from coe.control import choose_within_threshold

    rng = np.random.default_rng(4)
    q = rng.uniform(0, 1, (2000, 6))
    prices = np.geomspace(0.1, 10.0, 6)
    pen = rng.uniform(0, 0.4, 6)
    for t in (0.0, 0.05, 0.2):
        got = choose_within_threshold(q, prices, t, pen)
        given_up = q.max(1) - q[np.arange(len(q)), got]
        assert (given_up <= t + 1e-12).all()  # never more than the request's own t
        if t == 0.0:
            assert np.array_equal(got, q.argmax(1))  # premium: always the best, whatever the load
    # A cheap alternative within t is used while idle and dropped once loaded beyond its slack.
    q1 = np.array([[0.90, 0.85, 0.50]])
    prices1 = np.array([3.0, 1.0, 0.1])
    assert choose_within_threshold(q1, prices1, 0.1)[0] == 1
    assert choose_within_threshold(q1, prices1, 0.1, np.array([0.0, 0.06, 0.0]))[0] == 0
    # The loaded best expert leaves first: a pricier alternative within t takes its request.
    q2 = np.array([[0.90, 0.88]])
    assert choose_within_threshold(q2, np.array([1.0, 2.0]), 0.05, np.array([0.2, 0.0]))[0] == 1
    # ... unless t is 0, or nothing else is within t: then the best is kept.
    assert choose_within_threshold(q2, np.array([1.0, 2.0]), 0.0, np.array([0.2, 0.0]))[0] == 0
    assert choose_within_threshold(q2, np.array([1.0, 2.0]), 0.01, np.array([0.2, 0.0]))[0] == 0


def test_when_the_best_and_its_alternative_are_both_loaded_the_less_loaded_takes_the_request() -> None:
    from coe.control import choose_within_threshold

    q = np.array([[0.82, 0.69, 0.10]])  # premium, generalist, far-off cheap expert
    prices = np.array([3.0, 2.0, 1.0])
    # Premium far more loaded than the generalist: diverted to the generalist (not sent back to the premium).
    assert choose_within_threshold(q, prices, 0.3, np.array([0.8, 0.3, 0.0]))[0] == 1
    # The generalist more loaded than the premium: it stays with the premium.
    assert choose_within_threshold(q, prices, 0.3, np.array([0.1, 0.6, 0.0]))[0] == 0
    # Never to the cheap expert 0.72 below, however loaded the others are.
    assert choose_within_threshold(q, prices, 0.3, np.array([5.0, 5.0, 0.0]))[0] in (0, 1)
    # An infinite penalty excludes; with every candidate excluded the best is kept.
    assert choose_within_threshold(q, prices, 0.3, np.array([np.inf, 0.0, 0.0]))[0] == 1
    assert choose_within_threshold(q, prices, 0.3, np.array([np.inf, np.inf, 0.0]))[0] == 0


def test_relievable_demand() -> None:
    from coe.control import relievable

    q = np.array([[0.9, 0.8, 0.1], [0.9, 0.5, 0.1], [0.2, 0.9, 0.85], [0.1, 0.2, 0.9]])
    prices = np.array([3.0, 2.0, 1.0])
    # Row 0: a cheaper expert within 0.3; row 1: none; row 2: the cheapest is near; row 3: best is the cheapest.
    assert relievable(q, prices, 0.3).tolist() == [True, False, True, False]
    assert relievable(q, prices, 0.0).tolist() == [False, False, False, False]


def test_demand_share_is_smoothed_so_one_quiet_period_does_not_drop_t() -> None:
    """At a few requests per second one period's share is 0 or 1 per expert; the controller smooths it, so a
    second in which only chat arrived does not hide the premium expert's queue."""
    cfg = CFG.model_copy(update={"share_window_s": 10.0, "min_share": 0.05})
    ctrl = ThresholdController(cfg)
    busy = {"a": occupancy(2.0, "a"), "b": occupancy(0.1, "b")}
    for i in range(10):
        ctrl.step(busy, now=float(i), traffic_share={"a": 0.6, "b": 0.4})
    t_before = ctrl.state.t
    steady = ctrl.state.load
    assert steady == pytest.approx(0.6 * 2.0 + 0.4 * 0.1)
    state = ctrl.step(busy, now=10.0, traffic_share={"b": 1.0})  # only b's traffic this second
    assert state.load > 0.8 * steady and state.t >= t_before  # not b's 0.1, as that second alone would say
    assert 0.5 < ctrl.smoothed_share()["a"] < 0.6
    state = ctrl.step(busy, now=11.0, traffic_share=None)  # no routed traffic: the share is kept for a while
    assert state.load > 0.8 * steady and ctrl.smoothed_share()
    ctrl.step(busy, now=11.0 + 3 * cfg.share_window_s + 1, traffic_share=None)
    assert ctrl.smoothed_share() == {}  # stale: every expert counts again


# -- the overflow rule (the fast half) --------------------------------------------------------------------

PRICES = np.array([3.0, 2.0, 1.0])  # premium, mid, cheap


def test_overflow_spills_requests_in_order_once_the_expert_is_full() -> None:
    q = np.array([[0.9, 0.85, 0.5]] * 4)  # premium best, mid 0.05 below, cheap far below
    chosen = np.zeros(4, dtype=int)
    ov = Overflow(occupancy=np.array([1.0, 0.0, 0.0]), capacity=np.array([2.0, 8.0, 8.0]), t_spill=np.full(4, 0.1))
    out, spilled = spill_overflow(q, PRICES, chosen, np.ones(4, dtype=bool), ov)
    # The first fills premium (1 -> 2); the rest find it full and go to mid (within 0.1), never to cheap (0.4 below).
    assert out.tolist() == [0, 1, 1, 1] and spilled.tolist() == [False, True, True, True]
    assert ov.occupancy.tolist() == [1.0, 0.0, 0.0]  # the caller's counts are not modified


def test_overflow_respects_eligibility_t_spill_and_full_alternatives() -> None:
    q = np.array([[0.9, 0.85, 0.5]])
    full = Overflow(occupancy=np.array([5.0, 0.0, 0.0]), capacity=np.array([2.0, 8.0, 8.0]), t_spill=np.array([0.1]))
    assert spill_overflow(q, PRICES, np.array([0]), np.array([False]), full)[0].tolist() == [0]  # not eligible
    tight = Overflow(occupancy=full.occupancy, capacity=full.capacity, t_spill=np.array([0.01]))
    assert spill_overflow(q, PRICES, np.array([0]), np.array([True]), tight)[0].tolist() == [0]  # mid beyond t
    # The only alternative is full too: the request goes where it adds the least load relative to capacity.
    both = Overflow(occupancy=np.array([5.0, 9.0, 0.0]), capacity=full.capacity, t_spill=np.array([0.1]))
    out, spilled = spill_overflow(q, PRICES, np.array([0]), np.array([True]), both)
    assert out.tolist() == [1] and spilled[0]  # mid at (9+1)/8 beats premium at (5+1)/2
    worse = Overflow(occupancy=np.array([2.0, 30.0, 0.0]), capacity=full.capacity, t_spill=np.array([0.1]))
    out, spilled = spill_overflow(q, PRICES, np.array([0]), np.array([True]), worse)
    assert out.tolist() == [0] and not spilled[0]  # mid at 31/8 is worse off than premium at 3/2: it waits
    # Not beyond t_spill (cheap is 0.4 below), and never to an excluded (infinite penalty) expert.
    assert spill_overflow(q, PRICES, np.array([0]), np.array([True]), both,
                          np.array([0.0, np.inf, 0.0]))[0].tolist() == [0]
    # Load penalties rank the alternatives that are not full just as in choose_within_threshold.
    q3 = np.array([[0.9, 0.86, 0.85]])
    assert spill_overflow(q3, PRICES, np.array([0]), np.array([True]), full)[0].tolist() == [2]
    pen = np.array([0.0, 0.0, 0.2])
    assert spill_overflow(q3, PRICES, np.array([0]), np.array([True]), full, pen)[0].tolist() == [1]
    with pytest.raises(ValueError):
        Overflow(occupancy=np.zeros(2), capacity=np.zeros(3), t_spill=np.zeros(1))


def test_overflow_balances_a_burst_beyond_every_capacity_in_proportion() -> None:
    q = np.array([[0.9, 0.85, 0.5]] * 30)
    ov = Overflow(occupancy=np.zeros(3), capacity=np.array([2.0, 8.0, 8.0]), t_spill=np.full(30, 0.1))
    out, _ = spill_overflow(q, PRICES, np.zeros(30, dtype=int), np.ones(30, dtype=bool), ov)
    n_prem, n_mid = int((out == 0).sum()), int((out == 1).sum())
    assert n_prem + n_mid == 30 and not (out == 2).any()
    assert n_prem / 2.0 == pytest.approx(n_mid / 8.0, abs=0.5)  # 6 and 24: equal load per unit of capacity


def test_service_rate_measures_busy_seconds_per_request_and_slo_capacity() -> None:
    sr = ServiceRate(window_s=30.0, min_samples=3)
    assert sr.seconds_per_request(0.0) is None and slo_capacity(None, 8.0) == float("inf")
    # Three requests sent together at t=0 to a one-at-a-time server finish at 2, 4, 6 s; then idle until 100.
    for _ in range(3):
        sr.started(0.0, 0 if _ == 0 else _)
    for t in (2.0, 4.0, 6.0):
        sr.finished(t)
    assert sr.seconds_per_request(6.0) == pytest.approx(2.0)
    sr.started(100.0, 0)  # idle time is not busy time; the old samples left the window
    sr.finished(101.0)
    assert sr.seconds_per_request(101.0) is None  # one sample in the window
    sr.started(101.0, 0)
    sr.finished(102.0)
    sr.started(102.0, 0)
    sr.finished(103.0)
    assert sr.seconds_per_request(103.0) == pytest.approx(1.0)
    # 8 s SLO at 2 s a request: the 4th request in flight would finish at 8 s, so 3 may be in flight.
    assert slo_capacity(2.0, 8.0) == pytest.approx(3.0)
    assert slo_capacity(2.0, 8.0, load=0.5) == pytest.approx(1.0)
    assert slo_capacity(20.0, 8.0) == 0.0


def test_controller_publishes_capacity_per_router() -> None:
    ctrl = ThresholdController(CFG.model_copy(update={"overflow_load": 1.0}))
    loads = {"a": ExpertLoad(expert="a", in_flight=0, replicas=3, capacity_per_replica=4.0, slo=SLOConfig(),
                             timestamp=0.0)}
    assert ctrl.step(loads, now=0.0, routers=2).capacity == {"a": pytest.approx(6.0)}
    off = ThresholdController(CFG.model_copy(update={"overflow_load": None}))
    assert off.step(loads, now=0.0).capacity == {}
