"""schemathesis against coe's own OpenAPI document: no 5xx, no replica restarts, /ready green at the end.

A small app, `coe-fuzz` at /fuzz, with its OpenAPI document on (server.docs) and one real SmolLM2 expert whose
answers are capped at a few tokens, so that generated requests that are valid get generated answers quickly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.serve import api

pytestmark = pytest.mark.serve

PREFIX = "/fuzz"
EXAMPLES = 25  # per operation and generation mode


@pytest.fixture(scope="module")
def fuzz_url(coe_url: str) -> Iterator[str]:
    cfg = api.small_config("coe-fuzz")
    cfg.expert("general").sampling.max_tokens, cfg.expert("general").sampling.max_tokens_limit = 2, 4
    cfg.server.docs = True
    with api.small_app(coe_url, cfg, PREFIX) as url:
        yield url


def _replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "coe-fuzz#" in a["name"]}


def test_fuzzing_makes_no_5xx_no_restart_and_leaves_ready(fuzz_url: str) -> None:
    """Every operation, positive and negative examples (schemathesis' strategies driven by hypothesis)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    doc = api.get(f"{fuzz_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    base = fuzz_url  # the document's paths are the app's own (/v1/...); its servers entry is the route prefix
    before = _replicas()
    seen: Counter = Counter()
    server_errors: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {"POST /v1/chat/completions", "POST /v1/route"}
    for op in ops:
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:  # noqa: ANN001
                r = case.call(base_url=base, headers=api.auth(), timeout=60)
                assert r.request.url.startswith(base + "/"), r.request.url  # this app, not the session's
                seen[(f"{op.method.upper()} {op.path}", r.status_code)] += 1
                if r.status_code >= 500 or (r.status_code >= 400 and not _error_shape(r)):
                    server_errors.append(f"{op.method.upper()} {op.path} -> {r.status_code}: {r.text[:200]}")

            try:
                run()
            except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
                assert mode is schemathesis.GenerationMode.NEGATIVE, op.path
    print(f"\nfuzzing: {sum(seen.values())} requests; statuses {dict(sorted(seen.items()))}")
    assert not server_errors, server_errors[:5]
    assert sum(seen.values()) >= 100
    assert _replicas() == before  # no replica died or was replaced
    assert api.get(f"{fuzz_url}/ready").status_code == 200


def _error_shape(r) -> bool:  # noqa: ANN001
    try:
        return {"message", "type"} <= set(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return False
