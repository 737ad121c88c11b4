"""Render coe's Kubernetes manifests from the one coe config (pure functions, deterministic output).

The tree is a kustomize base plus one overlay per deployment profile::

    base/                      the two Redis instances (GCS fault tolerance; coe's state) and the PodMonitors
    overlays/<profile>/        the RayService (serveConfigV2 = the `build_app` args of `coe serve`), its
                               Ingress, NetworkPolicies and PodDisruptionBudgets

The RayService's ``serveConfigV2`` carries the config itself (``args.config_inline``, the validated config
serialised by the model), so no second copy of the expert list exists: edit the coe config, re-render.
Worker groups are sized from the config's per-replica resources and replica bounds; options that are not in
the coe config (images, pod sizes, namespace) come from a strict :class:`ClusterOptions` profile.

No credential is ever rendered: the manifests reference Secrets that are created out of band
(:func:`generated_secrets`, ``coe k8s secrets``) and are declared external on the RayService.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from coe import __version__
from coe.config import CoeConfig, StrictModel, load_config
from coe.errors import ConfigError
from coe.k8s.dashboard import dashboard

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

# Secrets (never rendered with values: `coe k8s secrets` prints them with fresh random values).
REDIS_SECRET, REDIS_SECRET_KEY = "coe-redis", "password"  # the GCS fault-tolerance Redis
STATE_REDIS_SECRET, STATE_REDIS_SECRET_KEY = "coe-state-redis", "password"  # coe's state Redis
ADMIN_KEY_SECRET, ADMIN_KEY_SECRET_KEY = "coe-admin-key", "admin-key"
HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY = "coe-hf-token", "token"
ADMIN_KEY_DIR = "/etc/coe/secrets"
ADMIN_KEY_FILE = f"{ADMIN_KEY_DIR}/{ADMIN_KEY_SECRET_KEY}"

REDIS_NAME, REDIS_PORT = "coe-redis", 6379  # GCS fault tolerance only (noeviction: GCS must never lose a key)
STATE_REDIS_NAME = "coe-state-redis"  # coe's keys, usage counters and rate-limit buckets
REDIS_IMAGE = "redis:7.4-alpine"
REDIS_UID, REDIS_GID = 999, 1000  # the redis user of the official image (alpine variant)
# coe's keys that must survive (team API keys, the threshold) carry no TTL; usage counters, spend counters and
# rate-limit buckets carry TTLs. volatile-ttl evicts only keys with a TTL, the nearest to expiry first (the
# two-minute rate-limit buckets before month-long usage counters); keys without a TTL are never evicted.
STATE_REDIS_MAXMEMORY, STATE_REDIS_POLICY = "768mb", "volatile-ttl"
GCS_REDIS_MAXMEMORY, GCS_REDIS_POLICY = "768mb", "noeviction"

# The Ray images (rayproject/ray) run as the user `ray`: uid 1000, gid 100 (users). runAsNonRoot needs the
# numeric uid: the image names its user, which the kubelet cannot check.
RAY_UID, RAY_GID = 1000, 100
RAY_HOME = "/home/ray"
# Writable paths under readOnlyRootFilesystem (emptyDirs). coe's image cache ~/.cache/coe (COE_CACHE_DIR: the
# router artifact and the ONNX export built into the image) stays read-only and is never mounted over; a new
# ONNX export falls back to /tmp/coe-onnx.
CACHE_DIR = "/var/cache/coe"  # writable: assembled models, Hugging Face, XDG caches (torch, vLLM, Triton)
COE_CACHE_DIR = f"{RAY_HOME}/.cache/coe"
DASHBOARD_PORT, CLIENT_PORT, GCS_PORT = 8265, 10001, 6379
AS_METRICS_PORT, DASH_METRICS_PORT = 44217, 44227
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
PROD_PROFILES = ("gpu-prod",)

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
    model_cache_gib: int = Field(10, ge=1, description="emptyDir at /var/cache/coe (assembled models, caches).")


class GpuGroupOptions(StrictModel):
    """GPU worker groups, one per GPU shape (GPUs per replica) of the config's experts."""

    cpu_extra: int = Field(2, ge=0, description="CPUs per pod on top of the largest expert's num_cpus.")
    memory_gib_per_gpu: int = Field(48, ge=1)
    model_cache_gib: int = Field(200, ge=1, description="emptyDir at /var/cache/coe: downloaded weights (HF_HOME), "
                                                         "compile caches.")
    extra_max_pods: int = Field(0, ge=0)
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    )


