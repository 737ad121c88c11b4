"""The app builder: one deployment per expert bound into the ingress.

Usable by `serve run deployments.app:build_app config=cpu-default`, by a Serve config file
(`import_path: deployments.app:build_app`, `args: {config: ...}`) and by KubeRay's serveConfigV2.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from coe.config import CoeConfig, RuntimeSettings, load_config, parse_config
from coe.errors import ConfigError
from deployments.controller import CoeController
from deployments.expert import ExpertServer, expert_deployment_options
from deployments.ingress import CoeIngress


class AppArgs(BaseModel):
    """Arguments of :func:`build_app`. Give a config path/name, or the config inline."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(
        None, description="Path of a coe YAML config, or a packaged name (cpu-default, gpu-experts)."
    )
    config_inline: dict[str, Any] | None = Field(None, description="The config itself (as serveConfigV2 carries it).")

    def load(self) -> CoeConfig:
        if self.config_inline is not None:
            if self.config is not None:
                raise ValueError("give either config or config_inline, not both")
            return parse_config(self.config_inline, "<config_inline>")
        return load_config(self.config or "cpu-default")


def ingress_deployment_options(config: CoeConfig) -> dict[str, Any]:
    """Ray Serve options for the ingress deployment."""
    s = config.server
    opts: dict[str, Any] = {
        "name": "CoeIngress",
        "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
        # Serve hands the replica more than it admits, so past the bound the client gets coe's own 429 with
        # Retry-After (not Serve's proxy 503); graceful shutdown outlasts the longest request.
        "max_ongoing_requests": s.max_ongoing_requests + s.max_queued_requests + 64,
        "graceful_shutdown_timeout_s": s.request_timeout_s + 5,
    }
    auto = s.ingress_autoscaling
    if auto.min_replicas == auto.max_replicas:
        opts["num_replicas"] = auto.min_replicas
    else:
        opts["autoscaling_config"] = auto.to_serve()
    return opts


def controller_deployment_options(config: CoeConfig) -> dict[str, Any]:
    """The controller is a singleton; Serve restarts it if it dies (routing keeps the last t meanwhile)."""
    return {"name": "CoeController", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05},
            "max_ongoing_requests": 1000, "health_check_period_s": 5}


def log_level() -> str:
    """COE_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO); anything else is a ConfigError."""
    from pydantic import ValidationError

    try:
        return RuntimeSettings().log_level
    except ValidationError as err:
        bad = [e for e in err.errors() if e["loc"] and e["loc"][0] == "log_level"]
        if bad:
            raise ConfigError(f"COE_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR: {bad[0]['msg']}") from None
        raise ConfigError(f"bad COE_* environment: {err}") from None


def logging_config(level: str, access_log: bool = True) -> dict[str, Any]:
    """A deployment's Serve logging_config (its replicas' level for coe's and Serve's loggers). The encoding is
    left to RAY_SERVE_LOG_ENCODING (TEXT, or JSON as the k8s manifests set it)."""
    return {"log_level": level, "enable_access_log": access_log}


def build_from_config(config: CoeConfig) -> Application:
    """The Serve application for a validated config. Every deployment logs at COE_LOG_LEVEL; the controller's
    access lines (one per ingress report, internal calls) only at DEBUG."""
    level = log_level()
    log = logging_config(level)
    handles = {
        e.name: serve.deployment(ExpertServer).options(**expert_deployment_options(e), logging_config=log).bind(
            e.model_dump())
        for e in config.experts
    }
    controller = serve.deployment(CoeController).options(
        **controller_deployment_options(config), logging_config=logging_config(level, access_log=level == "DEBUG")
    ).bind(config.model_dump())
    ingress = serve.deployment(CoeIngress).options(**ingress_deployment_options(config), logging_config=log)
    return ingress.bind(config.model_dump(), handles, controller)


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """Ray Serve app builder (the entry point for `serve run` / serve config files)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    return build_from_config(parsed.load())
