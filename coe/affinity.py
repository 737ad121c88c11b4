"""Replica affinity for conversations: Ray Serve's power-of-two request router, extended.

The ingress calls an expert with `affinity=<conversation key>` (deployments/ingress.py). This router, which Ray Serve
runs in the caller for the expert's deployment (`request_router_config`), ranks that conversation's replica first:
the live replica with the highest rendezvous hash of (key, replica id), so every ingress replica picks the same one
and a replica that leaves moves only its own conversations. Ray Serve probes the ranked replicas in order and takes
the first that accepts the request (below its max_ongoing_requests); when the conversation's replica is full, dead
or restarting, the power-of-two choice among the others answers. Requests without a key route as power-of-two does.

Ray Serve LLM's prefix-cache router (PrefixCacheAffinityRouter) needs vLLM or SGLang installed to import, and matches
prompt text in a shared actor with a blocking call per request; a conversation key needs neither.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

AFFINITY_KWARG = "affinity"


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """Replica ids by their highest-random-weight hash for `key`, best first."""
    return sorted(replica_ids, reverse=True,
                  key=lambda r: hashlib.blake2b(f"{key}\0{r}".encode(), digest_size=8).digest())


class ConversationAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """A conversation's replica first, then power of two choices (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        ranked = await super().choose_replicas(candidate_replicas, pending_request)
        key = (pending_request.kwargs or {}).get(AFFINITY_KWARG) if pending_request is not None else None
        if not key or len(candidate_replicas) < 2:
            return ranked
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        preferred = by_id[rendezvous_order(str(key), list(by_id))[0]]
        return [[preferred], *ranked]
