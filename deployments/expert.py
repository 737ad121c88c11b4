"""One Ray Serve deployment per expert: owns an engine and answers generate / stream calls."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from coe.config import ExpertConfig
from coe.engines import EnginePrompt, SamplingParams, make_engine
from coe.engines.base import collect
from coe.metrics import ExpertMetrics, batch_stream

AFFINITY_ROUTER = "coe.affinity:ConversationAffinityRouter"

logger = logging.getLogger("ray.serve")


class ExpertServer:
    """An expert replica. Requests arrive already validated and mapped by the ingress."""

    async def __init__(self, expert: dict[str, Any]) -> None:
        self.config = ExpertConfig.model_validate(expert)
        self.engine = make_engine(self.config)
        await self.engine.start()
        self.metrics = ExpertMetrics(self.config.name)
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests)
            self.replica_id = None
        self.batch_s = self.config.stream_batch_ms / 1000

    async def generate(self, prompt: EnginePrompt, params: SamplingParams, affinity: str | None = None
                       ) -> dict[str, Any]:
        """A whole completion: {text, prompt_tokens, completion_tokens, finish_reason, replica}. `affinity` is read by
        the caller's request router (coe.affinity), not here."""
        result = await collect(self.metrics.timed(self.engine.stream(prompt, params)))
        return {
            "replica": self.replica_id,
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
            "logprob_mean": result.logprob_mean,
            "logprob_min": result.logprob_min,
        }

    async def stream(self, prompt: EnginePrompt, params: SamplingParams, affinity: str | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Deltas, those of one `stream_batch_ms` interval merged into one message; the first one names the
        replica, the last one carries finish_reason and the token counts."""
        first = True
        async for chunk in batch_stream(self.metrics.timed(self.engine.stream(prompt, params)), self.batch_s):
            item = {
                "text": chunk.text,
                "finish_reason": chunk.finish_reason,
                "prompt_tokens": chunk.prompt_tokens,
                "completion_tokens": chunk.completion_tokens,
                **chunk.extra,
            }
            if first:
                item["replica"] = self.replica_id
                first = False
            yield item

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy."""
        await self.engine.check_health()

    async def __del__(self) -> None:  # noqa: D105 - Serve calls it at replica shutdown
        await self.engine.shutdown()


def expert_deployment_options(expert: ExpertConfig) -> dict[str, Any]:
    """Ray Serve options for an expert's deployment, from its config."""
    actor: dict[str, Any] = {"num_cpus": expert.resources.num_cpus, "num_gpus": expert.resources.num_gpus}
    if expert.resources.memory_gb:
        actor["memory"] = int(expert.resources.memory_gb * 1024**3)
    auto = expert.autoscaling
    opts: dict[str, Any] = {
        "name": expert.name,
        "ray_actor_options": actor,
        "max_ongoing_requests": expert.max_ongoing_requests,
        "max_queued_requests": expert.max_queued_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # A draining replica finishes what it holds: the ingress gives up on a call after timeouts.total_s (and
        # retries it elsewhere), so waiting longer would only keep a stuck replica from being replaced.
        "graceful_shutdown_timeout_s": expert.timeouts.total_s + 5,
    }
    if auto.min_replicas == auto.max_replicas:
        opts["num_replicas"] = auto.min_replicas
    else:
        opts["autoscaling_config"] = auto.to_serve()
    affinity = expert.replica_affinity if expert.replica_affinity is not None else auto.max_replicas > 1
    if affinity:
        from ray.serve.config import RequestRouterConfig

        opts["request_router_config"] = RequestRouterConfig(request_router_class=AFFINITY_ROUTER)
    return opts