def _check_digest(v: str | None) -> str | None:
    if v is not None and not DIGEST_RE.match(v):
        raise ValueError("must be 'sha256:' followed by 64 lowercase hex digits (docker buildx imagetools inspect "
                         "IMAGE shows it)")
    return v


def _ns_selector(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


class ClusterOptions(StrictModel):
    """Everything about the cluster that is not in the coe config. Profiles are presets of it."""

    name: str = Field("coe", description="RayService name (KubeRay: <= 47 chars, DNS-1035 label).")
    namespace: str = "coe"
    image: str = Field(f"ghcr.io/coe-project/coe:{__version__}-cpu", description="Head + CPU workers.")
    gpu_image: str = Field(f"ghcr.io/coe-project/coe:{__version__}-gpu", description="GPU workers (vLLM).")
    image_digest: str | None = Field(None, description="sha256:<64 hex> of `image`: renders image@sha256:...")
    gpu_image_digest: str | None = Field(None, description="sha256:<64 hex> of `gpu_image`.")
    redis_image: str = REDIS_IMAGE
    redis_image_digest: str | None = Field(None, description="sha256:<64 hex> of `redis_image` (both Redis).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    head: HeadOptions = Field(default_factory=HeadOptions)
    cpu_group: CpuGroupOptions = Field(default_factory=CpuGroupOptions)
    gpu_group: GpuGroupOptions = Field(default_factory=GpuGroupOptions)
    cpu_node_selector: dict[str, str] = Field(default_factory=dict)
    autoscaler_idle_timeout_s: int = Field(60, ge=0)
    upgrade_strategy: Literal["NewCluster", "None"] = "NewCluster"
    redis_host: str = Field(REDIS_NAME, description="The GCS fault-tolerance Redis.")
    redis_port: int = REDIS_PORT
    state_redis_host: str = Field(STATE_REDIS_NAME, description="coe's state Redis (COE_REDIS_URL); never the "
                                                                "GCS Redis.")
    state_redis_port: int = REDIS_PORT
    state_redis_db: int = Field(0, ge=0, le=15)
    ingress_namespace_selector: dict[str, str] = Field(
        default_factory=lambda: _ns_selector("ingress-nginx"),
        description="Namespace labels of the Ingress controller: the only clients of the Serve port.")
    operator_namespace_selector: dict[str, str] = Field(
        default_factory=lambda: _ns_selector("kuberay-system"),
        description="Namespace labels of the KubeRay operator (it calls the head's dashboard port).")
    monitoring_namespace_selector: dict[str, str] | None = Field(
        default_factory=lambda: _ns_selector("monitoring"),
        description="Namespace labels of Prometheus (scrapes the metrics ports); null: no scraping allowed.")
    tmp_gib: int = Field(4, ge=1, description="emptyDir at /tmp of every Ray container.")
    ray_tmp_gib: int = Field(10, ge=1, description="emptyDir at /tmp/ray (Ray's sessions, logs, spilled objects).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"
    readiness_path: Literal["/health", "/ready"] = "/health"
    ingress_class: str | None = None
    ingress_host: str | None = None

    @field_validator("image_digest", "gpu_image_digest", "redis_image_digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        return _check_digest(v)

    @model_validator(mode="after")
    def _apart(self) -> ClusterOptions:
        if self.state_redis_host == self.redis_host:
            raise ValueError(f"state_redis_host must not be the GCS Redis ({self.redis_host}): coe's counters "
                             "filling that Redis would stop GCS writes")
        for k in ("image", "gpu_image", "redis_image"):
            if "@" in getattr(self, k):
                raise ValueError(f"{k}: give the digest in {k}_digest, not in the image reference")
        return self

    def image_ref(self, gpu: bool = False) -> str:
        """The image as rendered: pinned by digest when the options give one."""
        return _pin(self.gpu_image if gpu else self.image, self.gpu_image_digest if gpu else self.image_digest)

    def redis_image_ref(self) -> str:
        return _pin(self.redis_image, self.redis_image_digest)


def _pin(image: str, digest: str | None) -> str:
    return f"{image}@{digest}" if digest else image


PROFILES: dict[str, dict[str, Any]] = {
    # A laptop / kind cluster: 1 head (1 CPU) + 1 CPU worker (2 CPU) runs the three llama.cpp experts.
    "cpu-demo": {
        "namespace": "coe-demo",
        "head": {"cpu": 1, "memory_gib": 4},
        "cpu_group": {"cpu": 2, "memory_gib": 6, "min_pods": 1, "extra_max_pods": 1, "reserve_cpus": 0.25},
        "autoscaler_idle_timeout_s": 60,
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
            msg = f"unknown key '{e['loc'][-1]}'" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
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


def _pod_security(uid: int, gid: int) -> dict[str, Any]:
    """Pod-level hardening: a numeric non-root user (the kubelet cannot check a named USER), RuntimeDefault seccomp."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    """Container-level hardening: no privilege escalation, no capabilities, a read-only root filesystem."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": True}


def _empty_dir(name: str, gib: int) -> dict[str, Any]:
    return {"name": name, "emptyDir": {"sizeLimit": f"{gib}Gi"}}


def _tmp_mounts() -> list[dict[str, Any]]:
    """Ray's writable paths (the root filesystem is read-only): /tmp and its sessions, logs and spill /tmp/ray.
    The volume at /tmp/ray is named like KubeRay's own `ray-logs`, so KubeRay adds no second one."""
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "ray-logs", "mountPath": "/tmp/ray"}]


def _tmp_volumes(options: ClusterOptions) -> list[dict[str, Any]]:
    return [_empty_dir("tmp", options.tmp_gib), _empty_dir("ray-logs", options.ray_tmp_gib)]


def _admin_key_volume() -> dict[str, Any]:
    return {"name": "admin-key", "secret": {"secretName": ADMIN_KEY_SECRET, "defaultMode": 0o440,
                                            "items": [{"key": ADMIN_KEY_SECRET_KEY, "path": ADMIN_KEY_SECRET_KEY}]}}


def _ray_env(options: ClusterOptions, *, gpu: bool = False, state: bool = True) -> list[dict[str, Any]]:
    """Environment of a Ray container: the admin key file (any pod with spare CPU may host the ingress, so every
    Ray pod has it), coe's state Redis, and caches redirected to the writable /var/cache/coe."""
    env: list[dict[str, Any]] = [{"name": "COE_ADMIN_KEY_FILE", "value": ADMIN_KEY_FILE}]
    if state:
        env += [
            _secret_env("COE_STATE_REDIS_PASSWORD", STATE_REDIS_SECRET, STATE_REDIS_SECRET_KEY),
            # $(VAR) is expanded by the kubelet from the entry above; the password is hex (URL-safe).
            {"name": "COE_REDIS_URL", "value": f"redis://:$(COE_STATE_REDIS_PASSWORD)@{options.state_redis_host}:"
                                               f"{options.state_redis_port}/{options.state_redis_db}"},
        ]
    env += [
        {"name": "COE_LOG_LEVEL", "value": options.log_level},
        # Each deployment sets its own logging_config (level from COE_LOG_LEVEL), so the encoding comes from Ray's
        # default, which this sets.
        {"name": "RAY_SERVE_LOG_ENCODING", "value": options.log_encoding},
        # The image's read-only cache: the router artifact and its ONNX export (new exports go to /tmp).
        {"name": "COE_CACHE_DIR", "value": COE_CACHE_DIR},
        {"name": "COE_MODEL_CACHE_DIR", "value": f"{CACHE_DIR}/models"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg-cache"},
        {"name": "XDG_CONFIG_HOME", "value": f"{CACHE_DIR}/xdg-config"},
    ]
    if gpu:
        env += [
            {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
            {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/torchinductor"},
            {"name": "CUDA_CACHE_PATH", "value": f"{CACHE_DIR}/nv-compute-cache"},
            {"name": "FLASHINFER_WORKSPACE_BASE", "value": f"{CACHE_DIR}/flashinfer"},
            _secret_env("HF_TOKEN", HF_TOKEN_SECRET, HF_TOKEN_SECRET_KEY, optional=True),
        ]
    return env


def _ray_mounts() -> list[dict[str, Any]]:
    return [*_tmp_mounts(), {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "admin-key", "mountPath": ADMIN_KEY_DIR, "readOnly": True}]


def _head_group(config: CoeConfig, options: ClusterOptions) -> dict[str, Any]:
    port = config.server.port
    container = {
        "name": "ray-head",
        "image": options.image_ref(),
        "imagePullPolicy": options.image_pull_policy,
        "ports": [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": CLIENT_PORT},
            {"name": SERVE_PORT_NAME, "containerPort": port},
            {"name": "metrics", "containerPort": METRICS_PORT},
            {"name": "as-metrics", "containerPort": AS_METRICS_PORT},
            {"name": "dash-metrics", "containerPort": DASH_METRICS_PORT},
        ],
        "env": _ray_env(options, state=False),
        "resources": _resources(str(options.head.cpu), f"{options.head.memory_gib}Gi"),
        "securityContext": container_security(),
        "volumeMounts": _ray_mounts(),
    }
    spec: dict[str, Any] = {
        "securityContext": _pod_security(RAY_UID, RAY_GID),
        "containers": [container],
        "volumes": [*_tmp_volumes(options), _empty_dir("cache", 1), _admin_key_volume()],
    }
    if options.cpu_node_selector:
        spec["nodeSelector"] = dict(options.cpu_node_selector)
    return {
        # num-cpus 0: no coe replica is scheduled on the head; it keeps GCS, dashboard and the controller.
        # dashboard-host 0.0.0.0: the KubeRay operator deploys serveConfigV2 through the dashboard, so it must
        # listen on the pod IP; Ray token authentication (authOptions) and the NetworkPolicy guard it.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {"metadata": {"labels": {LABEL_APP: options.name, **_labels(options.name, "ray-head")}},
                     "spec": spec},
    }


def drain_seconds(config: CoeConfig) -> int:
    """terminationGracePeriodSeconds for pods that host replicas: the ingress's graceful shutdown (the HTTP
    request timeout, server.request_timeout_s, + 5 s; experts' is shorter: timeouts.total_s + 5 s) plus 30 s for
    Ray."""
    return int(math.ceil(config.server.request_timeout_s)) + 5 + 30


def _worker_group(plan: GroupPlan, config: CoeConfig, options: ClusterOptions) -> dict[str, Any]:
    gpu = plan.gpus > 0
    port = config.server.port
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": options.image_ref(gpu),
        "imagePullPolicy": options.image_pull_policy,
        "ports": [{"name": SERVE_PORT_NAME, "containerPort": port},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "env": _ray_env(options, gpu=gpu),
        "resources": _resources(str(plan.cpu), f"{plan.memory_gib}Gi", plan.gpus),
        "securityContext": container_security(),
        # /dev/shm in memory (charged to the pod's memory limit): Ray's object store and NCCL need more than
        # the container runtime's 64 MiB default.
        "volumeMounts": [*_ray_mounts(), {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    cache_gib = options.gpu_group.model_cache_gib if gpu else options.cpu_group.model_cache_gib
    volumes: list[dict[str, Any]] = [*_tmp_volumes(options), _empty_dir("cache", cache_gib), _admin_key_volume(),
                                     {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    spec: dict[str, Any] = {"securityContext": _pod_security(RAY_UID, RAY_GID), "containers": [container],
                            "volumes": volumes,
                            # a draining pod lets the requests it holds finish (no lost requests on scale-down)
                            "terminationGracePeriodSeconds": drain_seconds(config)}
    if gpu:
        gg = options.gpu_group
        spec["nodeSelector"] = dict(gg.node_selector)
        spec["tolerations"] = [dict(t) for t in gg.tolerations]
    else:
        # Serve runs an HTTP proxy only on pods that host a replica; a pod is Ready (in the Service) when its
        # proxy reaches a live CoeIngress. `/ready` (every expert has a running replica) is the app-level gate.
        container["readinessProbe"] = {
            "httpGet": {"path": options.readiness_path, "port": SERVE_PORT_NAME},
            "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 3,
            "failureThreshold": 3, "successThreshold": 1,
        }
        if options.cpu_node_selector:
            spec["nodeSelector"] = dict(options.cpu_node_selector)
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


def required_secrets() -> list[str]:
    """The Secrets the rendered manifests need (created out of band: `coe k8s secrets`)."""
    return sorted([ADMIN_KEY_SECRET, REDIS_SECRET, STATE_REDIS_SECRET])


def rayservice(config: CoeConfig, options: ClusterOptions, config_ref: str, profile: str) -> dict[str, Any]:
    """The RayService manifest for a config."""
    payload = config_payload(config)
    annotations = {
        ANN_CONFIG: config_ref,
        ANN_CONFIG_SHA: config_sha256(payload),
        ANN_PROFILE: profile,
    }
    # Created out of band (`coe k8s secrets`), never rendered: validation checks every reference is listed here.
    annotations[ANN_EXTERNAL_SECRETS] = ",".join(required_secrets())
    cluster = {
        "rayVersion": RAY_VERSION,
        # Ray token authentication (Ray >= 2.52, KubeRay >= 1.5.1): the operator generates a random token in a
        # Secret named like the RayCluster (key auth_token) and sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on every Ray
        # container, the autoscaler included; GCS, dashboard and Ray Client then refuse unauthenticated calls.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "upscalingMode": "Default",
            "idleTimeoutSeconds": options.autoscaler_idle_timeout_s,
            "imagePullPolicy": options.image_pull_policy,
            "resources": _resources(AUTOSCALER_CPU, AUTOSCALER_MEMORY),
            "securityContext": container_security(),
            "volumeMounts": _tmp_mounts(),
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


def generated_secrets(namespace: str) -> list[dict[str, Any]]:
    """The Secrets of :func:`required_secrets` with fresh random values (``coe k8s secrets``; never committed).

    Redis passwords are hex: they go into COE_REDIS_URL. The admin key is URL-safe base64 (256 bits)."""
    values = {
        ADMIN_KEY_SECRET: (ADMIN_KEY_SECRET_KEY, secrets.token_urlsafe(32), "coe's admin key (creates team API keys)"),
        REDIS_SECRET: (REDIS_SECRET_KEY, secrets.token_hex(32), "password of the GCS fault-tolerance Redis"),
        STATE_REDIS_SECRET: (STATE_REDIS_SECRET_KEY, secrets.token_hex(32), "password of coe's state Redis"),
    }
    assert sorted(values) == required_secrets()
    return [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "coe"},
                      "annotations": {"coe.dev/generated-by": "coe k8s secrets", "coe.dev/description": what}},
         "type": "Opaque", "stringData": {key: value}}
        for name, (key, value, what) in sorted(values.items())
    ]


def _redis(name: str, secret: str, maxmemory: str, policy: str, options: ClusterOptions) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "coe"}
    selector = {"app.kubernetes.io/name": name}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]},
    }
    container = {
        "name": "redis",
        "image": options.redis_image_ref(),
        "imagePullPolicy": "IfNotPresent",
        "args": ["--requirepass", "$(REDIS_PASSWORD)", "--appendonly", "yes",
                 "--maxmemory", maxmemory, "--maxmemory-policy", policy],
        "env": [_secret_env("REDIS_PASSWORD", secret, "password")],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"exec": {"command": ["sh", "-c", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG']},
                           "periodSeconds": 5, "timeoutSeconds": 3},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "initialDelaySeconds": 10, "periodSeconds": 10},
        "resources": _resources("1", "1Gi", cpu_request="100m", memory_request="256Mi"),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels},
                         "spec": {"securityContext": _pod_security(REDIS_UID, REDIS_GID), "containers": [container]}},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}},
            }],
        },
    }
    return [service, statefulset]


