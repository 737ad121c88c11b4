"""coe.load: one ingress replica's load tracking and load-aware policy, without Ray."""

from __future__ import annotations

from coe.config import load_config
from coe.control import ThresholdState
from coe.load import IngressLoad
from coe.protocol import CoeOptions
from coe.routing import RoutingDecision

CFG = load_config("cpu-default")
NAMES = [e.name for e in CFG.experts]  # general 0.0002, code 0.0003, translation 0.0001 $/1k


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _load(clock: Clock | None = None) -> IngressLoad:
    return IngressLoad(CFG, NAMES, 0.0, True, clock=clock or Clock())


def _decision(expert: str, best: str, t: float = 0.0, reason: str = "best_predicted_quality") -> RoutingDecision:
    return RoutingDecision(expert=expert, scores={"general": 0.6, "code": 0.7, "translation": 0.2}, confidence=0.9,
                           reason=reason, threshold=t, extra={"best_expert": best, "route_ms": 3.0})


def test_threshold_follows_the_controller_never_below_rest() -> None:
    lo = _load()
    assert lo.current_threshold() == 0.0 and lo.routing_penalties() is None
    lo.state = ThresholdState(t=0.2, version=3, updated_at=1.0, load=1.2, reason="rise", penalties={"code": 0.1})
    assert lo.current_threshold() == 0.2 and lo.routing_penalties() == {"code": 0.1}
    assert lo.spill_threshold(0.0, None, own_t=False) == CFG.controller.t_max
    assert lo.spill_threshold(0.0, CoeOptions(max_quality_threshold=0.0), own_t=False) == 0.0  # premium cap
    assert lo.spill_threshold(0.05, None, own_t=True) == 0.05  # its own t: never spills


def test_restrict_keeps_a_team_within_its_experts() -> None:
    lo = _load()
    d = lo.restrict(_decision("code", "code", t=0.15), frozenset({"general", "translation"}))
    assert d.expert == "general" and d.reason.startswith("team_restricted(code):")
    d = lo.restrict(_decision("code", "code", t=0.5), frozenset({"general", "translation"}))
    assert d.expert == "translation"  # cheaper and within t of the best allowed (0.6)
    same = _decision("code", "code")
    assert lo.restrict(same, None) is same and lo.restrict(same, frozenset({"code"})).expert == "code"


def test_attempt_order_after_a_failure() -> None:
    lo = _load()
    assert lo.attempt_order(_decision("code", "code", t=0.15), "general", None) == ["general"]
    assert lo.attempt_order(_decision("general", "code", t=0.6), "general", None) == ["translation", "code"]


def test_counting_decisions_calls_and_the_report() -> None:
    clock = Clock()
    lo = _load(clock)
    acc = lo.account_decision("r1", _decision("general", "code", t=0.15, reason="cheaper_within_threshold"), "q")
    assert acc.debt > 0 and acc.record["request_id"] == "r1" and "prompt" not in acc.record
    own = _decision("general", "code", t=0.15)
    own.extra["own_threshold"] = True  # a request's own t is not the controller's debt
    assert lo.account_decision("r2", own, "q").debt == 0.0
    t0 = lo.started("code")
    clock.t += 0.5
    assert lo.in_flight["code"] == 1
    lo.finished("code", t0, ttft_ms=100.0)
    rep = lo.take_report()
    assert rep["routed"] == {"code": 2} and rep["in_flight"]["code"] == 0
    assert rep["debt"] == {"general": [acc.debt]} and [d["request_id"] for d in rep["decisions"]] == ["r1", "r2"]
    assert rep["total_p99_ms"]["code"] == 500.0 and rep["ttft_p99_ms"]["code"] == 100.0
    assert lo.take_report()["decisions"] == []  # counters start again


def test_overflow_inputs() -> None:
    lo = _load()
    for _ in range(3):
        lo.started("code")
    ov = lo.overflow([0.3])
    assert ov is not None and list(ov.occupancy) == [0.0, 3.0, 0.0] and len(ov.capacity) == 3


def test_restrict_never_leaves_the_team_s_experts_without_scores() -> None:
    """A degraded router decides with no scores: the team still gets one of its own experts."""
    lo = _load()
    d = RoutingDecision(expert="general", scores={}, confidence=0.0, reason="fallback:router_unavailable")
    assert lo.restrict(d, frozenset({"code"})).expert == "code"
    d = RoutingDecision(expert="general", scores={}, confidence=0.0, reason="fallback:router_unavailable")
    assert lo.restrict(d, frozenset({"code", "translation"})).expert == "translation"  # the cheaper
