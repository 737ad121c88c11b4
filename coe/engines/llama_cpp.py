"""CPU engine over llama-cpp-python.

A `llama_cpp.Llama` object is not thread-safe: one replica owns one model and serialises every
generation behind an asyncio lock, running the token loop in a dedicated thread so the replica's
event loop stays responsive (health checks, queued requests, cancellation).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from coe.config import ExpertConfig
from coe.engines.base import (
    EnginePrompt,
    FinishReason,
    GenerationResult,
    LogprobStats,
    SamplingParams,
    StreamChunk,
    check_context,
    collect,
)
from coe.errors import CoeError, GenerationError, ModelLoadError
from coe.models import resolve_local_model

logger = logging.getLogger(__name__)

_DONE = object()


def _stop_holdback(pending: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `pending` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(pending)), hold, -1):
            if pending.endswith(s[:k]):
                hold = k
                break
    return hold


class LlamaCppEngine:
    """llama.cpp engine for GGUF models (chat-template or completion-template prompts)."""

    def __init__(self, expert: ExpertConfig, *, logits_all: bool = False) -> None:
        """`logits_all`: keep every position's logits (only for :meth:`score_continuation`; costs n_ctx x vocab
        floats of memory)."""
        assert expert.llama_cpp is not None
        self._logits_all = logits_all
        self._expert = expert
        self._opts = expert.llama_cpp
        self._llm: Any = None
        self._formatter: Any = None
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{expert.name}")
        self._progress_at: float | None = None  # last token (or start) of the running generation; None: idle
        mb = self._opts.prompt_cache_mb
        self.prompt_cache = PromptCache(mb * 2**20, self._opts.prompt_cache_min_tokens) if mb > 0 else None

    @property
    def context_length(self) -> int:
        return self._opts.n_ctx

    async def start(self) -> None:
        path = resolve_local_model(self._expert.source)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load, str(path))

    def _load(self, path: str) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Both counts explicit: llama-cpp-python's own default for prompt processing is every core of the machine.
        n_threads, n_threads_batch = self._opts.threads(self._expert.resources.num_cpus)
        draft = None
        if self._opts.prompt_lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(max_ngram_size=self._opts.prompt_lookup_ngram,
                                              num_pred_tokens=self._opts.prompt_lookup_tokens)
        try:
            self._llm = Llama(
                model_path=path,
                n_ctx=self._opts.n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,
                n_batch=self._opts.n_batch,
                seed=self._opts.seed,
                draft_model=draft,
                logits_all=self._logits_all,
                verbose=False,
            )
        except (ValueError, OSError, RuntimeError) as err:
            raise ModelLoadError(f"llama.cpp could not load {path}: {err}") from err
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template and self._expert.prompt.template is None:
            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        elif self._expert.prompt.template is None:
            raise ModelLoadError(
                f"expert '{self._expert.name}': {path} has no chat template; set prompt.template"
            )
        logger.info("expert %s loaded %s (n_ctx=%d, threads=%d, batch threads=%d)", self._expert.name, path,
                    self._opts.n_ctx, n_threads, n_threads_batch)

    def tokenize_prompt(self, prompt: EnginePrompt) -> list[int]:
        """Render the prompt (chat template or text) and tokenize it."""
        if prompt.messages is not None:
            if self._formatter is None:
                raise GenerationError("this expert has no chat template")
            rendered = self._formatter(messages=list(prompt.messages))
            return self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=True, special=True)
        assert prompt.text is not None
        return self._llm.tokenize(prompt.text.encode("utf-8"), add_bos=True, special=False)

    def score_continuation(self, prompt: EnginePrompt, text: str) -> tuple[float, float, int]:
        """(mean, minimum, count) of the log-probabilities (temperature 1) of `text`'s tokens after `prompt`, by
        one forward pass (teacher forcing). Blocking; needs an engine made with logits_all=True."""
        import numpy as np

        if not self._logits_all:
            raise RuntimeError("score_continuation needs LlamaCppEngine(..., logits_all=True)")
        llm = self._llm
        head = self.tokenize_prompt(prompt)
        tail = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []
        tokens = (head + tail)[: self.context_length]
        tail = tokens[len(head):]
        if not tail:
            return 0.0, 0.0, 0
        llm.reset()
        llm.eval(tokens)
        rows = np.asarray(llm.scores[len(head) - 1: len(tokens) - 1], dtype=np.float64)
        top = rows.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        lps = rows[np.arange(len(tail)), tail] - lse
        return float(lps.mean()), float(lps.min()), len(tail)

    def grammar(self, json_schema: str) -> Any:
        """A llama.cpp grammar for a JSON schema (400 when the schema cannot be turned into one)."""
        from llama_cpp import LlamaGrammar

        try:
            return LlamaGrammar.from_json_schema(json_schema, verbose=False)
        except Exception as err:  # noqa: BLE001 - the converter raises plain exceptions on bad schemas
            from coe.errors import InvalidRequestError

            raise InvalidRequestError(f"the JSON schema cannot be used as a grammar: {err}") from err

    def _token_logprob(self, tok: int) -> float:
        """Log-probability (temperature 1) of `tok` under the logits it was sampled from: generate() yields a token
        before evaluating it, so the context's last logits row is the one it came from."""
        import numpy as np

        llm = self._llm
        n_vocab = llm.n_vocab()
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        top = float(logits.max())
        return float(logits[tok]) - top - float(np.log(np.exp(logits - top).sum()))

    def _run(
        self,
        tokens: list[int],
        params: SamplingParams,
        emit: Callable[[str], None],
        cancelled: threading.Event,
        stats: LogprobStats | None = None,
    ) -> tuple[int, FinishReason]:
        """The token loop (in the engine thread). Returns (completion tokens, finish reason)."""
        import llama_cpp

        llm = self._llm
        if params.seed is not None:
            llm.set_seed(params.seed)
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = params.stop
        pending = ""
        n = 0
        finish: FinishReason = "length"
        grammar = self.grammar(params.json_schema) if params.json_schema else None
        if self.prompt_cache is not None:
            self.prompt_cache.restore_longer_prefix(llm, tokens)
        for tok in llm.generate(
            tokens, top_k=0, top_p=params.top_p, min_p=0.0, temp=params.temperature, repeat_penalty=1.0,
            grammar=grammar,
        ):
            if cancelled.is_set():
                break
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                finish = "stop"
                break
            if stats is not None:
                stats.add(self._token_logprob(tok))
            n += 1
            self._progress_at = time.monotonic()
            pending += decoder.decode(llm.detokenize([tok]))
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                pending = pending[:hit]
                finish = "stop"
                break
            hold = _stop_holdback(pending, stops)
            if len(pending) > hold:
                emit(pending[: len(pending) - hold])
                pending = pending[len(pending) - hold :]
            if n >= params.max_tokens:
                break
        pending += decoder.decode(b"", final=True)
        if pending:
            emit(pending)
        if self.prompt_cache is not None:
            self.prompt_cache.save(llm)
        return n, finish

    async def stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        # Tokenizing reads only the vocabulary, so it runs outside the lock: a request that does
        # not fit the context fails at once instead of waiting behind the queue.
        tokens = await loop.run_in_executor(None, self.tokenize_prompt, prompt)
        check_context(len(tokens), params.max_tokens, self.context_length)
        if params.json_schema:
            self.grammar(params.json_schema)  # a bad schema is a 400 now, not a failure inside the token loop
        # Prompt-lookup decoding evaluates several draft tokens at once, so the last logits row is not the one a
        # token was sampled from: no log-probabilities then (the final chunk carries none).
        stats = LogprobStats() if params.logprobs and not self._opts.prompt_lookup_tokens else None
        async with self._lock:

            def work() -> tuple[int, FinishReason]:
                self._progress_at = time.monotonic()
                try:
                    if self._opts.debug_stall_s:  # testing only: hangs as a stuck replica would (deaf to cancel)
                        time.sleep(self._opts.debug_stall_s)
                    return self._run(tokens, params, emit, cancelled, stats)
                finally:
                    self._progress_at = None
                    loop.call_soon_threadsafe(queue.put_nowait, _DONE)

            future = loop.run_in_executor(self._executor, work)
            try:
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    yield StreamChunk(text=str(item))
                try:
                    n, finish = await future
                except CoeError:
                    raise
                except Exception as err:  # llama.cpp decode failures surface here
                    logger.exception("generation failed in expert %s", self._expert.name)
                    raise GenerationError(f"generation failed: {type(err).__name__}") from err
                yield StreamChunk(text="", finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n,
                                  extra=stats.extra() if stats is not None else {})
            finally:
                # Client gone or error: stop the token loop and keep the lock until the thread is
                # done, so the next request never touches a model that is still generating.
                cancelled.set()
                await asyncio.wait([future])

    async def generate(self, prompt: EnginePrompt, params: SamplingParams) -> GenerationResult:
        return await collect(self.stream(prompt, params))

    async def check_health(self) -> None:
        """Unhealthy without a model, or when the running generation made no progress for timeouts.ttft_s (a
        stuck replica: Serve replaces it)."""
        if self._llm is None:
            raise GenerationError(f"expert '{self._expert.name}' has no model loaded")
        started = self._progress_at
        limit = self._expert.timeouts.ttft_s
        if started is not None and time.monotonic() - started > limit:
            raise GenerationError(f"expert '{self._expert.name}': no token for more than {limit:g} s (stuck)")

    async def shutdown(self) -> None:
        """Free the model; a generation stuck in its thread (the health check's case) does not block this."""
        try:
            await asyncio.wait_for(self._lock.acquire(), 5.0)
        except TimeoutError:
            logger.warning("expert %s: a generation is stuck; shutting down without waiting for it", self._expert.name)
            self._executor.shutdown(wait=False)
            return
        try:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
        finally:
            self._lock.release()
        self._executor.shutdown(wait=False)


