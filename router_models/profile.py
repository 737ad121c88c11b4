"""`coe profile`: run every expert of a config on suites, score the answers, write the router's training data.

Layout of the output folder (everything a rerun and `coe profile report` need):
- `profile.json`: config, experts (price, model fingerprint), suites (source, license), split seed and fraction;
- `items.jsonl`: every item asked, with its suite, question and split (train/test, fixed by the seed);
- `answers/<expert>.jsonl`: one line per answered item: answer, tokens, cost, latency; appended and synced as
  each answer arrives, so an interrupted run loses nothing and a rerun skips what is there (the cache key is
  expert, item, sampling and model fingerprint);
- `scores/<expert>.jsonl`: the score of each answer under the current scorers (`coe.scoring.SCORER_VERSION`);
  kept apart from the answers, so a changed scoring rule rescores without asking the experts again;
- `matrix/{train,test}/<suite>.json`: `[{"question", "scores": {expert: score}}]`, the format
  `coe router train --data` reads (the suite is the group); `matrix.jsonl` has every row with its split.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.config import CoeConfig, ExpertConfig
from coe.errors import CoeError, ContextLengthExceededError, InvalidRequestError
from coe.scoring import SCORER_VERSION, Scorers
from router_models.suites import Item, Suite, load_suite

PROFILE_VERSION = 1


@dataclass
class ProfileOptions:
    """What `coe profile` was asked to do."""

    config: CoeConfig
    config_ref: str
    suites: list[str]
    out: Path
    endpoint: str | None = None
    api_key: str | None = None
    limit: int | None = None
    concurrency: int = 1
    split: float = 0.8
    seed: int = 0
    experts: list[str] | None = None
    progress: bool = True


@dataclass
class RunStats:
    asked: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per suite: generation time of the answers it asked
    rescored: int = 0


def _file_identity(path: Path) -> str:
    """Size plus a hash of the first and last MiB: cheap for multi-GB weights, changes with the file."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".gguf")):
            h.update(f.name.encode())
            h.update(_file_identity(f).encode())
        return h.hexdigest()[:16]
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def expert_fingerprint(expert: ExpertConfig, remote: dict[str, Any] | None = None) -> str:
    """Changes when the model, its engine, its prompt or its default sampling changes. With `remote` (a running
    coe's /v1/models entry, --endpoint) what that service says about the expert counts too; the weights it
    serves are not visible from outside, only the local config's view of them."""
    from coe.models import resolve_local_model

    src = expert.source
    try:
        model_id = _file_identity(resolve_local_model(src)) if (src.path or src.package) else src.describe()
    except CoeError:
        model_id = src.describe()
    raw = json.dumps({"engine": expert.engine, "model": model_id, "source": src.model_dump(),
                      "prompt": expert.prompt.model_dump(), "sampling": expert.sampling.model_dump(),
                      "options": (expert.llama_cpp or expert.vllm).model_dump() if (expert.llama_cpp or expert.vllm)
                      else None, "remote": remote}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _unit(seed: int, item: Item) -> float:
    digest = hashlib.sha256(f"{seed}:{item.suite}:{item.id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(item: Item, seed: int, fraction: float) -> str:
    """train or test, fixed per item by the seed (adding items never moves an old one)."""
    return "train" if _unit(seed + 1, item) < fraction else "test"


def pick(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """The first `limit` items in a seeded order (a larger limit keeps the smaller one's items)."""
    ordered = sorted(items, key=lambda it: _unit(seed, it))
    return ordered if limit is None else ordered[:limit]


def item_seed(item: Item) -> int:
    return int.from_bytes(hashlib.sha256(f"{item.suite}:{item.id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def cache_key(expert: str, fingerprint: str, item: Item, sampling: dict[str, Any]) -> str:
    raw = json.dumps([expert, fingerprint, item.suite, item.id, item.content_hash(), sampling], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a killed run) is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class AnswerLog:
    """An append-only JSONL file (answers/ or scores/): each row flushed and synced as it is added."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_jsonl(path)
        self.keys = {r["key"] for r in self.rows}
        self._f = path.open("a")
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            self._f.write("\n")  # after a torn line

    def add(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows.append(row)
        self.keys.add(row["key"])

    def close(self) -> None:
        self._f.close()


def current_scores(path: Path) -> dict[str, dict[str, Any]]:
    """key -> the latest score row made with the current scorers."""
    return {r["key"]: r for r in read_jsonl(path) if r.get("scorer_version") == SCORER_VERSION}


Answerer = Callable[[Item, dict[str, Any]], Awaitable[dict[str, Any]]]


class InProcessExperts:
    """The service's own engine code, in this process: one engine per expert, loaded on first use."""

    def __init__(self, config: CoeConfig) -> None:
        self.config = config
        self._engines: dict[str, Any] = {}

    async def answerer(self, expert: ExpertConfig) -> Answerer:
        from coe.engines import make_engine
        from coe.protocol import ChatCompletionRequest

        engine = make_engine(expert)
        await engine.start()
        self._engines[expert.name] = engine

        async def answer(item: Item, body: dict[str, Any]) -> dict[str, Any]:
            req = ChatCompletionRequest.model_validate(body)
            t0 = time.perf_counter()
            try:
                res = await engine.generate(req.to_engine_prompt(expert), req.to_sampling_params(expert))
            except ContextLengthExceededError as err:
                raise ContextTooLong(err.message) from None
            return {"answer": res.text, "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                    "finish_reason": res.finish_reason, "latency_s": time.perf_counter() - t0}

        return answer

    async def close(self) -> None:
        for e in self._engines.values():
            await e.shutdown()


class EndpointExperts:
    """A running coe: each expert pinned by its model name (retries 429/503 with backoff)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(timeout=600, headers=headers)

    @staticmethod
    def models(url: str, api_key: str | None) -> dict[str, dict[str, Any]]:
        """The running coe's /v1/models entries by id (part of each expert's fingerprint in endpoint mode)."""
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            r = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
        except httpx.HTTPError as err:
            raise InvalidRequestError(f"--endpoint {url} is not reachable: {err}") from None
        if r.status_code != 200:
            raise InvalidRequestError(f"--endpoint {url}: GET /v1/models answered HTTP {r.status_code}: "
                                      f"{r.text[:200]}")
        # `created` is the time of the call: not part of what identifies the model.
        return {m["id"]: {k: v for k, v in m.items() if k != "created"} for m in r.json().get("data", [])}

    async def answerer(self, expert: ExpertConfig) -> Answerer:
        import httpx

        async def answer(item: Item, body: dict[str, Any]) -> dict[str, Any]:
            for attempt in range(6):
                t0 = time.perf_counter()
                try:
                    r = await self.client.post(f"{self.url}/v1/chat/completions", json=body)
                except httpx.TransportError as err:
                    if attempt == 5:
                        raise CoeError(f"{self.url} unreachable: {err}") from None
                    await asyncio.sleep(2**attempt)
                    continue
                if r.status_code in (429, 502, 503, 504) and attempt < 5:
                    await asyncio.sleep(float(r.headers.get("retry-after") or 2**attempt))
                    continue
                if r.status_code == 400 and "context_length" in r.text:
                    raise ContextTooLong(r.json()["error"]["message"])
                if r.status_code != 200:
                    raise CoeError(f"{expert.name}: HTTP {r.status_code}: {r.text[:300]}")
                data = r.json()
                choice = data["choices"][0]
                return {"answer": choice["message"]["content"] or "", "prompt_tokens": data["usage"]["prompt_tokens"],
                        "completion_tokens": data["usage"]["completion_tokens"],
                        "finish_reason": choice["finish_reason"], "latency_s": time.perf_counter() - t0}
            raise CoeError(f"{expert.name}: gave up after retries")

        return answer

    async def close(self) -> None:
        await self.client.aclose()


class ContextTooLong(CoeError):
    """The item does not fit the expert's context: a real failure of that expert (scored 0, cached)."""


def _meta_path(out: Path) -> Path:
    return out / "profile.json"


def prepare(opts: ProfileOptions) -> tuple[list[ExpertConfig], list[Suite], dict[str, Any]]:
    """Experts, suites (limited) and the profile's metadata; refuses to change a recorded split."""
    experts = opts.config.experts
    if opts.experts:
        unknown = set(opts.experts) - {e.name for e in experts}
        if unknown:
            raise InvalidRequestError(f"--experts: {sorted(unknown)} not in the config")
        experts = [e for e in experts if e.name in opts.experts]
    if not 0.0 < opts.split < 1.0:
        raise InvalidRequestError("--split must be between 0 and 1 (the train share)")
    if opts.limit is not None and opts.limit < 1:
        raise InvalidRequestError("--limit must be at least 1")
    if opts.concurrency < 1:
        raise InvalidRequestError("--concurrency must be at least 1")
    suites = []
    for spec in opts.suites:
        s = load_suite(spec)
        s.items = pick(s.items, opts.limit, opts.seed)
        suites.append(s)
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"suite names must be distinct: {names}")
    scorers = Scorers()
    for name in sorted({it.scorer for s in suites for it in s.items}):
        scorers.get(name)  # a typo or an unimportable custom scorer fails here, before any model is loaded
    remote: dict[str, dict[str, Any]] = {}
    if opts.endpoint:
        remote = EndpointExperts.models(opts.endpoint, opts.api_key)
        missing = [e.name for e in experts if e.name not in remote]
        if missing:
            raise InvalidRequestError(f"--endpoint {opts.endpoint} does not serve {missing} (or the key may not "
                                      "use them)")
    old = json.loads(_meta_path(opts.out).read_text()) if _meta_path(opts.out).exists() else None
    if old and (old["split"]["seed"], old["split"]["train_fraction"]) != (opts.seed, opts.split):
        raise InvalidRequestError(
            f"{opts.out} was split with seed {old['split']['seed']} and train fraction "
            f"{old['split']['train_fraction']}; rerun with those (--seed, --split) or use a new --out")
    meta = {
        "version": PROFILE_VERSION,
        "config": opts.config_ref,
        "mode": f"endpoint {opts.endpoint}" if opts.endpoint else "in-process engines",
        "split": {"seed": opts.seed, "train_fraction": opts.split},
        "router_fallback": getattr(opts.config.router, "fallback_expert", None),
        "experts": {**(old or {}).get("experts", {}), **{
            e.name: {"price_per_1k_tokens": e.price_per_1k_tokens, "fingerprint": expert_fingerprint(e, remote.get(e.name)),
                     "engine": e.engine, "model": e.source.describe(), "sampling": e.sampling.model_dump()}
            for e in experts}},
        "suites": {**(old or {}).get("suites", {}),
                   **{s.name: {"source": s.source, "license": s.license, "items": len(s.items)} for s in suites}},
    }
    return experts, suites, meta


def _write_items(out: Path, suites: list[Suite], seed: int, fraction: float) -> None:
    path = out / "items.jsonl"
    rows = {(r["suite"], r["id"]): r for r in read_jsonl(path)}
    for s in suites:
        for it in s.items:
            rows[(it.suite, it.id)] = {"suite": it.suite, "id": it.id, "question": it.question,
                                       "split": split_of(it, seed, fraction), "hash": it.content_hash()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()))
    tmp.replace(path)


async def _score(item: Item, answer_row: dict[str, Any], scorers: Scorers, log: AnswerLog, lock: asyncio.Lock,
                 stats: RunStats) -> None:
    """Score one answer and append the score row; a scorer's failure is recorded (the item stays unscored and is
    scored again on the next run), never fatal to the run."""
    try:
        score: float | None = await asyncio.to_thread(scorers.score, item.scorer, answer_row["answer"],
                                                      item.reference, item.meta)
        error = None
    except Exception as err:  # noqa: BLE001 - a custom scorer may raise anything
        score, error = None, f"{type(err).__name__}: {err}"
        stats.errors.setdefault(answer_row["expert"], []).append(f"{item.suite}/{item.id}: scoring: {error}")
    async with lock:
        log.add({"key": answer_row["key"], "suite": item.suite, "id": item.id, "score": score,
                 "scorer": item.scorer, "scorer_version": SCORER_VERSION, "error": error})


async def _profile_expert(expert: ExpertConfig, fingerprint: str, items: list[Item], answerer: Answerer,
                          answers: AnswerLog, scores: AnswerLog, scorers: Scorers, opts: ProfileOptions,
                          stats: RunStats, position: int, lock: asyncio.Lock) -> None:
    from tqdm import tqdm

    todo, bodies = [], {}
    for it in items:
        body = {"model": expert.name, "messages": list(it.messages), "seed": item_seed(it)}
        sampling = {"seed": body["seed"], **expert.sampling.model_dump()}
        key = cache_key(expert.name, fingerprint, it, sampling)
        bodies[(it.suite, it.id)] = (body, key, sampling)
        if key not in answers.keys:
            todo.append(it)
    stats.cached[expert.name] = len(items) - len(todo)
    stats.asked[expert.name] = 0
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{expert.name:<12}", position=position,
               leave=True, disable=not opts.progress, dynamic_ncols=True)
    sem = asyncio.Semaphore(opts.concurrency)
    price = expert.price_per_1k_tokens

    async def one(it: Item) -> None:
        body, key, sampling = bodies[(it.suite, it.id)]
        async with sem:
            try:
                res = await answerer(it, body)
                error = None
            except ContextTooLong as err:  # the expert cannot take this item: its answer is empty (scored 0)
                res = {"answer": "", "prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "error",
                       "latency_s": 0.0}
                error = err.message
            except Exception as err:  # noqa: BLE001 - recorded and retried on the next run, not cached
                stats.errors.setdefault(expert.name, []).append(f"{it.suite}/{it.id}: {type(err).__name__}: {err}")
                bar.update(1)
                return
        tokens = res["prompt_tokens"] + res["completion_tokens"]
        row = {"key": key, "expert": expert.name, "suite": it.suite, "id": it.id, **res,
               "cost_usd": tokens / 1000 * price, "sampling": sampling, "fingerprint": fingerprint, "error": error}
        async with lock:  # the answer is on disk before it is scored: an interrupt loses at most its score
            answers.add(row)
            stats.asked[expert.name] += 1
            stats.seconds[it.suite] = stats.seconds.get(it.suite, 0.0) + res["latency_s"]
        await _score(it, row, scorers, scores, lock, stats)
        bar.update(1)

    try:
        await asyncio.gather(*(one(it) for it in todo))
    finally:
        bar.close()


async def rescore(out: Path, experts: list[str], items: list[Item], scorers: Scorers, stats: RunStats,
                  progress: bool) -> int:
    """Score the answers that have no score under the current scorers (an interrupted run, a new scoring rule)."""
    from tqdm import tqdm

    by_id = {(it.suite, it.id): it for it in items}
    jobs: list[tuple[Item, dict[str, Any], AnswerLog]] = []
    logs: list[AnswerLog] = []
    for name in experts:
        scored = current_scores(out / "scores" / f"{name}.jsonl")
        pending = [(by_id[(r["suite"], r["id"])], r) for r in read_jsonl(out / "answers" / f"{name}.jsonl")
                   if r["key"] not in scored and (r["suite"], r["id"]) in by_id]
        if pending:
            log = AnswerLog(out / "scores" / f"{name}.jsonl")
            logs.append(log)
            jobs += [(it, r, log) for it, r in {r["key"]: (it, r) for it, r in pending}.values()]
    if not jobs:
        return 0
    lock = asyncio.Lock()
    bar = tqdm(total=len(jobs), desc="scoring", disable=not progress, dynamic_ncols=True)
    sem = asyncio.Semaphore(4)

    async def one(it: Item, row: dict[str, Any], log: AnswerLog) -> None:
        async with sem:
            await _score(it, row, scorers, log, lock, stats)
        bar.update(1)

    try:
        await asyncio.gather(*(one(*j) for j in jobs))
    finally:
        bar.close()
        for log in logs:
            log.close()
    return len(jobs)


async def run_profile(opts: ProfileOptions) -> RunStats:
    """Answer and score every (expert, item) not already in the output folder, then rewrite the matrix."""
    experts, suites, meta = prepare(opts)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    _meta_path(out).write_text(json.dumps(meta, indent=2))
    _write_items(out, suites, opts.seed, opts.split)
    items = [it for s in suites for it in s.items]
    scorers = Scorers()
    if any(it.scorer == "code_tests" for it in items):
        scorers.sandbox.run("pass")  # a machine that cannot sandbox fails here, before any model is loaded
    stats = RunStats()
    # Answers of an earlier, interrupted run (or scored under older rules) are scored first.
    stats.rescored = await rescore(out, [e.name for e in experts], items, scorers, stats, opts.progress)
    backend: InProcessExperts | EndpointExperts = (EndpointExperts(opts.endpoint, opts.api_key) if opts.endpoint
                                                   else InProcessExperts(opts.config))
    logs = {e.name: (AnswerLog(out / "answers" / f"{e.name}.jsonl"), AnswerLog(out / "scores" / f"{e.name}.jsonl"))
            for e in experts}
    lock = asyncio.Lock()
    try:
        jobs = []
        for i, e in enumerate(experts):
            answerer = await backend.answerer(e)
            jobs.append(_profile_expert(e, meta["experts"][e.name]["fingerprint"], items, answerer, *logs[e.name],
                                        scorers, opts, stats, i, lock))
        await asyncio.gather(*jobs)
    finally:
        for a, b in logs.values():
            a.close()
            b.close()
        await backend.close()
    write_matrix(out)
    return stats


def load_profile(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[tuple[str, str], dict[str, Any]]]]:
    """(metadata, items, answers per expert keyed by (suite, id), each with its current score or None); the
    latest answer for an item wins."""
    if not _meta_path(out).exists():
        raise InvalidRequestError(f"{out} is not a profile folder (no profile.json): run coe profile first")
    meta = json.loads(_meta_path(out).read_text())
    items = read_jsonl(out / "items.jsonl")
    answers: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for name, info in meta["experts"].items():
        scores = current_scores(out / "scores" / f"{name}.jsonl")
        rows = read_jsonl(out / "answers" / f"{name}.jsonl")
        answers[name] = {}
        for r in rows:
            if r.get("fingerprint") != info["fingerprint"]:
                continue
            sc = scores.get(r["key"])
            answers[name][(r["suite"], r["id"])] = {**r, "score": sc["score"] if sc else None}
    return meta, items, answers


def matrix_rows(out: Path, loaded: Any = None) -> list[dict[str, Any]]:
    """Items every expert answered and that are scored: {"id", "group", "split", "question", "scores"}.
    `loaded`: what load_profile(out) returned, when the caller has it (the files are read once)."""
    meta, items, answers = loaded or load_profile(out)
    experts = list(meta["experts"])
    rows = []
    for it in items:
        k = (it["suite"], it["id"])
        if all(k in answers[e] and answers[e][k]["score"] is not None for e in experts):
            rows.append({"id": it["id"], "group": it["suite"], "split": it["split"], "question": it["question"],
                         "scores": {e: answers[e][k]["score"] for e in experts}})
    return rows


def write_matrix(out: Path) -> Path:
    rows = matrix_rows(out)
    (out / "matrix.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for split in ("train", "test"):
        d = out / "matrix" / split
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.json"):
            old.unlink()
        for group in sorted({r["group"] for r in rows}):
            part = [{"question": r["question"], "scores": r["scores"]} for r in rows
                    if r["group"] == group and r["split"] == split]
            if part:
                (d / f"{group}.json").write_text(json.dumps(part, ensure_ascii=False, indent=1))
    return out / "matrix"


def print_stats(stats: RunStats, out: Path, wall_s: float) -> None:
    total_asked = sum(stats.asked.values())
    print(f"profile written to {out} in {wall_s:.0f} s: {total_asked} answers asked, "
          f"{sum(stats.cached.values())} already there" + (f", {stats.rescored} scored again" if stats.rescored
                                                           else ""))
    for name in stats.asked:
        print(f"  {name:<14} asked {stats.asked[name]:>5}  cached {stats.cached.get(name, 0):>5}  "
              f"errors {len(stats.errors.get(name, []))}")
    for suite, sec in sorted(stats.seconds.items()):
        print(f"  suite {suite:<12} {sec:8.0f} s of generation (summed over experts)")
    for name, errs in stats.errors.items():
        for e in errs[:5]:
            print(f"  error {name}: {e}", file=sys.stderr)
        if len(errs) > 5:
            print(f"  ... {len(errs) - 5} more errors for {name} (rerun to retry them)", file=sys.stderr)
