"""Render coe's Kubernetes manifests from the one coe config (pure functions, deterministic output).

The tree is a kustomize base plus one overlay per deployment profile::

    base/                      Redis (GCS fault tolerance + coe state) and the Prometheus PodMonitors
    overlays/<profile>/        the RayService (serveConfigV2 = the `build_app` args of `coe serve`),
                               its Ingress, and (profile `cpu-demo`) demo Secrets

The RayService's ``serveConfigV2`` carries the config itself (``args.config_inline``, the validated config
serialised by the model), so no second copy of the expert list exists: edit the coe config, re-render.
Worker groups are sized from the config's per-replica resources and replica bounds; options that are not in
the coe config (images, pod sizes, namespace) come from a strict :class:`ClusterOptions` profile.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from coe import __version__
from coe.config import CoeConfig, StrictModel, load_config
from coe.errors import ConfigError

IMPORT_PATH = "deployments.app:build_app"
INGRESS_DEPLOYMENT = "CoeIngress"
RAY_VERSION = "2.60.0"
KUBERAY_VERSION = "1.7"
GPU_RESOURCE = "nvidia.com/gpu"

ANN_CONFIG = "coe.dev/config"
ANN_CONFIG_SHA = "coe.dev/config-sha256"
ANN_PROFILE = "coe.dev/profile"
ANN_EXTERNAL_SECRETS = "coe.dev/external-secrets"
LABEL_APP = "coe.dev/app"

REDIS_SECRET, REDIS_SECRET_KEY = "coe-redis", "password"
API_KEYS_SECRET, API_KEYS_SECRET_KEY = "coe-api-keys", "keys"
HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY = "coe-hf-token", "token"
REDIS_NAME, REDIS_PORT = "coe-redis", 6379
GCS_REDIS_DB = 0  # Ray's GCS does not select a database: it always uses DB 0 (keys namespaced per cluster)

AUTOSCALER_CPU, AUTOSCALER_MEMORY = "500m", "512Mi"  # the autoscaler sidecar in the head pod
SERVE_PORT_NAME = "serve"
METRICS_PORT = 8080
# Ray reserves about 30% of a node's memory for the object store; replicas get the rest.
RAY_MEMORY_FRACTION = 0.7

COMMITTED_OVERLAYS: dict[str, str] = {"cpu-demo": "cpu-default", "gpu-prod": "gpu-experts"}
REGENERATE_CMD = "coe k8s render --all"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"


# --------------------------------------------------------------------------------------------------------------
# Cluster options (what the coe config does not say: images, pod sizes, namespace ...)
# --------------------------------------------------------------------------------------------------------------


class HeadOptions(StrictModel):
    """The Ray head pod: GCS, dashboard, Serve controller, autoscaler. It runs no coe replicas (num-cpus 0)."""

    cpu: int = Field(2, ge=1)
    memory_gib: int = Field(4, ge=1)


class CpuGroupOptions(StrictModel):
    """The CPU worker group: the ingress (router inside), the controller and any CPU experts."""

    name: str = "cpu"
    cpu: int = Field(2, ge=1, description="CPUs per pod (= Ray num-cpus of the pod).")
    memory_gib: int = Field(6, ge=1)
    min_pods: int = Field(1, ge=0, description="Floor on minReplicas (e.g. 2 for HA).")
    extra_max_pods: int = Field(1, ge=0, description="Headroom above the computed maximum.")
    reserve_cpus: float = Field(
        0.25, ge=0.0, description="CPUs kept for singleton deployments the config does not list (controller)."
    )
    model_cache_gib: int = Field(10, ge=1)


class GpuGroupOptions(StrictModel):
    """GPU worker groups, one per GPU shape (GPUs per replica) of the config's experts."""

    cpu_extra: int = Field(2, ge=0, description="CPUs per pod on top of the largest expert's num_cpus.")
    memory_gib_per_gpu: int = Field(48, ge=1)
    model_cache_gib: int = Field(200, ge=1, description="emptyDir for downloaded weights (HF_HOME).")
    extra_max_pods: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    )


