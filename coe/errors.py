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

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_body(self) -> dict[str, Any]:
        """The OpenAI error shape: {"error": {message, type, param, code}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[CoeError], message: str, param: str | None, code: str | None) -> CoeError:
    return cls(message, param=param, code=code)


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


class NotFoundError(CoeError):
    """No such route or resource."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The `model` field names neither `coe-auto` nor a configured expert."""

    default_code = "model_not_found"


class OverloadedError(CoeError):
    """Admission control refused the request; the client should retry later."""

    status_code = 429
    error_type = "overloaded_error"


class ExpertUnavailableError(CoeError):
    """No healthy replica of the chosen expert could answer."""

    status_code = 503
    error_type = "service_unavailable"


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
