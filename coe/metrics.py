"""What coe exports to Prometheus (through Ray's metrics agent), and the expert replicas' recorders.

Ray prefixes every application metric with ``ray_`` and suffixes counters with ``_total``; histograms export
``_bucket``/``_sum``/``_count``. Every series carries Ray's ``application``, ``deployment`` and ``replica`` tags.
The Grafana dashboard (k8s/base/grafana/coe-dashboard.json) queries only the names listed in :data:`EXPORTED`
and Ray's own Serve metrics; tests/serve/test_metrics_export.py scrapes a running coe and checks each one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from coe.engines.base import StreamChunk

# Milliseconds. TTFT spans a loaded CPU replica's queue (seconds) and a GPU's tens of ms; ITL a CPU's ~10 ms
# per token and a GPU's few ms.
TTFT_BUCKETS_MS = [5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 30000]
ITL_BUCKETS_MS = [1, 2, 4, 6, 8, 10, 15, 20, 30, 50, 75, 100, 200, 500]
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 30000, 60000, 120000]

# Prometheus names (as exported) -> what they are. The ingress and the controller record the routing series, the
# expert replicas the engine series.
EXPORTED: dict[str, str] = {
    "ray_coe_requests_total": "requests answered, per expert and routed=true|false (ingress)",
    "ray_coe_threshold": "the cost/quality threshold t an ingress replica applies",
    "ray_coe_controller_threshold": "t as the load controller set it",
    "ray_coe_controller_load": "the cluster load signal (1.0: at capacity)",
    "ray_coe_expert_load_ratio": "per-expert load ratio the controller sees",
    "ray_coe_quality_debt_total": "predicted quality given up under load, per expert",
    "ray_coe_fallbacks_total": "fallback decisions by reason",
    "ray_coe_errors_total": "failed requests by error type",
    "ray_coe_retries_total": "expert calls retried after a failure",
    "ray_coe_router_latency_ms_bucket": "routing decision time (batch wait included)",
    "ray_coe_ttft_ms_bucket": "time to first token of streamed requests, as the ingress sees it, per expert",
    "ray_coe_request_latency_ms_bucket": "whole request time in the ingress, per expert and stream=true|false",
    "ray_coe_expert_ttft_ms_bucket": "time to first token in the expert replica (its queue included), per expert",
    "ray_coe_expert_itl_ms_bucket": "inter-token latency in the expert replica (per request mean), per expert",
    "ray_coe_prompt_tokens_total": "prompt tokens processed, per expert",
    "ray_coe_completion_tokens_total": "completion tokens generated, per expert",
    "ray_serve_deployment_replica_healthy": "Ray Serve: 1 per healthy replica (replicas per expert)",
}


def zero(counter: Any, label_sets: list[dict[str, str]]) -> None:
    """Export `counter` at 0 for label sets known at start, so its series exist before the first event (Prometheus'
    advice: rate() and the dashboard see 0, not a missing series). Ray's Counter.inc refuses 0, so this records
    through its recorder; on a Ray without it the series appear at the first event instead."""
    record = getattr(counter, "_record", None)
    if record is None:
        return
    for tags in label_sets:
        record(0.0, tags=tags)


class ExpertMetrics:
    """TTFT, inter-token latency and token counters of one expert's replica (created in the replica)."""

    def __init__(self, expert: str) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.tags = {"expert": expert}
        self.ttft = Histogram("coe_expert_ttft_ms", description="Time to first token in the expert replica, its "
                              "queue included (ms).", boundaries=TTFT_BUCKETS_MS, tag_keys=("expert",))
        self.itl = Histogram("coe_expert_itl_ms", description="Inter-token latency in the expert replica, mean of "
                             "one request (ms).", boundaries=ITL_BUCKETS_MS, tag_keys=("expert",))
        self.prompt_tokens = Counter("coe_prompt_tokens", description="Prompt tokens processed.",
                                     tag_keys=("expert",))
        self.completion_tokens = Counter("coe_completion_tokens", description="Completion tokens generated.",
                                         tag_keys=("expert",))

    async def timed(self, chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
        """Pass an engine's stream through, recording its TTFT, mean ITL and tokens when it finishes."""
        t0 = time.perf_counter()
        first = last = None
        async for chunk in chunks:
            if chunk.text:
                last = time.perf_counter()
                if first is None:
                    first = last
                    self.ttft.observe((first - t0) * 1e3, tags=self.tags)
            if chunk.finish_reason is not None:
                if chunk.prompt_tokens:
                    self.prompt_tokens.inc(chunk.prompt_tokens, tags=self.tags)
                if chunk.completion_tokens:
                    self.completion_tokens.inc(chunk.completion_tokens, tags=self.tags)
                if first is not None and last is not None and chunk.completion_tokens > 1:
                    self.itl.observe((last - first) * 1e3 / (chunk.completion_tokens - 1), tags=self.tags)
            yield chunk


def merge_chunks(chunks: list[StreamChunk]) -> StreamChunk:
    """Deltas that arrived together as one: their text joined, the last one's finish and counts."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return StreamChunk(text="".join(c.text for c in chunks), finish_reason=last.finish_reason,
                       prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens, extra=last.extra)


_END = object()


async def batch_stream(chunks: AsyncIterator[StreamChunk], interval_s: float) -> AsyncIterator[StreamChunk]:
    """At most one message per `interval_s`: the first delta goes at once (time to first token is untouched);
    deltas arriving within an interval of the last message are sent merged when it ends. A delta after a pause
    longer than the interval goes at once too. Closing this generator stops the engine's stream."""
    if interval_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    import asyncio

    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(err)
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            queue.put_nowait(_END)

    task = asyncio.get_running_loop().create_task(pump())
    sent_at = -1e9
    try:
        while True:
            item = await queue.get()
            wait = interval_s - (time.perf_counter() - sent_at)
            if wait > 0 and isinstance(item, StreamChunk) and item.finish_reason is None:
                await asyncio.sleep(wait)
            items = [item]
            while not queue.empty():
                items.append(queue.get_nowait())
            batch: list[StreamChunk] = []
            for it in items:
                if it is _END or isinstance(it, BaseException):
                    if batch:
                        yield merge_chunks(batch)
                    if isinstance(it, BaseException):
                        raise it
                    return
                batch.append(it)
            yield merge_chunks(batch)
            sent_at = time.perf_counter()
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the engine's cancellation
                pass
