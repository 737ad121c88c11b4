"""`coe profile signals`: the log-probability signals of every profiled answer (teacher forcing), which the
cascade strategy calibrates its acceptance thresholds on.

Each answer of `DIR/answers/<expert>.jsonl` is scored by its own expert's model in one forward pass over
prompt + answer: mean and minimum token log-probability (temperature 1), written to `DIR/signals/<expert>.jsonl`
({"key", "logprob_mean", "logprob_min", "tokens"}). Resumable: answers already there are skipped. The answer is
re-tokenized from its text, so a token split may differ from the one generated; the serving path measures the
generated tokens themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coe.config import CoeConfig
from coe.engines import EnginePrompt
from coe.errors import InvalidRequestError
from router_models.profile import AnswerLog, load_profile, read_jsonl


def signals_path(out: Path, expert: str) -> Path:
    return out / "signals" / f"{expert}.jsonl"


def load_signals(out: Path, expert: str) -> dict[str, dict[str, Any]]:
    """key -> signal row for one expert (empty when not computed)."""
    path = signals_path(out, expert)
    return {r["key"]: r for r in read_jsonl(path)} if path.exists() else {}


def compute_signals(out: Path, config: CoeConfig, *, threads: int | None = None, progress: bool = True
                    ) -> dict[str, int]:
    """Score every answer that has no signal yet (`threads`: llama.cpp threads, default the expert's own);
    returns how many were added per expert."""
    import asyncio

    from tqdm import tqdm

    from coe.engines.llama_cpp import LlamaCppEngine
    from coe.protocol import ChatCompletionRequest

    meta, items, answers = load_profile(out)
    questions = {(it["suite"], it["id"]): it["question"] for it in items}
    added: dict[str, int] = {}
    for name in meta["experts"]:
        expert = config.expert(name)
        if expert.engine != "llama_cpp":
            raise InvalidRequestError(f"expert '{name}': signals are computed with llama.cpp experts only; for a "
                                      "vLLM expert, profile with --endpoint against a coe that returns logprobs")
        have = load_signals(out, name)
        todo = [r for r in answers[name].values() if r["key"] not in have and not r.get("error")]
        added[name] = len(todo)
        if not todo:
            continue
        if threads:
            assert expert.llama_cpp is not None
            expert = expert.model_copy(update={"llama_cpp": expert.llama_cpp.model_copy(
                update={"n_threads": threads, "n_threads_batch": threads})})
        engine = LlamaCppEngine(expert, logits_all=True)
        asyncio.run(engine.start())
        signals_path(out, name).parent.mkdir(parents=True, exist_ok=True)
        log = AnswerLog(signals_path(out, name))
        try:
            for r in tqdm(todo, desc=f"signals {name:<12}", disable=not progress, dynamic_ncols=True):
                req = ChatCompletionRequest.model_validate(
                    {"model": name, "messages": [{"role": "user", "content": questions[(r["suite"], r["id"])]}]})
                prompt: EnginePrompt = req.to_engine_prompt(expert)
                mean, low, n = engine.score_continuation(prompt, r["answer"])
                log.add({"key": r["key"], "logprob_mean": round(mean, 5), "logprob_min": round(low, 5),
                         "tokens": n})
        finally:
            log.close()
            asyncio.run(engine.shutdown())
    return added


def signal_rows(out: Path, split: str | None = "train") -> dict[str, list[dict[str, Any]]]:
    """Per expert: {"suite", "id", "score", "logprob_mean", "logprob_min"} for the scored answers of `split` that
    have signals (None: every split)."""
    meta, items, answers = load_profile(out)
    splits = {(it["suite"], it["id"]): it["split"] for it in items}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in meta["experts"]:
        sig = load_signals(out, name)
        rows[name] = [
            {"suite": k[0], "id": k[1], "score": float(a["score"]), **{f: sig[a["key"]][f] for f in
                                                                       ("logprob_mean", "logprob_min")}}
            for k, a in answers[name].items()
            if a["score"] is not None and a["key"] in sig and (split is None or splits.get(k) == split)
        ]
    return rows

