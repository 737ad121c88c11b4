"""Cascade: ask the cheapest candidate first, judge its answer, escalate to a stronger one when it looks wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from coe.config import CascadeConfig
from coe.routing import RoutingDecision
from coe.sandbox import Sandbox
from coe.scoring import _NUMBER
from coe.strategies import Answer, Backend, StrategyResult
from coe.strategies.calibration import CascadeCalibration
from coe.strategies.verify import Verdict, code_examples, math_applies, verify_code, verify_math


def cascade_candidates(decision: RoutingDecision, prices: dict[str, float], cfg: CascadeConfig,
                       allowed: Callable[[str], bool]) -> list[str]:
    """Cheapest to best: the decision's top expert last, before it the experts no dearer than it whose predicted
    quality is within max_quality_gap of it; at most max_steps (the cheapest ones and the top)."""
    top = decision.expert
    scores = decision.scores
    if top not in scores:  # a fallback decision without scores: nothing cheaper to try
        return [top]
    cands = [e for e, q in scores.items() if e != top and allowed(e) and prices[e] <= prices[top]
             and q >= scores[top] - cfg.max_quality_gap]
    cands.sort(key=lambda e: (prices[e], -scores[e]))
    return cands[: cfg.max_steps - 1] + [top]


def _judge(answer: Answer, calib: CascadeCalibration, target: float, verdict: Verdict | None
           ) -> tuple[bool, str, dict[str, Any]]:
    """(accept, why, signals) for a non-final step."""
    signals: dict[str, Any] = {"logprob_mean": answer.logprob_mean, "logprob_min": answer.logprob_min}
    if verdict is not None:
        signals["verifier"] = verdict.detail
        return verdict.passed, ("verified" if verdict.passed else "verifier_failed"), signals
    cal = calib.experts.get(answer.expert)
    if cal is None or answer.logprob_mean is None or answer.logprob_min is None:
        return False, "no_confidence_signal", signals
    conf = cal.confidence(answer.logprob_mean, answer.logprob_min)
    thr = cal.threshold(target)
    signals.update({"confidence": round(conf, 4), "threshold": None if thr is None else round(thr, 4),
                    "target_accuracy": round(target, 4)})
    if thr is None:
        return False, f"uncalibrated_for_target({target:.2f})", signals
    if conf >= thr:
        return True, f"confident({conf:.3f}>={thr:.3f})", signals
    if answer.finish_reason == "length":
        return False, "cut_at_max_tokens", signals
    return False, f"low_confidence({conf:.3f}<{thr:.3f})", signals


async def run_cascade(backend: Backend, cfg: CascadeConfig, calib: CascadeCalibration, candidates: list[str],
                      messages: list[dict[str, str]], query: str, *, t: float, max_tokens: int | None,
                      temperature: float | None, seed: int | None, sandbox: Callable[[], Sandbox] | None,
                      stream_last: bool = False, stop: list[str] | None = None) -> StrategyResult:
    """Run the cascade over `candidates` (cheapest first). With `stream_last`, the step that will be accepted
    whatever it says (the last candidate) is not called: the result names it for the caller to stream."""
    result = StrategyResult("cascade", final=None)
    target = max(0.0, cfg.target_accuracy - t)
    spent = 0.0
    # The code verifier applies when the prompt gives runnable examples; otherwise a numeric question (two numbers
    # or more) gets the math verifier's second sample, asked beside the first.
    has_examples = "code" in cfg.verifiers and sandbox is not None and bool(code_examples(query)[2])
    numeric = "math" in cfg.verifiers and not has_examples and len(_NUMBER.findall(query)) >= 2
    for i, name in enumerate(candidates):
        last = i == len(candidates) - 1
        over = _over_budget(cfg, backend.elapsed_ms(), spent) if result.answers else None
        if over:
            result.reason = over
            result.steps[-1]["decision"] = f"kept ({over})"
            break
        if last and stream_last:
            result.stream_expert = name
            result.steps.append({"step": i + 1, "expert": name, "decision": "accepted (last candidate, streamed)"})
            result.reason = "last_candidate"
            return result
        kw: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stop": stop}
        if last:
            first = await backend.ask(name, messages, **kw)
            second = None
        else:
            calls = [backend.ask(name, messages, logprobs=True, **kw)]
            if numeric:  # the math verifier's second sample runs beside the first
                calls.append(backend.ask(name, messages, max_tokens=max_tokens, stop=stop,
                                         temperature=max(0.7, temperature or 0.0),
                                         seed=None if seed is None else seed + 1))
            got = await asyncio.gather(*calls)
            first, second = got[0], (got[1] if len(got) > 1 else None)
        result.answers.extend([first] if second is None else [first, second])
        spent += first.cost_usd + (second.cost_usd if second else 0.0)
        step: dict[str, Any] = {"step": i + 1, "expert": name, "start_ms": round(first.start_ms, 1),
                                "ms": round(first.ms, 1), "tokens": first.prompt_tokens + first.completion_tokens,
                                "cost_usd": round(first.cost_usd + (second.cost_usd if second else 0.0), 8)}
        result.steps.append(step)
        result.final = first
        if last:
            step["decision"] = "accepted (last candidate)"
            result.reason = "last_candidate"
            break
        verdict = None
        if has_examples:
            assert sandbox is not None
            verdict = await asyncio.get_running_loop().run_in_executor(None, verify_code, sandbox(), query, first.text)
        if verdict is None and second is not None and math_applies(query, first.text):
            verdict = verify_math(first.text, second.text)
        accept, why, signals = _judge(first, calib, target, verdict)
        step.update(signals)
        step["decision"] = "accepted" if accept else "escalated"
        step["why"] = why
        if accept:
            result.reason = f"accepted_at_step_{i + 1}({why})"
            break
    return result


def _over_budget(cfg: CascadeConfig, elapsed_ms: float, spent: float) -> str | None:
    if cfg.budget_s is not None and elapsed_ms / 1000 >= cfg.budget_s:
        return f"budget_s({cfg.budget_s:g})"
    if cfg.budget_usd is not None and spent >= cfg.budget_usd:
        return f"budget_usd({cfg.budget_usd:g})"
    return None