def redis_objects(options: ClusterOptions | None = None) -> list[dict[str, Any]]:
    """Two Redis, so coe's state can never stop GCS writes: `coe-redis` for GCS fault tolerance (noeviction)
    and `coe-state-redis` for coe's keys, usage counters and rate-limit buckets (volatile-ttl)."""
    opts = options or ClusterOptions()
    return [*_redis(REDIS_NAME, REDIS_SECRET, GCS_REDIS_MAXMEMORY, GCS_REDIS_POLICY, opts),
            *_redis(STATE_REDIS_NAME, STATE_REDIS_SECRET, STATE_REDIS_MAXMEMORY, STATE_REDIS_POLICY, opts)]


def ray_pod_selector(options: ClusterOptions) -> dict[str, str]:
    """Labels of every Ray pod of the RayService (head and workers, of the old and the new cluster)."""
    return {LABEL_APP: options.name}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policies(config: CoeConfig, options: ClusterOptions) -> list[dict[str, Any]]:
    """Ingress NetworkPolicies: Ray pods reach each other (every port) and both Redis; the Ingress controller's
    namespace reaches only the Serve port, the KubeRay operator only the dashboard, Prometheus only the metrics
    ports; nothing else reaches a Ray pod or a Redis."""
    ray = ray_pod_selector(options)
    labels = _labels(options.name, "network-policy")

    def policy(name: str, selector: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "labels": labels},
                "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": rules}}

    ray_rules: list[dict[str, Any]] = [
        {"from": [{"podSelector": {"matchLabels": ray}}]},
        {"from": [{"namespaceSelector": {"matchLabels": dict(options.ingress_namespace_selector)}}],
         "ports": _tcp(config.server.port)},
        {"from": [{"namespaceSelector": {"matchLabels": dict(options.operator_namespace_selector)}}],
         "ports": _tcp(DASHBOARD_PORT)},
    ]
    if options.monitoring_namespace_selector:
        ray_rules.append({"from": [{"namespaceSelector": {"matchLabels": dict(options.monitoring_namespace_selector)}}],
                          "ports": _tcp(METRICS_PORT, AS_METRICS_PORT, DASH_METRICS_PORT)})
    redis_rule = [{"from": [{"podSelector": {"matchLabels": ray}}], "ports": _tcp(REDIS_PORT)}]
    return [
        policy(f"{options.name}-ray", ray, ray_rules),
        policy(f"{options.name}-gcs-redis", {"app.kubernetes.io/name": REDIS_NAME}, redis_rule),
        policy(f"{options.name}-state-redis", {"app.kubernetes.io/name": STATE_REDIS_NAME}, redis_rule),
    ]