class ClusterOptions(StrictModel):
    """Everything about the cluster that is not in the coe config. Profiles are presets of it."""

    name: str = Field("coe", description="RayService name (KubeRay: <= 47 chars, DNS-1035 label).")
    namespace: str = "coe"
    image: str = Field(f"ghcr.io/coe-project/coe:{__version__}-cpu", description="Head + CPU workers.")
    gpu_image: str = Field(f"ghcr.io/coe-project/coe:{__version__}-gpu", description="GPU workers (vLLM).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    head: HeadOptions = Field(default_factory=HeadOptions)
    cpu_group: CpuGroupOptions = Field(default_factory=CpuGroupOptions)
    gpu_group: GpuGroupOptions = Field(default_factory=GpuGroupOptions)
    cpu_node_selector: dict[str, str] = Field(default_factory=dict)
    autoscaler_idle_timeout_s: int = Field(60, ge=0)
    upgrade_strategy: Literal["NewCluster", "None"] = "NewCluster"
    secrets: Literal["inline", "external"] = Field(
        "inline", description="inline: render demo Secrets; external: expect them created beforehand."
    )
    redis_host: str = REDIS_NAME
    redis_port: int = REDIS_PORT
    coe_redis_db: int = Field(1, ge=1, le=15, description="coe's state DB; GCS fault tolerance uses DB 0.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"
    readiness_path: Literal["/health", "/ready"] = "/health"
    ingress_class: str | None = None
    ingress_host: str | None = None


PROFILES: dict[str, dict[str, Any]] = {
    # A laptop / kind cluster: 1 head (1 CPU) + 1 CPU worker (2 CPU) runs the three llama.cpp experts.
    "cpu-demo": {
        "namespace": "coe-demo",
        "head": {"cpu": 1, "memory_gib": 4},
        "cpu_group": {"cpu": 2, "memory_gib": 6, "min_pods": 1, "extra_max_pods": 1, "reserve_cpus": 0.25},
        "autoscaler_idle_timeout_s": 60,
        "secrets": "inline",
        "log_encoding": "TEXT",
    },
    # Production on GPU nodes (NVIDIA GPU operator): HA ingress on 2+ CPU pods, one GPU group per GPU shape.
    "gpu-prod": {
        "namespace": "coe",
        "head": {"cpu": 4, "memory_gib": 16},
        "cpu_group": {
            "cpu": 8, "memory_gib": 32, "min_pods": 2, "extra_max_pods": 1, "reserve_cpus": 1.0,
            "model_cache_gib": 20,
        },
        "autoscaler_idle_timeout_s": 300,
        "secrets": "external",
        "log_encoding": "JSON",
    },
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cluster_options(profile: str, overrides: dict[str, Any] | None = None) -> ClusterOptions:
    """The options of a profile (``cpu-demo`` / ``gpu-prod``), with strict overrides deep-merged on top."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown k8s profile '{profile}' (choose from {sorted(PROFILES)})")
    data = _deep_merge(PROFILES[profile], overrides or {})
    try:
        return ClusterOptions.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid cluster options (profile {profile}):"]
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"])
            lines.append(f"  {loc}: " + (f"unknown key '{e['loc'][-1]}'" if e["type"] == "extra_forbidden" else e["msg"]))
        raise ConfigError("\n".join(lines)) from None


def default_profile(config: CoeConfig) -> str:
    """gpu-prod when any expert needs a GPU, else cpu-demo."""
    return "gpu-prod" if any(e.resources.num_gpus > 0 for e in config.experts) else "cpu-demo"


# --------------------------------------------------------------------------------------------------------------
# serveConfigV2: exactly what `coe serve` deploys
# --------------------------------------------------------------------------------------------------------------


def config_payload(config: CoeConfig) -> dict[str, Any]:
    """The config as serveConfigV2 carries it: serialised by the model (every field, new ones included)."""
    return config.model_dump(mode="json")


def config_sha256(payload: dict[str, Any]) -> str:
    """A stable hash of a config payload (canonical JSON)."""
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def serve_config(config: CoeConfig, options: ClusterOptions | None = None) -> dict[str, Any]:
    """Ray Serve's config (serveConfigV2): one application, `build_app(config_inline=...)` at route "/".

    `coe serve` runs ``serve.run(build_from_config(config), name=app_name, route_prefix="/")`` with
    http_options from ``config.server``; this is the same application. The proxy binds 0.0.0.0 in a pod
    whatever ``server.host`` says. No per-deployment overrides: `build_app` applies every deployment option
    from the config, so there is nothing to keep in sync.
    """
    opts = options or ClusterOptions()
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": "0.0.0.0",
            "port": config.server.port,
            "request_timeout_s": config.server.request_timeout_s,
        },
        "logging_config": {"encoding": opts.log_encoding, "log_level": opts.log_level},
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"config_inline": config_payload(config)},
            }
        ],
    }


# --------------------------------------------------------------------------------------------------------------
# Worker-group sizing from the config's per-replica demands
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """One deployment's per-replica resources and replica bounds."""

    name: str
    num_cpus: float
    num_gpus: float
    memory_bytes: int
    min_replicas: int
    max_replicas: int


def config_demands(config: CoeConfig) -> list[Demand]:
    """Per-replica demands of the deployments the config describes (ingress + experts)."""
    s = config.server
    out = [
        Demand(INGRESS_DEPLOYMENT, s.ingress_num_cpus, 0.0, 0,
               s.ingress_autoscaling.min_replicas, s.ingress_autoscaling.max_replicas)
    ]
    for e in config.experts:
        mem = int(e.resources.memory_gb * 1024**3) if e.resources.memory_gb else 0
        out.append(Demand(e.name, e.resources.num_cpus, e.resources.num_gpus, mem,
                          e.autoscaling.min_replicas, e.autoscaling.max_replicas))
    return out


@dataclass(frozen=True)
class GroupPlan:
    """A worker group: pod size and bounds."""

    name: str
    cpu: int
    memory_gib: int
    gpus: int
    min_pods: int
    max_pods: int
    deployments: tuple[str, ...] = field(default=())


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def plan_groups(config: CoeConfig, options: ClusterOptions) -> list[GroupPlan]:
    """The CPU group, then one GPU group per GPU shape (GPUs per replica, rounded up)."""
    demands = config_demands(config)
    cg = options.cpu_group
    cpu_only = [d for d in demands if d.num_gpus == 0]
    min_cpu = sum(d.min_replicas * d.num_cpus for d in cpu_only) + cg.reserve_cpus
    max_cpu = sum(d.max_replicas * d.num_cpus for d in cpu_only) + cg.reserve_cpus
    usable_mem = cg.memory_gib * 1024**3 * RAY_MEMORY_FRACTION
    min_mem = sum(d.min_replicas * d.memory_bytes for d in cpu_only)
    max_mem = sum(d.max_replicas * d.memory_bytes for d in cpu_only)
    cpu_min = max(cg.min_pods, _ceil(min_cpu / cg.cpu), _ceil(min_mem / usable_mem))
    cpu_max = max(cpu_min, _ceil(max_cpu / cg.cpu), _ceil(max_mem / usable_mem)) + cg.extra_max_pods
    plans = [GroupPlan(cg.name, cg.cpu, cg.memory_gib, 0, cpu_min, cpu_max, tuple(d.name for d in cpu_only))]

    gg = options.gpu_group
    shapes: dict[int, list[Demand]] = {}
    for d in demands:
        if d.num_gpus > 0:
            shapes.setdefault(max(1, _ceil(d.num_gpus)), []).append(d)
    for gpus in sorted(shapes):
        ds = shapes[gpus]
        cpu = _ceil(max(d.num_cpus for d in ds)) + gg.cpu_extra
        mem_need = max(d.memory_bytes for d in ds) / RAY_MEMORY_FRACTION / 1024**3
        memory_gib = max(gg.memory_gib_per_gpu * gpus, _ceil(mem_need) + 2)

        def per_pod(d: Demand, gpus: int = gpus, cpu: int = cpu) -> int:
            n = math.floor(gpus / d.num_gpus + 1e-9)
            if d.num_cpus > 0:
                n = min(n, math.floor(cpu / d.num_cpus + 1e-9))
            return max(1, n)

        lo = sum(_ceil(d.min_replicas / per_pod(d)) for d in ds)
        hi = max(lo, sum(_ceil(d.max_replicas / per_pod(d)) for d in ds)) + gg.extra_max_pods
        plans.append(GroupPlan(f"gpu-{gpus}x", cpu, memory_gib, gpus, lo, hi, tuple(d.name for d in ds)))
    return plans


@dataclass(frozen=True)
class Capacity:
    cpu: float
    memory_gib: float
    gpus: int

    def __str__(self) -> str:
        return f"{self.cpu:g} CPU, {self.memory_gib:g} GiB memory, {self.gpus} GPU"


def upgrade_spare_capacity(config: CoeConfig, options: ClusterOptions) -> Capacity:
    """What a NewCluster (zero-downtime) upgrade needs free: a second cluster at its minimum size.

    KubeRay starts a complete pending RayCluster (head + every group's minReplicas pods), deploys the new
    serveConfigV2 on it, waits until it is healthy and only then switches the Service and deletes the old one.
    Counted: the head, its autoscaler sidecar and every worker group at minReplicas (requests = limits).
    """
    plans = plan_groups(config, options)
    cpu = options.head.cpu + 0.5 + sum(p.min_pods * p.cpu for p in plans)  # 0.5: AUTOSCALER_CPU
    mem = options.head.memory_gib + 0.5 + sum(p.min_pods * p.memory_gib for p in plans)  # AUTOSCALER_MEMORY
    gpus = sum(p.min_pods * p.gpus for p in plans)
    return Capacity(cpu, mem, gpus)


# --------------------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------------------


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "coe",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "coe",
        "app.kubernetes.io/version": __version__,
    }


def _resources(cpu: str, memory: str, gpus: int = 0, *, cpu_request: str | None = None,
               memory_request: str | None = None) -> dict[str, Any]:
    req: dict[str, str] = {"cpu": cpu_request or cpu, "memory": memory_request or memory}
    lim: dict[str, str] = {"cpu": cpu, "memory": memory}
    if gpus:
        req[GPU_RESOURCE] = lim[GPU_RESOURCE] = str(gpus)
    return {"requests": req, "limits": lim}


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _worker_env(options: ClusterOptions, *, gpu: bool) -> list[dict[str, Any]]:
    env = [
        _secret_env("COE_REDIS_PASSWORD", REDIS_SECRET, REDIS_SECRET_KEY),
        # $(VAR) is expanded by the kubelet from the entry above; the password must be URL-safe.
        {"name": "COE_REDIS_URL",
         "value": f"redis://:$(COE_REDIS_PASSWORD)@{options.redis_host}:{options.redis_port}/{options.coe_redis_db}"},
        _secret_env("COE_API_KEYS", API_KEYS_SECRET, API_KEYS_SECRET_KEY),
        {"name": "COE_LOG_LEVEL", "value": options.log_level},
        {"name": "COE_MODEL_CACHE_DIR", "value": "/home/ray/.cache/coe"},
    ]
    if gpu:
        env += [
            {"name": "HF_HOME", "value": "/home/ray/.cache/huggingface"},
            _secret_env("HF_TOKEN", HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY, optional=True),
        ]
    return env


def _head_group(config: CoeConfig, options: ClusterOptions) -> dict[str, Any]:
    port = config.server.port
    container = {
        "name": "ray-head",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "ports": [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": SERVE_PORT_NAME, "containerPort": port},
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "as-metrics", "containerPort": 44217},
            {"name": "dash-metrics", "containerPort": 44227},
        ],
        "env": [{"name": "COE_LOG_LEVEL", "value": options.log_level}],
        "resources": _resources(str(options.head.cpu), f"{options.head.memory_gib}Gi"),
    }
    spec: dict[str, Any] = {"containers": [container]}
    if options.cpu_node_selector:
        spec["nodeSelector"] = dict(options.cpu_node_selector)
    return {
        # num-cpus 0: no coe replica is scheduled on the head; it keeps GCS, dashboard and the controller.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"metadata": {"labels": {LABEL_APP: options.name, **_labels(options.name, "ray-head")}},
                     "spec": spec},
    }


