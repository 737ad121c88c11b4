"""The replica a conversation prefers (coe.affinity): stable, spread, and moved only when its replica leaves."""

from __future__ import annotations

from collections import Counter

from coe.affinity import rendezvous_order


def test_every_caller_picks_the_same_replica_and_conversations_spread() -> None:
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [f"conversation-{i}" for i in range(400)]
    first = {k: rendezvous_order(k, replicas)[0] for k in keys}
    assert first == {k: rendezvous_order(k, list(reversed(replicas)))[0] for k in keys}  # order of the list is moot
    counts = Counter(first.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 60  # ~100 each


def test_a_leaving_replica_moves_only_its_own_conversations() -> None:
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [f"conversation-{i}" for i in range(400)]
    before = {k: rendezvous_order(k, replicas)[0] for k in keys}
    after = {k: rendezvous_order(k, ["r1", "r2", "r4"])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "r3" for k in moved)
    # Each moved conversation goes to its second choice.
    assert all(after[k] == rendezvous_order(k, replicas)[1] for k in moved)