def pod_disruption_budgets(config: CoeConfig, options: ClusterOptions) -> list[dict[str, Any]]:
    """The head: no voluntary eviction (a drain waits until you delete it; GCS fault tolerance restores it and
    Serve keeps answering meanwhile). Each worker group: one pod at a time. The Ray autoscaler deletes idle
    pods directly, which PodDisruptionBudgets do not limit."""
    def pdb(component: str, max_unavailable: int) -> dict[str, Any]:
        return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                "metadata": {"name": f"{options.name}-{component}", "labels": _labels(options.name, component)},
                "spec": {"maxUnavailable": max_unavailable,
                         "selector": {"matchLabels": {LABEL_APP: options.name,
                                                      "app.kubernetes.io/component": component}}}}

    return [pdb("ray-head", 0)] + [pdb(f"ray-worker-{p.name}", 1) for p in plan_groups(config, options)]


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


def render_base(options: ClusterOptions | None = None) -> dict[str, str]:
    """Files of ``base/`` (independent of the config; of the options only the Redis image)."""
    head = _header([f"Generated by `coe k8s render` (coe {__version__}). Do not edit: regenerate with",
                    f"`{REGENERATE_CMD}`."])
    board = json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"
    return {
        "base/kustomization.yaml": dump_docs(
            [_kustomization(["redis.yaml", "podmonitor.yaml", "grafana-dashboard.yaml"])], head),
        "base/redis.yaml": dump_docs(redis_objects(options), head),
        "base/podmonitor.yaml": dump_docs(pod_monitors(), head),
        "base/grafana-dashboard.yaml": dump_docs([grafana_dashboard_configmap(board)], head),
        "base/grafana/coe-dashboard.json": board,
    }


