"""Exceptions from Serve and experts map to the right OpenAI error and status."""

from __future__ import annotations

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from coe.errors import ContextLengthExceededError
from deployments.ingress import as_coe_error


def test_backpressure_is_429() -> None:
    err = as_coe_error(BackPressureError(num_queued_requests=65, max_queued_requests=64))
    assert err.status_code == 429 and err.error_type == "overloaded_error"


def test_expert_error_wrapped_by_ray_keeps_its_status() -> None:
    cause = ContextLengthExceededError("too long for 2048", param="messages")
    wrapped = RayTaskError("generate", "traceback", cause)
    err = as_coe_error(wrapped)
    assert err.status_code == 400 and err.code == "context_length_exceeded" and "2048" in err.message


def test_unknown_errors_are_scrubbed_500() -> None:
    err = as_coe_error(KeyError("secret internal detail"))
    assert err.status_code == 500
    assert "secret" not in err.message