class PromptCache:
    """KV states of recent token sequences (a prompt and the answer generated after it), LRU within a byte budget.

    Before a generation the engine restores the state whose tokens share the longest prefix with the new prompt,
    when that beats what the context already holds; llama-cpp-python's generate() then evaluates only the rest.
    A state is llama.cpp's own (llama_state_get_data: the used KV cells, ~23 KB a token for SmolLM2-135M); the
    Python-side logits are not kept (restoring marks them stale, and generate() decodes at least one token).
    Measured here (scripts/bench_prompt_cache.py, SmolLM2-135M, 1 thread): a 300-token state (6.9 MB) saves in
    6.5 ms and restores in 7.9 ms, against 2.05 s to evaluate those tokens.
    """

    def __init__(self, capacity_bytes: int, min_tokens: int = 64) -> None:
        from collections import OrderedDict

        self.capacity_bytes = capacity_bytes
        self.min_tokens = min_tokens
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.restored_tokens = 0

    def __len__(self) -> int:
        return len(self._states)

    @staticmethod
    def _common(a: Any, b: Any) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    def restore_longer_prefix(self, llm: Any, tokens: list[int]) -> int:
        """Load the saved state sharing the longest prefix with `tokens` if it shares more than the context holds
        now (by at least min_tokens / 4). Returns the tokens it saved from evaluation (0: nothing restored)."""
        import ctypes

        import llama_cpp

        have = self._common(llm._input_ids, tokens)
        best, best_n = None, have
        for key in self._states:
            n = self._common(key, tokens)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n - have < max(1, self.min_tokens // 4):
            return 0
        data = self._states[best]
        self._states.move_to_end(best)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_set_data(llm._ctx.ctx, buf, len(data)) != len(data):
            return 0  # the context keeps what it had; generate() evaluates the whole prompt
        llm.input_ids[: len(best)] = best
        llm.n_tokens = len(best)
        llm._requires_eval = True
        self.hits += 1
        self.restored_tokens += best_n - have
        return best_n - have

    def save(self, llm: Any) -> None:
        """Keep the context's state under its token sequence (if long enough)."""
        import ctypes

        import llama_cpp

        n = int(llm.n_tokens)
        if n < self.min_tokens:
            return
        key = tuple(int(t) for t in llm._input_ids[:n])
        size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        if size > self.capacity_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        used = int(llama_cpp.llama_state_get_data(llm._ctx.ctx, buf, size))
        data = bytes(memoryview(buf)[:used])
        # A saved sequence that this one extends is superseded by it.
        for old in [k for k in self._states if len(k) <= len(key) and key[: len(k)] == k]:
            self._bytes -= len(self._states.pop(old))
        self._states[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity_bytes and self._states:
            _, dropped = self._states.popitem(last=False)
            self._bytes -= len(dropped)
