"""One error hierarchy for coe, each error mapped to an HTTP status and an OpenAI error body.

Errors cross Ray actor boundaries (expert replica -> ingress), so every class keeps a
constructor whose arguments are stored on the instance and stays picklable.
"""

from __future__ import annotations

from typing import Any


class CoeError(Exception):
    """Base error: carries the HTTP status and the OpenAI `error.type` / `error.code`."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers: dict[str, str] = dict(headers or {})  # e.g. Retry-After, x-ratelimit-*

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))

    def to_body(self, request_id: str | None = None) -> dict[str, Any]:
        """The OpenAI error shape: {"error": {message, type, param, code[, request_id]}}."""
        err: dict[str, Any] = {"message": self.message, "type": self.error_type, "param": self.param,
                               "code": self.code}
        if request_id:
            err["request_id"] = request_id
        return {"error": err}


def _rebuild(cls: type[CoeError], message: str, param: str | None, code: str | None,
             headers: dict[str, str] | None = None) -> CoeError:
    return cls(message, param=param, code=code, headers=headers)


class ConfigError(CoeError):
    """The coe config is invalid (unknown key, wrong type, inconsistent experts)."""

    status_code = 500
    error_type = "config_error"


class InvalidRequestError(CoeError):
    """The request is malformed or asks for something the expert cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus max_tokens does not fit in the expert's context window."""

    default_code = "context_length_exceeded"


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than server.limits.max_body_bytes."""

    status_code = 413
    default_code = "request_too_large"


class NotFoundError(CoeError):
    """No such route or resource."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The `model` field names neither `coe-auto` nor a configured expert."""

    default_code = "model_not_found"


class AuthenticationError(CoeError):
    """No API key, or one that is unknown, revoked or expired."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(CoeError):
    """A valid key that may not do this (an expert outside its team's list, an admin endpoint)."""

    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class OverloadedError(CoeError):
    """Admission control refused the request; the client should retry later."""

    status_code = 429
    error_type = "overloaded_error"


class RateLimitError(CoeError):
    """The key is over its requests or tokens per minute (headers carry Retry-After and what remains)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceededError(CoeError):
    """The team has spent its budget for the period."""

    status_code = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class StoreUnavailableError(CoeError):
    """The key and limit store (Redis) cannot be reached and the config says to fail closed."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "auth_store_unavailable"


class ExpertUnavailableError(CoeError):
    """No healthy replica of the chosen expert could answer."""

    status_code = 503
    error_type = "service_unavailable"


class GatewayTimeoutError(CoeError):
    """The expert did not answer within its timeout (experts[].timeouts) and no retry was left."""

    status_code = 504
    error_type = "timeout"
    default_code = "expert_timeout"


class GenerationError(CoeError):
    """The engine failed while generating."""

    status_code = 500
    error_type = "generation_error"


class ModelLoadError(CoeError):
    """A model source could not be resolved or loaded."""

    status_code = 500
    error_type = "model_load_error"


class RouterArtifactError(CoeError):
    """A saved router artifact is missing, corrupt, or does not match the serving config."""

    status_code = 500
    error_type = "router_error"
