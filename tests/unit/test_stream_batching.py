"""Stream chunk batching between an expert replica and the ingress (coe.metrics.batch_stream), and COE_LOG_LEVEL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from coe.engines.base import StreamChunk
from coe.errors import ConfigError
from coe.metrics import batch_stream, merge_chunks


async def _engine(gaps_s: list[float], log: list[str] | None = None) -> AsyncIterator[StreamChunk]:
    """One delta per gap, then the finishing chunk (as an engine streams)."""
    try:
        for i, gap in enumerate(gaps_s):
            await asyncio.sleep(gap)
            yield StreamChunk(text=f"t{i} ")
        yield StreamChunk(text="", finish_reason="stop", prompt_tokens=3, completion_tokens=len(gaps_s))
    finally:
        if log is not None:
            log.append("closed")


async def _collect(gen: AsyncIterator[StreamChunk]) -> list[tuple[float, StreamChunk]]:
    t0 = time.perf_counter()
    return [(time.perf_counter() - t0, c) async for c in gen]


def test_off_passes_every_delta() -> None:
    out = asyncio.run(_collect(batch_stream(_engine([0.0] * 5), 0.0)))
    assert len(out) == 6


def test_fast_deltas_are_merged_and_nothing_is_lost() -> None:
    out = asyncio.run(_collect(batch_stream(_engine([0.002] * 40), 0.05)))
    chunks = [c for _, c in out]
    assert "".join(c.text for c in chunks) == "".join(f"t{i} " for i in range(40))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 40
    assert chunks[-1].prompt_tokens == 3
    assert len(chunks) <= 10, len(chunks)  # ~80+ ms of deltas at one message per 50 ms
    assert chunks[0].text == "t0 "  # the first delta is not held back


def test_first_delta_is_not_delayed() -> None:
    out = asyncio.run(_collect(batch_stream(_engine([0.0, 0.001, 0.001]), 0.2)))
    assert out[0][0] < 0.05 and out[0][1].text == "t0 "
    assert out[-1][1].finish_reason == "stop"


def test_a_delta_after_a_long_pause_goes_at_once() -> None:
    out = asyncio.run(_collect(batch_stream(_engine([0.0, 0.15]), 0.05)))
    texts = [c.text for _, c in out]
    assert texts[0] == "t0 " and texts[1].startswith("t1")
    assert out[1][0] < 0.15 + 0.04  # not held for another interval


def test_engine_error_reaches_the_consumer() -> None:
    async def failing() -> AsyncIterator[StreamChunk]:
        yield StreamChunk(text="a")
        raise RuntimeError("decode failed")

    async def run() -> list[str]:
        got = []
        async for c in batch_stream(failing(), 0.01):
            got.append(c.text)
        return got

    with pytest.raises(RuntimeError, match="decode failed"):
        asyncio.run(run())


def test_closing_the_stream_stops_the_engine() -> None:
    log: list[str] = []

    async def run() -> None:
        gen = batch_stream(_engine([0.001] * 1000, log), 0.01)
        async for _ in gen:
            break
        await gen.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    assert log == ["closed"]


def test_merge_keeps_the_last_counts() -> None:
    m = merge_chunks([StreamChunk("a"), StreamChunk("b"), StreamChunk("", "length", 2, 7, {"logprob_mean": -1.0})])
    assert (m.text, m.finish_reason, m.prompt_tokens, m.completion_tokens, m.extra) == (
        "ab", "length", 2, 7, {"logprob_mean": -1.0})


def test_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.app import log_level, logging_config

    monkeypatch.setenv("COE_LOG_LEVEL", "debug")
    assert log_level() == "DEBUG"
    monkeypatch.setenv("COE_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match="COE_LOG_LEVEL"):
        log_level()
    assert logging_config("WARNING", access_log=False) == {"log_level": "WARNING", "enable_access_log": False}