def grafana_dashboard_configmap(board_json: str) -> dict[str, Any]:
    """The dashboard as a ConfigMap that Grafana's dashboard sidecar (kube-prometheus-stack: label
    grafana_dashboard=1) loads; its sidecar must watch the overlay's namespace (searchNamespace)."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "coe-grafana-dashboard",
                     "labels": {"app.kubernetes.io/part-of": "coe", "grafana_dashboard": "1"}},
        "data": {"coe-dashboard.json": board_json},
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
        f"Secrets ({', '.join(required_secrets())}) are not in the manifests: create them first with",
        f"`coe k8s secrets --namespace {options.namespace} | kubectl apply -f -`.",
    ])
    resources = ["../../base", "rayservice.yaml", "ingress.yaml", "networkpolicy.yaml", "pdb.yaml"]
    files: dict[str, str] = {}
    files[f"{d}/kustomization.yaml"] = dump_docs([_kustomization(resources, options.namespace)], head)
    files[f"{d}/rayservice.yaml"] = dump_docs([rayservice(config, options, config_ref, profile)], rs_head)
    files[f"{d}/ingress.yaml"] = dump_docs([ingress(config, options)], head)
    files[f"{d}/networkpolicy.yaml"] = dump_docs(network_policies(config, options), head)
    files[f"{d}/pdb.yaml"] = dump_docs(pod_disruption_budgets(config, options), head)
    return dict(sorted(files.items()))


def render_committed() -> dict[str, str]:
    """The whole committed tree under ``k8s/`` (base + the packaged configs' overlays), relative paths."""
    files = render_base(ClusterOptions())  # both committed profiles keep the default Redis image
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
