"""Keeping a conversation on its expert: the stickiness rule, apart from where sessions are stored."""

from __future__ import annotations

from coe.routing import RoutingDecision


def stick(decision: RoutingDecision, prev: str | None, switch_margin: float,
          usable: set[str] | None = None) -> tuple[RoutingDecision, str | None]:
    """Apply stickiness to a routing decision for a turn of a conversation whose last turn `prev` answered.

    Returns (the decision, possibly moved to `prev` with its reason rewritten; the expert to remember for the
    conversation, None: leave it as it is). The rule:

    - no known expert (new conversation, expired, one the caller may not use or the decision has no score for):
      the decision stands and its expert is remembered;
    - a decision the load controller forced (load_shift, overflow) stands for this turn, and the conversation keeps
      its expert (``sticky_broken_this_turn``);
    - the conversation's expert stays while its predicted quality is within t + `switch_margin` of the best
      (``sticky(<prev>)``); beyond it the decision stands (``switch(<prev>-><new>,<gain>)``).
    """
    chosen = decision.expert
    if prev is None or prev not in decision.scores or (usable is not None and prev not in usable):
        return decision, chosen
    if "load_shift" in decision.reason or "overflow" in decision.reason:
        decision.reason = f"{decision.reason};sticky_broken_this_turn({prev})"
        return decision, None
    if prev == chosen:
        decision.reason = f"sticky({prev});{decision.reason}"
        return decision, prev
    gap = max(decision.scores.values()) - decision.scores[prev]
    gain = decision.scores.get(chosen, 0.0) - decision.scores[prev]
    decision.extra["session_gain"] = round(gain, 4)
    if gap > (decision.threshold or 0.0) + switch_margin:
        decision.reason = f"switch({prev}->{chosen},{gain:.3f});{decision.reason}"
        return decision, chosen
    decision.extra["router_choice"] = chosen
    decision.reason = f"sticky({prev});router:{decision.reason}"
    decision.expert = prev
    return decision, prev