def _worker_group(plan: GroupPlan, config: CoeConfig, options: ClusterOptions) -> dict[str, Any]:
    gpu = plan.gpus > 0
    port = config.server.port
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": options.gpu_image if gpu else options.image,
        "imagePullPolicy": options.image_pull_policy,
        "ports": [{"name": SERVE_PORT_NAME, "containerPort": port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "env": _worker_env(options, gpu=gpu),
        "resources": _resources(str(plan.cpu), f"{plan.memory_gib}Gi", plan.gpus),
        "volumeMounts": [{"name": "model-cache", "mountPath": "/home/ray/.cache"}],
    }
    # /dev/shm in memory (charged to the pod's memory limit): Ray's object store and NCCL need more than
    # the container runtime's 64 MiB default.
    container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes: list[dict[str, Any]] = []
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if gpu:
        gg = options.gpu_group
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": f"{gg.model_cache_gib}Gi"}})
        spec["nodeSelector"] = dict(gg.node_selector)
        spec["tolerations"] = [dict(t) for t in gg.tolerations]
    else:
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": f"{options.cpu_group.model_cache_gib}Gi"}})
        # Serve runs an HTTP proxy only on pods that host a replica; a pod is Ready (in the Service) when its
        # proxy reaches a live CoeIngress. `/ready` (every expert has a running replica) is the app-level gate.
        container["readinessProbe"] = {
            "httpGet": {"path": options.readiness_path, "port": SERVE_PORT_NAME},
            "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 3,
            "failureThreshold": 3, "successThreshold": 1,
        }
        if options.cpu_node_selector:
            spec["nodeSelector"] = dict(options.cpu_node_selector)
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    component = f"ray-worker-{plan.name}"
    return {
        "groupName": plan.name,
        "replicas": plan.min_pods,
        "minReplicas": plan.min_pods,
        "maxReplicas": plan.max_pods,
        "rayStartParams": {},
        "template": {"metadata": {"labels": {LABEL_APP: options.name, **_labels(options.name, component)}},
                     "spec": spec},
    }


def rayservice(config: CoeConfig, options: ClusterOptions, config_ref: str, profile: str) -> dict[str, Any]:
    """The RayService manifest for a config."""
    payload = config_payload(config)
    annotations = {
        ANN_CONFIG: config_ref,
        ANN_CONFIG_SHA: config_sha256(payload),
        ANN_PROFILE: profile,
    }
    if options.secrets == "external":
        annotations[ANN_EXTERNAL_SECRETS] = ",".join(sorted([API_KEYS_SECRET, REDIS_SECRET]))
    cluster = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": options.autoscaler_idle_timeout_s,
            "imagePullPolicy": options.image_pull_policy,
            "resources": _resources(AUTOSCALER_CPU, AUTOSCALER_MEMORY),
        },
        "gcsFaultToleranceOptions": {
            "redisAddress": f"{options.redis_host}:{options.redis_port}",
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY}}},
        },
        "headGroupSpec": _head_group(config, options),
        "workerGroupSpecs": [_worker_group(p, config, options) for p in plan_groups(config, options)],
    }
    serve_yaml = dump_yaml(serve_config(config, options))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": options.name, "labels": _labels(options.name, "rayservice"),
                     "annotations": annotations},
        "spec": {
            "upgradeStrategy": {"type": options.upgrade_strategy},
            "serveService": {
                "metadata": {"name": serve_service_name(options), "labels": _labels(options.name, "serve")},
                "spec": {"type": "ClusterIP", "ports": [{"name": SERVE_PORT_NAME, "port": config.server.port,
                                                           "targetPort": SERVE_PORT_NAME, "protocol": "TCP"}]},
            },
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": cluster,
        },
    }


def serve_service_name(options: ClusterOptions) -> str:
    return f"{options.name}-serve-svc"


def ingress(config: CoeConfig, options: ClusterOptions) -> dict[str, Any]:
    """An Ingress to the serve Service (KubeRay keeps that Service on the active cluster across upgrades)."""
    timeout = str(math.ceil(config.server.request_timeout_s))
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": serve_service_name(options), "port": {"name": SERVE_PORT_NAME}}},
    }]}}
    if options.ingress_host:
        rule = {"host": options.ingress_host, **rule}
    spec: dict[str, Any] = {}
    if options.ingress_class:
        spec["ingressClassName"] = options.ingress_class
    spec["rules"] = [rule]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": options.name,
            "labels": _labels(options.name, "ingress"),
            "annotations": {
                # ingress-nginx: stream SSE tokens unbuffered, allow long generations.
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/proxy-read-timeout": timeout,
                "nginx.ingress.kubernetes.io/proxy-send-timeout": timeout,
                "nginx.ingress.kubernetes.io/proxy-body-size": "8m",
            },
        },
        "spec": spec,
    }


def demo_secrets() -> list[dict[str, Any]]:
    """Demo-only Secrets (profile cpu-demo). Production creates them out of band (see k8s/README.md)."""
    labels = {"app.kubernetes.io/part-of": "coe"}
    note = {"coe.dev/demo-only": "replace these values before exposing the endpoint"}
    return [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": API_KEYS_SECRET, "labels": labels, "annotations": note},
         "type": "Opaque", "stringData": {API_KEYS_SECRET_KEY: "coe-demo-key"}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": REDIS_SECRET, "labels": labels, "annotations": note},
         "type": "Opaque", "stringData": {REDIS_SECRET_KEY: "coe-demo-redis-password"}},
    ]


def redis_objects() -> list[dict[str, Any]]:
    """One Redis for GCS fault tolerance (DB 0) and coe's own state (DB 1, keys `coe:*`)."""
    labels = {"app.kubernetes.io/name": REDIS_NAME, "app.kubernetes.io/part-of": "coe"}
    selector = {"app.kubernetes.io/name": REDIS_NAME}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]},
    }
    container = {
        "name": "redis",
        "image": "redis:7.4-alpine",
        "imagePullPolicy": "IfNotPresent",
        "args": ["--requirepass", "$(REDIS_PASSWORD)", "--appendonly", "yes",
                 "--maxmemory", "768mb", "--maxmemory-policy", "noeviction"],
        "env": [_secret_env("REDIS_PASSWORD", REDIS_SECRET, REDIS_SECRET_KEY)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"exec": {"command": ["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG']},
                           "periodSeconds": 5, "timeoutSeconds": 3},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "initialDelaySeconds": 10, "periodSeconds": 10},
        "resources": _resources("1", "1Gi", cpu_request="100m", memory_request="256Mi"),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": REDIS_NAME, "labels": labels},
        "spec": {
            "serviceName": REDIS_NAME,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
            }],
        },
    }
    return [service, statefulset]


def pod_monitors() -> list[dict[str, Any]]:
    """Prometheus Operator PodMonitors for the Ray head (node, autoscaler, dashboard metrics) and workers."""
    relabel = [{"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                "targetLabel": "ray_io_cluster"}]
    labels = {"app.kubernetes.io/part-of": "coe", "release": "prometheus"}

    def monitor(name: str, node_type: str, ports: Iterable[str]) -> dict[str, Any]:
        return {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "jobLabel": name,
                "selector": {"matchLabels": {"ray.io/is-ray-node": "yes", "ray.io/node-type": node_type}},
                "podMetricsEndpoints": [{"port": p, "path": "/metrics", "interval": "15s",
                                         "relabelings": relabel} for p in ports],
            },
        }

    return [monitor("coe-ray-head", "head", ["metrics", "as-metrics", "dash-metrics"]),
            monitor("coe-ray-workers", "worker", ["metrics"])]


# --------------------------------------------------------------------------------------------------------------
# YAML and the file tree
# --------------------------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(data: Any) -> str:
    """Deterministic YAML: insertion order, block literals for multi-line strings, no line folding."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=100000)


def dump_docs(objs: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(dump_yaml(o) for o in objs)
    return header + body


def _header(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)


def _kustomization(resources: list[str], namespace: str | None = None) -> dict[str, Any]:
    k: dict[str, Any] = {"apiVersion": KUSTOMIZE_API, "kind": "Kustomization"}
    if namespace:
        k["namespace"] = namespace
    k["resources"] = resources
    return k


def render_base() -> dict[str, str]:
    """Files of ``base/`` (independent of the config and the profile)."""
    head = _header([f"Generated by `coe k8s render` (coe {__version__}). Do not edit: regenerate with",
                    f"`{REGENERATE_CMD}`."])
    return {
        "base/kustomization.yaml": dump_docs([_kustomization(["redis.yaml", "podmonitor.yaml"])], head),
        "base/redis.yaml": dump_docs(redis_objects(), head),
        "base/podmonitor.yaml": dump_docs(pod_monitors(), head),
    }


def render_overlay(config: CoeConfig, options: ClusterOptions, *, config_ref: str, profile: str,
                   overlay: str | None = None) -> dict[str, str]:
    """Files of ``overlays/<overlay>/`` for one config."""
    overlay = overlay or profile
    d = f"overlays/{overlay}"
    spare = upgrade_spare_capacity(config, options)
    head = _header([
        f"Generated by `coe k8s render` (coe {__version__}) from the coe config '{config_ref}', profile {profile}.",
        f"Do not edit: change the config and regenerate with `{REGENERATE_CMD}`"
        if overlay in COMMITTED_OVERLAYS and COMMITTED_OVERLAYS[overlay] == config_ref
        else f"Do not edit: change the config and run `coe k8s render --config {config_ref} --profile {profile}`.",
    ])
    rs_head = head + _header([
        f"Target: KubeRay {KUBERAY_VERSION} (ray.io/v1), Ray {RAY_VERSION}.",
        f"Zero-downtime upgrade (NewCluster) needs spare capacity for a second cluster at minimum size: {spare}.",
    ])
    resources = ["../../base"]
    files: dict[str, str] = {}
    if options.secrets == "inline":
        resources.append("secrets.yaml")
        files[f"{d}/secrets.yaml"] = dump_docs(demo_secrets(), head + _header(["DEMO VALUES: replace them."]))
    resources += ["rayservice.yaml", "ingress.yaml"]
    files[f"{d}/kustomization.yaml"] = dump_docs([_kustomization(resources, options.namespace)], head)
    files[f"{d}/rayservice.yaml"] = dump_docs([rayservice(config, options, config_ref, profile)], rs_head)
    files[f"{d}/ingress.yaml"] = dump_docs([ingress(config, options)], head)
    return dict(sorted(files.items()))


def render_committed() -> dict[str, str]:
    """The whole committed tree under ``k8s/`` (base + the packaged configs' overlays), relative paths."""
    files = render_base()
    for overlay, ref in COMMITTED_OVERLAYS.items():
        files.update(render_overlay(load_config(ref), cluster_options(overlay), config_ref=ref, profile=overlay))
    return dict(sorted(files.items()))



def write_tree(files: dict[str, str], out: str | Path) -> list[Path]:
    """Write rendered files under `out`, removing stale *.yaml in the directories written. Returns paths."""
    root = Path(out)
    dirs = sorted({str(Path(rel).parent) for rel in files})
    for d in dirs:
        p = root / d
        if p.is_dir():
            for old in p.glob("*.yaml"):
                if str(old.relative_to(root)) not in files:
                    old.unlink()
    written = []
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
        written.append(p)
    return written
