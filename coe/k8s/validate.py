"""Offline validation of coe's Kubernetes manifests: what `kubectl apply -k` would apply, checked without a cluster.

:func:`validate_tree` resolves a kustomization (resources, namespace, strategic-merge patches) in Python and
checks every object; :func:`validate_objects` checks a list of already-resolved objects. Both return a list of
human-readable problems (empty: valid). The checks:

* RayService / RayCluster against KubeRay's CRD schemas, made strict (an unknown field is an error, where the
  API server would silently prune it), and the operator's own rules (name length and DNS-1035, replicas
  bounds, GCS fault-tolerance and autoscaler-v2 constraints, upgrade strategy).
* Every pod template and every built-in kind against Kubernetes' strict JSON schemas (kubernetes-validate,
  its newest bundled Kubernetes version); PodMonitor/ServiceMonitor against a small strict schema.
* serveConfigV2: unknown keys at every level (Ray's own schema silently ignores e.g. ``num_gpu``), Ray's
  schema types, every ``import_path`` imports and builds with its ``args``, every deployment the app builds
  fits a worker group (and the minimum replicas fit the cluster), the config it carries is not stale.
* coe's rules: autoscaler v2 on, no workloads on the head, GPU groups with GPU limits, tolerations and
  node selectors, requests and limits on every container, the ingress readiness probe, coe's state Redis apart
  from GCS's (and their eviction policies), Secrets and Services referenced exist.
* Access control and hardening: Ray token authentication when the dashboard listens on the pod IP, the admin
  key from a mounted Secret on every Ray pod, NetworkPolicies around the Ray pods and each Redis, hardened
  containers (non-root, no escalation, no capabilities, RuntimeDefault seccomp, read-only root filesystem) with
  writable volumes where they write, no mount hiding a path the coe config reads from the image,
  PodDisruptionBudgets, no credential in plain text; a warning for production images not pinned by digest.

jsonschema and kubernetes_validate are imported lazily (they are test/ops extras).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import importlib.metadata
import json
import math
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from coe.k8s import render as R

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_RAYSERVICE_NAME = 47  # KubeRay: 53 (RayCluster, keeps "-serve-svc" within 63) - 6 (cluster suffix)
MAX_RAYCLUSTER_NAME = 53
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "IngressClass"}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches", "patchesStrategicMerge"}
_MISSING = object()


# ==============================================================================================================
# Locations
# ==============================================================================================================


def shared_data_dir() -> Path:
    """``$COE_SHARED_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("COE_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def default_crd_dir() -> Path:
    """Where KubeRay's CRDs (ray.io_rayservices.yaml, ray.io_rayclusters.yaml) are read from."""
    return shared_data_dir() / "k8s"


def crds_available(crd_dir: Path | None = None) -> bool:
    d = crd_dir or default_crd_dir()
    return (d / "ray.io_rayservices.yaml").is_file() and (d / "ray.io_rayclusters.yaml").is_file()


# ==============================================================================================================
# kustomize (the subset the rendered tree uses; anything else is reported, never silently ignored)
# ==============================================================================================================


class KustomizeError(Exception):
    """A kustomization this resolver cannot build exactly as kustomize would."""


@dataclass
class Obj:
    """A resolved Kubernetes object and the file it came from."""

    doc: dict[str, Any]
    source: str

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", "?"))

    @property
    def name(self) -> str:
        return str((self.doc.get("metadata") or {}).get("name", "?"))

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def _kustomization_file(d: Path) -> Path | None:
    for n in KUSTOMIZATION_FILES:
        if (d / n).is_file():
            return d / n
    return None


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as err:
        raise KustomizeError(f"{path}: invalid YAML: {err}") from None
    out = []
    for i, d in enumerate(docs):
        if d is None:
            continue
        if not isinstance(d, dict):
            raise KustomizeError(f"{path}: document {i} is not a mapping")
        out.append(d)
    return out


def build_kustomization(d: str | Path, _stack: tuple[Path, ...] = ()) -> list[Obj]:
    """The objects `kubectl apply -k d` would apply (resources, namespace, strategic-merge patches)."""
    d = Path(d).resolve()
    if d in _stack:
        raise KustomizeError(f"{d}: kustomization cycle")
    kf = _kustomization_file(d)
    if kf is None:
        raise KustomizeError(f"{d}: no kustomization.yaml")
    k = yaml.safe_load(kf.read_text()) or {}
    unknown = sorted(set(k) - KUSTOMIZE_KEYS)
    if unknown:
        raise KustomizeError(f"{kf}: unsupported kustomization fields {unknown} (the offline resolver supports "
                             f"{sorted(KUSTOMIZE_KEYS)}; keep overlays simple)")
    objs: list[Obj] = []
    for r in k.get("resources") or []:
        if not isinstance(r, str) or "://" in r:
            raise KustomizeError(f"{kf}: remote or non-string resource {r!r} is not supported offline")
        p = (d / r).resolve()
        if p.is_dir():
            objs += build_kustomization(p, _stack + (d,))
        elif p.is_file():
            objs += [Obj(doc, str(p)) for doc in load_yaml_docs(p)]
        else:
            raise KustomizeError(f"{kf}: resource '{r}' does not exist")
    patches = [{"path": p} for p in k.get("patchesStrategicMerge") or []] + list(k.get("patches") or [])
    for patch in patches:
        if not isinstance(patch, dict) or set(patch) - {"path", "patch"} or not (patch.get("path") or patch.get("patch")):
            raise KustomizeError(f"{kf}: only strategic-merge patches given by 'path' or 'patch' are supported: {patch}")
        docs = (load_yaml_docs(d / patch["path"]) if patch.get("path")
                else [x for x in yaml.safe_load_all(patch["patch"]) if x])
        for pd in docs:
            _apply_patch(objs, pd, str(kf))
    ns = k.get("namespace")
    if ns:
        for o in objs:
            if o.kind not in CLUSTER_SCOPED:
                o.doc.setdefault("metadata", {})["namespace"] = ns
    return objs


def _apply_patch(objs: list[Obj], patch: dict[str, Any], where: str) -> None:
    key = (patch.get("apiVersion"), patch.get("kind"), (patch.get("metadata") or {}).get("name"))
    for o in objs:
        if (o.doc.get("apiVersion"), o.kind, o.name) == key:
            o.doc = _smp(o.doc, patch)
            return
    raise KustomizeError(f"{where}: patch target {key[1]}/{key[2]} ({key[0]}) not found")


def _smp(base: Any, patch: Any) -> Any:
    """Strategic merge: maps merge, lists of maps with a 'name' merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(str(k).startswith("$") for k in patch):
            raise KustomizeError(f"strategic-merge directives {[k for k in patch if str(k).startswith('$')]} unsupported")
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _smp(base.get(k, _MISSING), v) if k in base else copy.deepcopy(v)
        return out
    if (isinstance(base, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in base + patch)):
        out_l = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, cur in enumerate(out_l):
                if cur["name"] == item["name"]:
                    out_l[i] = _smp(cur, item)
                    break
            else:
                out_l.append(copy.deepcopy(item))
        return out_l
    return copy.deepcopy(patch)


def kustomization_dirs(root: str | Path) -> list[Path]:
    """`root` itself if it is a kustomization, else every ``overlays/*`` kustomization under it."""
    root = Path(root)
    if _kustomization_file(root):
        return [root]
    return sorted(p for p in (root / "overlays").glob("*") if p.is_dir() and _kustomization_file(p))


# ==============================================================================================================
# JSON schemas: KubeRay CRDs made strict, Kubernetes' built-in schemas
# ==============================================================================================================


def strict_schema(schema: Any) -> Any:
    """A copy of a CRD's openAPIV3Schema where unknown fields are errors (the API server prunes them).

    * ``additionalProperties: false`` wherever ``properties`` is given without ``additionalProperties`` or
      ``x-kubernetes-preserve-unknown-fields``;
    * ``x-kubernetes-embedded-resource`` objects also allow apiVersion, kind and metadata;
    * ``x-kubernetes-int-or-string`` without a type becomes integer-or-string;
    * ``nullable`` admits null; ``format: int32/int64`` gets its range; ``x-kubernetes-list-type: set`` gets
      unique items (``map`` lists are checked by the validator's ``x-kubernetes-list-map-keys`` keyword).
    """
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: strict_schema(v) for k, v in schema.items()}
    preserve = s.get("x-kubernetes-preserve-unknown-fields") is True
    if s.get("x-kubernetes-embedded-resource"):
        props = s.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in s and "additionalProperties" not in s and not preserve:
        s["additionalProperties"] = False
    if s.get("x-kubernetes-int-or-string") and "type" not in s and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("type") == "integer" and s.get("format") in ("int32", "int64"):
        bits = 31 if s["format"] == "int32" else 63
        s.setdefault("minimum", -(2**bits))
        s.setdefault("maximum", 2**bits - 1)
    if s.get("x-kubernetes-list-type") == "set":
        s.setdefault("uniqueItems", True)
    return s


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """``x-kubernetes-list-type: map``: the items' key tuples must be unique (e.g. container names, ports)."""
    import jsonschema

    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple[Any, ...], int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        k = tuple(item.get(x) for x in keys)
        if k in seen:
            yield jsonschema.ValidationError(
                f"duplicate entry {dict(zip(keys, k, strict=True))} (items {seen[k]} and {i}); keys {keys} must be unique")
        seen[k] = i


@functools.lru_cache(maxsize=8)
def _k8s_validator_class() -> Any:
    import jsonschema

    return jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


@functools.lru_cache(maxsize=8)
def crd_validator(crd_dir: str, plural: str, part: str = "") -> Any:
    """A strict validator for version v1 of ``ray.io_<plural>.yaml`` (part "spec": its spec only)."""
    path = Path(crd_dir) / f"ray.io_{plural}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if "v1" not in versions:
        raise KustomizeError(f"{path}: no v1 version")
    schema = versions["v1"]["schema"]["openAPIV3Schema"]
    if part:
        schema = schema["properties"][part]
    return _k8s_validator_class()(strict_schema(schema))


def crd_version_info(crd_dir: str | Path, plural: str) -> dict[str, bool]:
    """{version: served and storage} of a CRD file (for the report)."""
    path = Path(crd_dir) / f"ray.io_{plural}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {v["name"]: bool(v.get("served")) and bool(v.get("storage")) for v in crd["spec"]["versions"]}


def _path(parts: Iterable[Any], prefix: str = "") -> str:
    out = prefix
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def _schema_errors(validator: Any, instance: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(path, message) pairs; unknown fields are named one by one with a suggestion."""
    out: list[tuple[str, str]] = []
    for err in validator.iter_errors(instance):
        path = _path(err.absolute_path, prefix)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted((err.schema.get("properties") or {}).keys())
            for extra in sorted(set(err.instance) - set(allowed)):
                hint = difflib.get_close_matches(str(extra), allowed, n=1)
                out.append((f"{path}.{extra}" if path != "<root>" else str(extra),
                            "unknown field" + (f" (did you mean '{hint[0]}'?)" if hint else "")))
        elif err.validator == "required":
            out.append((path, err.message.replace(" is a required property", " is required")))
        else:
            msg = err.message
            out.append((path, msg if len(msg) < 300 else msg[:300] + "..."))
    return out


@functools.lru_cache(maxsize=1)
def k8s_version() -> str:
    """The newest Kubernetes version kubernetes-validate bundles schemas for."""
    import kubernetes_validate.utils as kvu

    return str(kvu.latest_version())


@functools.lru_cache(maxsize=64)
def k8s_validator(kind: str, api_version: str) -> Any | None:
    """Strict validator for a built-in kind from kubernetes-validate's newest bundled schemas (None: unknown)."""
    import jsonschema
    import kubernetes_validate.utils as kvu
    from referencing import Registry, Resource

    version = k8s_version()
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kvu.schema_contents(f"{schema_dir}/{kind.lower()}-{api}.json", version)
    except FileNotFoundError:
        return None
    defs = kvu.schema_contents(f"{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def k8s_schema_errors(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, str]] | None:
    """Strict built-in schema errors for `doc` (None when kubernetes-validate has no schema for its kind)."""
    v = k8s_validator(str(doc.get("kind")), str(doc.get("apiVersion")))
    if v is None:
        return None
    return _schema_errors(v, doc, prefix)


# Prometheus Operator kinds are CRDs too; a small strict schema of the fields coe uses catches typos.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                    "required": ["key", "operator"], "properties": {
                                                        "key": {"type": "string"}, "operator": {"type": "string"},
                                                        "values": {"type": "array", "items": {"type": "string"}}}}}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"type": "string", "enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                                          "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                                          "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                                          "dropequal", "DropEqual"]},
    "sourceLabels": {"type": "array", "items": {"type": "string"}}, "separator": {"type": "string"},
    "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "modulus": {"type": "integer"},
    "replacement": {"type": "string"}}}
_ENDPOINT = {"type": "object", "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "portNumber": {"type": "integer"}, "targetPort": {"type": ["integer", "string"]},
    "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
    "honorTimestamps": {"type": "boolean"}, "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL}}}
MONITOR_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
                  "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"enum": ["PodMonitor", "ServiceMonitor"]},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
        "jobLabel": {"type": "string"}, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabels": {"type": "array", "items": {"type": "string"}}, "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
            "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        "sampleLimit": {"type": "integer"}}}}}


# ==============================================================================================================
# Quantities and resources
# ==============================================================================================================

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$")


def parse_quantity(q: Any) -> float:
    """A Kubernetes quantity ("500m", "8Gi", 2) as a float (cores, bytes, count)."""
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        return float(q)
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    num, exp, suffix = m.groups()
    return float(num) * (10 ** int(exp[1:]) if exp else _SUFFIX[suffix or ""])


def _gib(b: float) -> str:
    return f"{b / 2**30:.3g} GiB"


@dataclass
class Supply:
    """What one pod of a worker group offers to Ray."""

    name: str
    cpus: float
    gpus: float
    memory: float  # bytes Ray can hand to replicas (object store excluded)
    custom: dict[str, float]
    min_pods: int
    max_pods: int

    def describe(self) -> str:
        extra = "".join(f", {v:g} {k}" for k, v in sorted(self.custom.items()))
        return f"{self.name}: {self.cpus:g} CPU, {self.gpus:g} GPU, {_gib(self.memory)}{extra} x{self.max_pods}"


@dataclass
class Demand:
    """One deployment's per-replica needs as the built app (plus serveConfigV2 overrides) asks for them."""

    name: str
    cpus: float
    gpus: float
    memory: float
    custom: dict[str, float]
    min_replicas: int
    max_replicas: int

    def describe(self) -> str:
        extra = "".join(f", {v:g} {k}" for k, v in sorted(self.custom.items()))
        mem = f", {_gib(self.memory)}" if self.memory else ""
        return f"{self.cpus:g} CPU, {self.gpus:g} GPU{mem}{extra}"


def _container_res(c: dict[str, Any], key: str) -> Any:
    res = c.get("resources") or {}
    return (res.get("limits") or {}).get(key, (res.get("requests") or {}).get(key))


def _gpu_count(c: dict[str, Any]) -> float:
    res = c.get("resources") or {}
    total = 0.0
    for k, v in {**(res.get("requests") or {}), **(res.get("limits") or {})}.items():
        if k.endswith("/gpu"):
            try:
                total = max(total, parse_quantity(v))
            except ValueError:
                pass
    return total


def group_supply(group: dict[str, Any], name: str, head: bool = False) -> Supply:
    """Ray resources of one pod, as KubeRay derives them (rayStartParams > group resources > container limits)."""
    rsp = {str(k): str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    gres = {str(k): v for k, v in (group.get("resources") or {}).items()}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    c = containers[0] if isinstance(containers[0], dict) else {}

    def pick(param: str, res_key: str, fallback: Callable[[], float]) -> float:
        try:
            if param in rsp:
                return float(rsp[param])
            if res_key in gres:
                return parse_quantity(gres[res_key])
            return fallback()
        except ValueError:
            return 0.0

    def cpu_limit() -> float:
        q = _container_res(c, "cpu")
        return float(math.ceil(parse_quantity(q))) if q is not None else 0.0

    def mem_limit() -> float:
        q = _container_res(c, "memory")
        return parse_quantity(q) if q is not None else 0.0

    cpus = pick("num-cpus", "CPU", cpu_limit)
    gpus = pick("num-gpus", "GPU", lambda: _gpu_count(c))
    memory = pick("memory", "memory", mem_limit) * R.RAY_MEMORY_FRACTION
    custom: dict[str, float] = {}
    if "resources" in rsp:
        try:
            custom.update({k: float(v) for k, v in json.loads(rsp["resources"].strip("'\"")).items()})
        except (ValueError, AttributeError):
            pass
    for k, v in gres.items():
        if k not in ("CPU", "GPU", "memory"):
            try:
                custom[k] = parse_quantity(v)
            except ValueError:
                pass
    if head:
        return Supply(name, cpus, gpus, memory, custom, 1, 1)
    return Supply(name, cpus, gpus, memory, custom, int(group.get("minReplicas") or 0),
                  int(group.get("maxReplicas") or 0))


def _fits(d: Demand, s: Supply) -> bool:
    eps = 1e-9
    return (d.cpus <= s.cpus + eps and d.gpus <= s.gpus + eps and d.memory <= s.memory + eps
            and all(v <= s.custom.get(k, 0.0) + eps for k, v in d.custom.items()))


# ==============================================================================================================
# serveConfigV2
# ==============================================================================================================


@functools.lru_cache(maxsize=1)
def _serve_key_tree() -> dict[str, Any]:
    """Allowed keys per level of a Serve config, read from Ray's own schema models (so they follow Ray)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        LoggingConfig,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    def keys(m: Any) -> set[str]:
        return set(m.model_fields)

    logging_keys = keys(LoggingConfig)
    return {
        "": keys(ServeDeploySchema),
        "http_options": keys(HTTPOptionsSchema),
        "grpc_options": keys(gRPCOptionsSchema),
        "logging_config": logging_keys,
        "applications[]": keys(ServeApplicationSchema),
        "applications[].logging_config": logging_keys,
        "applications[].deployments[]": keys(DeploymentSchema),
        "applications[].deployments[].ray_actor_options": keys(RayActorOptionsSchema),
        "applications[].deployments[].autoscaling_config": keys(AutoscalingConfig),
        "applications[].deployments[].logging_config": logging_keys,
    }


def serve_unknown_keys(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """Keys Ray Serve's schema does not define, at every level coe cares about (Ray drops them silently)."""
    tree = _serve_key_tree()
    out: list[tuple[str, str]] = []

    def check(obj: Any, level: str, path: str) -> None:
        if not isinstance(obj, dict):
            return
        allowed = tree[level]
        for k in obj:
            if k not in allowed:
                hint = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                out.append((f"{path}.{k}" if path else str(k),
                            "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + " - Ray's schema would silently ignore it"))
        for k, v in obj.items():
            sub = f"{level}.{k}" if level else k
            if isinstance(v, list) and f"{sub}[]" in tree:
                for i, item in enumerate(v):
                    check(item, f"{sub}[]", f"{path}.{k}[{i}]" if path else f"{k}[{i}]")
            elif sub in tree:
                check(v, sub, f"{path}.{k}" if path else k)

    check(cfg, "", "")
    return out


def _import_target(import_path: str) -> Any:
    if ":" in import_path:
        mod, attr = import_path.split(":", 1)
    else:
        mod, _, attr = import_path.rpartition(".")
    if not mod or not attr:
        raise ImportError(f"'{import_path}' is not 'module:attribute'")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError:
        if str(REPO_ROOT) in sys.path:
            raise
        sys.path.insert(0, str(REPO_ROOT))
        module = importlib.import_module(mod)
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def _demands_from_app(app: Any, app_name: str) -> list[Demand]:
    """Every deployment the application builds (ingress, experts, controller ...), via Ray's own builder."""
    from ray.serve._private.build_app import build_app as ray_build_app

    built = ray_build_app(app, name=app_name)
    out = []
    for dep in built.deployments:
        opts = dict(dep.ray_actor_options or {})
        cfg = dep._deployment_config
        auto = cfg.autoscaling_config
        lo, hi = (auto.min_replicas, auto.max_replicas) if auto else (cfg.num_replicas, cfg.num_replicas)
        out.append(Demand(dep.name, float(opts.get("num_cpus", 1) if opts.get("num_cpus") is not None else 1),
                          float(opts.get("num_gpus") or 0), float(opts.get("memory") or 0),
                          {k: float(v) for k, v in (opts.get("resources") or {}).items()}, int(lo or 0), int(hi or 0)))
    return out


def _apply_overrides(demands: list[Demand], overrides: list[Any], where: str, problems: list[str]) -> None:
    by_name = {d.name: d for d in demands}
    for i, o in enumerate(overrides):
        if not isinstance(o, dict):
            continue
        name = o.get("name")
        d = by_name.get(str(name))
        if d is None:
            problems.append(f"{where}.deployments[{i}].name: '{name}' is not a deployment of the application "
                            f"(it builds {sorted(by_name)})")
            continue
        rao = o.get("ray_actor_options")
        if isinstance(rao, dict):
            if "num_cpus" in rao and rao["num_cpus"] is not None:
                d.cpus = float(rao["num_cpus"])
            if "num_gpus" in rao and rao["num_gpus"] is not None:
                d.gpus = float(rao["num_gpus"])
            if rao.get("memory"):
                d.memory = float(rao["memory"])
            if isinstance(rao.get("resources"), dict):
                d.custom = {k: float(v) for k, v in rao["resources"].items()}
        if isinstance(o.get("num_replicas"), int):
            d.min_replicas = d.max_replicas = o["num_replicas"]
        auto = o.get("autoscaling_config")
        if isinstance(auto, dict):
            d.min_replicas = int(auto.get("min_replicas", d.min_replicas))
            d.max_replicas = int(auto.get("max_replicas", d.max_replicas))


def _first_diffs(a: Any, b: Any, path: str = "", limit: int = 5) -> list[str]:
    out: list[str] = []

    def walk(x: Any, y: Any, p: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                walk(x.get(k, _MISSING), y.get(k, _MISSING), f"{p}.{k}" if p else str(k))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{p}[{i}]")
        elif x != y:
            fmt = lambda v: "<absent>" if v is _MISSING else json.dumps(v)[:60]
            out.append(f"{p or '<root>'}: manifest {fmt(x)} != config {fmt(y)}")

    walk(a, b, path)
    return out


def _resolve_config_ref(ref: str, base_dirs: Iterable[Path]) -> Path | None:
    from coe.config import PACKAGED_CONFIGS, packaged_config_path

    if ref in PACKAGED_CONFIGS:
        return packaged_config_path(ref)
    for b in base_dirs:
        p = (b / ref) if not Path(ref).is_absolute() else Path(ref)
        if p.is_file():
            return p
    return None


# ==============================================================================================================
# Checks
# ==============================================================================================================


@dataclass
class Context:
    objs: list[Obj]
    crd_dir: Path | None
    config_dirs: list[Path]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    external_secrets: set[str] = field(default_factory=set)

    def add(self, obj: Obj | None, where: str, msg: str) -> None:
        self._put(self.problems, obj, where, msg)

    def warn(self, obj: Obj | None, where: str, msg: str) -> None:
        self._put(self.warnings, obj, where, msg)

    @staticmethod
    def _put(out: list[str], obj: Obj | None, where: str, msg: str) -> None:
        ref = f"{obj.ref}: " if obj is not None else ""
        loc = f"{where}: " if where else ""
        line = f"{ref}{loc}{msg}"
        if line not in out:
            out.append(line)


def _containers(pod_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key in ("initContainers", "containers"):
        for i, c in enumerate(pod_spec.get(key) or []):
            if isinstance(c, dict):
                out.append((f"{key}[{i}]", c))
    return out


def _check_requests_limits(ctx: Context, obj: Obj, where: str, resources: Any, *, gpu_hint: bool = False) -> None:
    res = resources if isinstance(resources, dict) else {}
    for part in ("requests", "limits"):
        got = res.get(part) or {}
        missing = [r for r in ("cpu", "memory") if r not in got]
        if missing:
            ctx.add(obj, f"{where}.resources.{part}", f"missing {', '.join(missing)} (every container needs "
                                                       "requests and limits)")
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for k in set(req) | set(lim):
        if "/" in k and k not in ("ephemeral-storage",):  # extended resources (nvidia.com/gpu ...)
            if k not in lim:
                ctx.add(obj, f"{where}.resources.limits", f"extended resource {k} must be set in limits")
            elif k in req and str(req[k]) != str(lim[k]):
                ctx.add(obj, f"{where}.resources", f"{k} requests ({req[k]}) must equal limits ({lim[k]})")


def _pod_template_problems(ctx: Context, obj: Obj, template: Any, where: str) -> None:
    if not isinstance(template, dict):
        return
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    for path, msg in k8s_schema_errors(doc) or []:
        path = path.replace("template", where, 1) if path.startswith("template") else f"{where}.{path}"
        ctx.add(obj, path, f"{msg} [Kubernetes {k8s_version()} PodTemplate schema]")
    spec = template.get("spec") or {}
    for cwhere, c in _containers(spec):
        _check_requests_limits(ctx, obj, f"{where}.spec.{cwhere}", c.get("resources"))


def _env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e.get("name"): e for e in c.get("env") or [] if isinstance(e, dict)}


def _secret_refs(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, secret name) of every non-optional Secret reference in a manifest subtree."""
    if isinstance(node, dict):
        for key in ("secretKeyRef", "secretRef"):
            ref = node.get(key)
            if isinstance(ref, dict) and ref.get("name") and not ref.get("optional"):
                yield f"{path}.{key}", str(ref["name"])
        sec = node.get("secret")
        if isinstance(sec, dict) and sec.get("secretName") and not sec.get("optional"):
            yield f"{path}.secret", str(sec["secretName"])
        for k, v in node.items():
            yield from _secret_refs(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _secret_refs(v, f"{path}[{i}]")


def _is_ray(obj: Obj) -> bool:
    return str(obj.doc.get("apiVersion", "")).startswith("ray.io/")


def check_rayservice(ctx: Context, obj: Obj) -> None:
    doc = obj.doc
    name = obj.name
    if doc.get("apiVersion") != "ray.io/v1":
        ctx.add(obj, "apiVersion", f"'{doc.get('apiVersion')}' is not ray.io/v1 (KubeRay {R.KUBERAY_VERSION} stores v1)")
    # KubeRay's ValidateRayServiceMetadata
    if len(name) > MAX_RAYSERVICE_NAME:
        ctx.add(obj, "metadata.name", f"RayService name is {len(name)} characters; KubeRay allows at most "
                                      f"{MAX_RAYSERVICE_NAME} (it appends a 6-character suffix for the RayCluster)")
    if not DNS1035.match(name) or len(name) > 63:
        ctx.add(obj, "metadata.name", f"'{name}' is not a DNS-1035 label (lowercase letters, digits and '-', "
                                      "starting with a letter, ending with a letter or digit)")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        ctx.add(obj, "spec", "missing")
        return
    if ctx.crd_dir is not None:
        errs = set(_schema_errors(crd_validator(str(ctx.crd_dir), "rayservices"), doc))
        rc = spec.get("rayClusterConfig")
        if isinstance(rc, dict):
            errs |= set(_schema_errors(crd_validator(str(ctx.crd_dir), "rayclusters", "spec"), rc,
                                       "spec.rayClusterConfig"))
        for path, msg in sorted(errs):
            ctx.add(obj, path, f"{msg} [KubeRay CRD, strict]")
    ut = (spec.get("upgradeStrategy") or {}).get("type")
    if ut is not None and ut not in UPGRADE_TYPES:
        ctx.add(obj, "spec.upgradeStrategy.type", f"'{ut}' is not one of {', '.join(UPGRADE_TYPES)}")
    if ut == "NewClusterWithIncrementalUpgrade":
        opts = (spec.get("upgradeStrategy") or {}).get("clusterUpgradeOptions")
        if not isinstance(opts, dict) or not opts.get("gatewayClassName"):
            ctx.add(obj, "spec.upgradeStrategy.clusterUpgradeOptions",
                    "NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions with gatewayClassName")
    rc = spec.get("rayClusterConfig")
    if not isinstance(rc, dict):
        ctx.add(obj, "spec.rayClusterConfig", "missing")
        return
    head_svc = ((rc.get("headGroupSpec") or {}).get("headService") or {}).get("metadata", {}) or {}
    if head_svc.get("name"):
        ctx.add(obj, "spec.rayClusterConfig.headGroupSpec.headService.metadata.name", "must not be set in a RayService")
    supplies = check_raycluster_spec(ctx, obj, rc, "spec.rayClusterConfig")
    check_serve_config(ctx, obj, spec, rc, supplies)


def check_raycluster(ctx: Context, obj: Obj) -> None:
    name = obj.name
    if len(name) > MAX_RAYCLUSTER_NAME or not DNS1035.match(name):
        ctx.add(obj, "metadata.name", f"RayCluster name must be a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} characters")
    spec = obj.doc.get("spec")
    if not isinstance(spec, dict):
        ctx.add(obj, "spec", "missing")
        return
    if ctx.crd_dir is not None:
        for path, msg in _schema_errors(crd_validator(str(ctx.crd_dir), "rayclusters"), obj.doc):
            ctx.add(obj, path, f"{msg} [KubeRay CRD, strict]")
    check_raycluster_spec(ctx, obj, spec, "spec")


def check_raycluster_spec(ctx: Context, obj: Obj, rc: dict[str, Any], where: str) -> list[Supply]:
    """KubeRay's ValidateRayClusterSpec rules plus coe's; returns the worker groups' supplies."""
    rv = rc.get("rayVersion")
    installed = importlib.metadata.version("ray")
    if rv != installed:
        ctx.add(obj, f"{where}.rayVersion", f"'{rv}' but coe is built for Ray {installed} (the image must carry it)")
    autoscaling = rc.get("enableInTreeAutoscaling") is True
    aopts = rc.get("autoscalerOptions") or {}
    if not autoscaling:
        ctx.add(obj, f"{where}.enableInTreeAutoscaling", "must be true (coe scales replicas; the Ray autoscaler "
                                                         "must add and remove pods)")
    elif aopts.get("version") != "v2":
        ctx.add(obj, f"{where}.autoscalerOptions.version", "must be 'v2' (autoscaler v2)")
    if autoscaling:
        _check_requests_limits(ctx, obj, f"{where}.autoscalerOptions", aopts.get("resources"))
        if isinstance(aopts.get("idleTimeoutSeconds"), int) and aopts["idleTimeoutSeconds"] < 0:
            ctx.add(obj, f"{where}.autoscalerOptions.idleTimeoutSeconds", "must be non-negative")

    head = rc.get("headGroupSpec") or {}
    head_t = head.get("template") or {}
    head_spec = head_t.get("spec") or {}
    head_cs = head_spec.get("containers") or []
    if not head_cs:
        ctx.add(obj, f"{where}.headGroupSpec.template.spec.containers", "the head needs at least one container")
        head_c: dict[str, Any] = {}
    else:
        head_c = head_cs[0] if isinstance(head_cs[0], dict) else {}
    _pod_template_problems(ctx, obj, head_t, f"{where}.headGroupSpec.template")
    _group_rules(ctx, obj, head, f"{where}.headGroupSpec", "Head")
    head_supply = group_supply(head, "head", head=True)
    if head_supply.cpus > 0 or head_supply.gpus > 0:
        ctx.add(obj, f"{where}.headGroupSpec.rayStartParams",
                f"the head offers {head_supply.cpus:g} CPU / {head_supply.gpus:g} GPU to Ray: set num-cpus: '0' "
                "(and no GPUs) so no coe replica runs on the head")
    head_env = _env(head_c)
    check_ray_auth(ctx, obj, rc, where)
    gcs = rc.get("gcsFaultToleranceOptions")
    if not isinstance(gcs, dict):
        ctx.add(obj, f"{where}.gcsFaultToleranceOptions", "missing: GCS fault tolerance with external Redis is required")
    else:
        if not gcs.get("redisAddress"):
            ctx.add(obj, f"{where}.gcsFaultToleranceOptions.redisAddress", "missing")
        pw = gcs.get("redisPassword") or {}
        if not ((pw.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
            ctx.add(obj, f"{where}.gcsFaultToleranceOptions.redisPassword",
                    "must come from a Secret (valueFrom.secretKeyRef), never a literal value")
        if "redis-password" in (head.get("rayStartParams") or {}):
            ctx.add(obj, f"{where}.headGroupSpec.rayStartParams.redis-password",
                    "cannot be set with gcsFaultToleranceOptions (use redisPassword)")
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if var in head_env:
                ctx.add(obj, f"{where}.headGroupSpec.template.spec.containers[0].env",
                        f"{var} cannot be set with gcsFaultToleranceOptions")
    if "RAY_enable_autoscaler_v2" in head_env and aopts.get("version"):
        ctx.add(obj, f"{where}.headGroupSpec.template.spec.containers[0].env",
                "RAY_enable_autoscaler_v2 and autoscalerOptions.version are both set; use only the latter")
    v2 = autoscaling and (aopts.get("version") == "v2" or "RAY_enable_autoscaler_v2" in head_env)
    if v2 and head_spec.get("restartPolicy") not in (None, "", "Never"):
        ctx.add(obj, f"{where}.headGroupSpec.template.spec.restartPolicy", "must be Never or unset with autoscaler v2")

    supplies: list[Supply] = []
    names: set[str] = set()
    groups = rc.get("workerGroupSpecs") or []
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g, dict):
            continue
        gname = str(g.get("groupName", ""))
        if not gname:
            ctx.add(obj, f"{gw}.groupName", "missing")
        elif gname in names:
            ctx.add(obj, f"{gw}.groupName", f"duplicate group name '{gname}'")
        names.add(gname)
        t = g.get("template") or {}
        tspec = t.get("spec") or {}
        if not tspec.get("containers"):
            ctx.add(obj, f"{gw}.template.spec.containers", "a worker group needs at least one container")
        lo, hi, rep = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            ctx.add(obj, gw, "minReplicas and maxReplicas are required when autoscaling is disabled")
        if isinstance(lo, int) and lo < 0:
            ctx.add(obj, f"{gw}.minReplicas", f"negative ({lo})")
        if isinstance(hi, int) and hi < 0:
            ctx.add(obj, f"{gw}.maxReplicas", f"negative ({hi})")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            ctx.add(obj, gw, f"worker group {gname} has minReplicas {lo} greater than maxReplicas {hi}")
        elif isinstance(rep, int) and isinstance(lo, int) and isinstance(hi, int) and not lo <= rep <= hi:
            ctx.add(obj, f"{gw}.replicas", f"{rep} is outside [minReplicas {lo}, maxReplicas {hi}]")
        if autoscaling and g.get("suspend"):
            ctx.add(obj, f"{gw}.suspend", "a worker group cannot be suspended with the autoscaler enabled")
        if v2 and tspec.get("restartPolicy") not in (None, "", "Never"):
            ctx.add(obj, f"{gw}.template.spec.restartPolicy", "must be Never or unset with autoscaler v2")
        if isinstance(g.get("idleTimeoutSeconds"), int) and not (autoscaling and aopts.get("version") == "v2"):
            ctx.add(obj, f"{gw}.idleTimeoutSeconds", "is only supported with autoscaler v2")
        _pod_template_problems(ctx, obj, t, f"{gw}.template")
        _group_rules(ctx, obj, g, gw, gname)
        s = group_supply(g, gname)
        supplies.append(s)
        _gpu_group_rules(ctx, obj, g, gw, s)
    if not groups:
        ctx.add(obj, f"{where}.workerGroupSpecs", "no worker groups: coe's replicas have nowhere to run")
    return supplies


def _group_rules(ctx: Context, obj: Obj, g: dict[str, Any], where: str, gname: str) -> None:
    rsp = g.get("rayStartParams") or {}
    if any(k in rsp for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
        ctx.add(obj, where, f"resources set in both rayStartParams and resources for group {gname}; use one")
    if "labels" in rsp:
        ctx.add(obj, f"{where}.rayStartParams.labels", "not supported; use the group's top-level labels field")
    for k, v in rsp.items():
        if not isinstance(v, str):
            ctx.add(obj, f"{where}.rayStartParams.{k}", f"values must be strings (got {v!r})")


def _gpu_group_rules(ctx: Context, obj: Obj, g: dict[str, Any], where: str, s: Supply) -> None:
    t = g.get("template") or {}
    spec = t.get("spec") or {}
    cs = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    k8s_gpus = max((_gpu_count(c) for c in cs), default=0.0)
    if s.gpus > 0 and k8s_gpus == 0:
        ctx.add(obj, where, f"group offers {s.gpus:g} GPU to Ray but its container has no nvidia.com/gpu limit")
    if k8s_gpus > 0:
        tol = spec.get("tolerations") or []
        if not any(isinstance(x, dict) and (str(x.get("key", "")).endswith("/gpu")
                                            or (not x.get("key") and x.get("operator") == "Exists")) for x in tol):
            ctx.add(obj, f"{where}.template.spec.tolerations", "GPU group without a toleration for the GPU taint "
                                                               "(key nvidia.com/gpu)")
        if not spec.get("nodeSelector") and not ((spec.get("affinity") or {}).get("nodeAffinity")):
            ctx.add(obj, f"{where}.template.spec.nodeSelector", "GPU group without a node selector / node affinity")


def _serve_port(cfg: dict[str, Any]) -> int:
    """http_options.port (Ray's default 8000; a bad value is reported by the Serve schema check)."""
    http = cfg.get("http_options") if isinstance(cfg, dict) else None
    try:
        return int((http or {}).get("port", 8000)) if isinstance(http, dict) else 8000
    except (TypeError, ValueError):
        return 8000


def _port_numbers(c: dict[str, Any]) -> dict[str, int]:
    return {str(p.get("name")): int(p.get("containerPort", 0)) for p in c.get("ports") or []
            if isinstance(p, dict) and p.get("name")}


def check_serve_config(ctx: Context, obj: Obj, spec: dict[str, Any], rc: dict[str, Any],
                       supplies: list[Supply]) -> None:
    where = "spec.serveConfigV2"
    text = spec.get("serveConfigV2")
    if not text or not isinstance(text, str):
        ctx.add(obj, where, "missing: the RayService would deploy no application")
        return
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        ctx.add(obj, where, f"invalid YAML: {err}")
        return
    if not isinstance(cfg, dict):
        ctx.add(obj, where, "must be a YAML mapping (a Serve config)")
        return
    for path, msg in serve_unknown_keys(cfg):
        ctx.add(obj, f"{where}: {path}", msg)
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as err:
        for e in err.errors():
            ctx.add(obj, f"{where}: " + ".".join(str(x) for x in e["loc"]), f"{e['msg']} [Ray Serve schema]")
    except Exception as err:  # noqa: BLE001 - Ray's validators raise ValueError too
        ctx.add(obj, where, f"Ray Serve rejects it: {err}")

    port = _serve_port(cfg)
    _check_ports(ctx, obj, spec, rc, port)
    demands: list[Demand] = []
    apps = cfg.get("applications") or []
    if not apps:
        ctx.add(obj, f"{where}: applications", "no application")
    for i, app in enumerate(apps if isinstance(apps, list) else []):
        aw = f"{where}: applications[{i}]"
        if not isinstance(app, dict):
            continue
        app_demands = _check_application(ctx, obj, app, aw)
        if app_demands is not None:
            probs: list[str] = []
            _apply_overrides(app_demands, app.get("deployments") or [], aw, probs)
            for p in probs:
                ctx.add(obj, "", p)
            demands += app_demands
    _check_fit(ctx, obj, demands, supplies)


def _check_ports(ctx: Context, obj: Obj, spec: dict[str, Any], rc: dict[str, Any], port: int) -> None:
    groups = [("spec.rayClusterConfig.headGroupSpec", rc.get("headGroupSpec") or {})]
    groups += [(f"spec.rayClusterConfig.workerGroupSpecs[{i}]", g) for i, g in enumerate(rc.get("workerGroupSpecs") or [])
               if isinstance(g, dict)]
    for gw, g in groups:
        cs = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        if not cs or not isinstance(cs[0], dict):
            continue
        got = _port_numbers(cs[0]).get(R.SERVE_PORT_NAME)
        if got is not None and got != port:
            ctx.add(obj, f"{gw}.template.spec.containers[0].ports",
                    f"port '{R.SERVE_PORT_NAME}' is {got} but serveConfigV2 http_options.port is {port}")
    ss = spec.get("serveService")
    if isinstance(ss, dict):
        sdoc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "check", **(ss.get("metadata") or {})},
                **{k: v for k, v in ss.items() if k != "metadata"}}
        for path, msg in k8s_schema_errors(sdoc) or []:
            ctx.add(obj, f"spec.serveService.{path}", f"{msg} [Kubernetes {k8s_version()} Service schema]")
        ports = ((ss.get("spec") or {}).get("ports") or [])
        if ports and not any(isinstance(p, dict) and p.get("port") == port for p in ports):
            ctx.add(obj, "spec.serveService.spec.ports", f"no port {port} (the Serve HTTP port)")


def _check_application(ctx: Context, obj: Obj, app: dict[str, Any], aw: str) -> list[Demand] | None:
    import_path = app.get("import_path")
    if not isinstance(import_path, str):
        ctx.add(obj, f"{aw}.import_path", "missing")
        return None
    try:
        target = _import_target(import_path)
    except Exception as err:  # noqa: BLE001 - report any import failure
        ctx.add(obj, f"{aw}.import_path", f"'{import_path}' does not import: {type(err).__name__}: {err}")
        return None
    args = app.get("args") or {}
    if not isinstance(args, dict):
        ctx.add(obj, f"{aw}.args", "must be a mapping")
        return None
    module = sys.modules.get(getattr(target, "__module__", ""), None)
    args_model = getattr(module, "AppArgs", None) if module else None
    if args_model is not None and hasattr(args_model, "model_validate"):
        from pydantic import ValidationError

        try:
            args_model.model_validate(args)
        except ValidationError as err:
            for e in err.errors():
                loc = ".".join(str(x) for x in e["loc"])
                msg = f"unknown key '{e['loc'][-1]}'" if e["type"] == "extra_forbidden" else e["msg"]
                ctx.add(obj, f"{aw}.args.{loc}", f"{msg} [{args_model.__name__}]")
            return None
    _check_config_inline(ctx, obj, args, aw)
    try:
        from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

        application = call_user_app_builder_with_args_if_necessary(target, args)
        return _demands_from_app(application, str(app.get("name") or "app"))
    except Exception as err:  # noqa: BLE001 - the builder's own error is the message
        msg = getattr(err, "message", None) or str(err)
        ctx.add(obj, f"{aw}", f"'{import_path}' does not build with these args: {type(err).__name__}: {msg}")
        return None


def _check_config_inline(ctx: Context, obj: Obj, args: dict[str, Any], aw: str) -> None:
    payload = args.get("config_inline")
    if not isinstance(payload, dict):
        return
    ann = (obj.doc.get("metadata") or {}).get("annotations") or {}
    sha = ann.get(R.ANN_CONFIG_SHA)
    regen = f"regenerate with `{R.REGENERATE_CMD}`" if ann.get(R.ANN_CONFIG) in R.COMMITTED_OVERLAYS.values() \
        else "regenerate with `coe k8s render`"
    if sha and sha != R.config_sha256(payload):
        ctx.add(obj, f"{aw}.args.config_inline", f"edited by hand: it does not match annotation {R.ANN_CONFIG_SHA} "
                                                f"- change the coe config instead and {regen}")
    ref = ann.get(R.ANN_CONFIG)
    if not ref:
        return
    path = _resolve_config_ref(str(ref), ctx.config_dirs)
    if path is None:
        return
    from coe.config import load_config
    from coe.errors import ConfigError

    try:
        current = R.config_payload(load_config(path))
    except ConfigError as err:
        ctx.add(obj, f"metadata.annotations.{R.ANN_CONFIG}", f"config '{ref}' does not load: {err.message}")
        return
    if current != payload:
        diffs = "; ".join(_first_diffs(payload, current))
        ctx.add(obj, f"{aw}.args.config_inline", f"stale: differs from the coe config '{ref}' ({diffs}) - {regen}")


def _check_fit(ctx: Context, obj: Obj, demands: list[Demand], supplies: list[Supply]) -> None:
    usable = [s for s in supplies if s.max_pods > 0]
    listing = "; ".join(s.describe() for s in supplies) or "none"
    for d in demands:
        if d.cpus == 0 and d.gpus == 0 and not d.custom:
            ctx.add(obj, "spec.serveConfigV2", f"deployment '{d.name}' asks for no CPU, GPU or custom resource: "
                                               "it could be placed on the head")
        if not any(_fits(d, s) for s in usable):
            hint = (f" - add a GPU worker group with at least {math.ceil(d.gpus)} nvidia.com/gpu per pod"
                    if d.gpus > 0 and not any(s.gpus >= d.gpus for s in usable) else "")
            ctx.add(obj, "spec.rayClusterConfig.workerGroupSpecs",
                    f"deployment '{d.name}' needs {d.describe()} per replica but no worker group can host it "
                    f"(groups: {listing}){hint}")
    for res, need_of, have_of in (("CPU", lambda d: d.cpus, lambda s: s.cpus), ("GPU", lambda d: d.gpus, lambda s: s.gpus)):
        need = sum(d.min_replicas * need_of(d) for d in demands)
        have = sum(s.max_pods * have_of(s) for s in usable)
        if need > have + 1e-9:
            ctx.add(obj, "spec.rayClusterConfig.workerGroupSpecs",
                    f"the minimum replicas need {need:g} {res} but the worker groups offer at most {have:g}")


@dataclass
class PodGroup:
    """A pod template of the manifests (a Ray head or worker group, a StatefulSet ...) and where it lives."""

    obj: Obj
    where: str  # path of the template in obj
    template: dict[str, Any]
    kind: str  # "ray-head", "ray-worker", "workload"
    name: str  # group name / workload name
    extra: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, container) e.g. the autoscaler

    @property
    def labels(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in ((self.template.get("metadata") or {}).get("labels") or {}).items()}

    @property
    def spec(self) -> dict[str, Any]:
        return self.template.get("spec") or {}

    @property
    def namespace(self) -> str:
        return str((self.obj.doc.get("metadata") or {}).get("namespace", ""))

    def describe(self) -> str:
        return {"ray-head": "the Ray head", "ray-worker": f"Ray worker group '{self.name}'"}.get(
            self.kind, f"{self.obj.kind} '{self.name}'")


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod", "PodTemplate"}


def _ray_cluster_spec(o: Obj) -> tuple[dict[str, Any], str] | None:
    if o.kind == "RayService" and _is_ray(o):
        rc = (o.doc.get("spec") or {}).get("rayClusterConfig")
        return (rc, "spec.rayClusterConfig") if isinstance(rc, dict) else None
    if o.kind == "RayCluster" and _is_ray(o):
        rc = o.doc.get("spec")
        return (rc, "spec") if isinstance(rc, dict) else None
    return None


def pod_groups(objs: list[Obj]) -> list[PodGroup]:
    """Every pod template of the manifests: Ray head and worker groups (with the autoscaler sidecar KubeRay adds
    to the head), and the pod templates of built-in workloads."""
    out: list[PodGroup] = []
    for o in objs:
        found = _ray_cluster_spec(o)
        if found is not None:
            rc, where = found
            head = rc.get("headGroupSpec") or {}
            if isinstance(head.get("template"), dict):
                g = PodGroup(o, f"{where}.headGroupSpec.template", head["template"], "ray-head", "head")
                aopts = rc.get("autoscalerOptions") or {}
                if rc.get("enableInTreeAutoscaling") is True:
                    g.extra.append((f"{where}.autoscalerOptions", {"name": "autoscaler", **aopts}))
                out.append(g)
            for i, wg in enumerate(rc.get("workerGroupSpecs") or []):
                if isinstance(wg, dict) and isinstance(wg.get("template"), dict):
                    out.append(PodGroup(o, f"{where}.workerGroupSpecs[{i}].template", wg["template"], "ray-worker",
                                        str(wg.get("groupName", i))))
            continue
        if o.kind not in WORKLOAD_KINDS:
            continue
        spec = o.doc.get("spec") or {}
        if o.kind == "Pod":
            out.append(PodGroup(o, "", {"metadata": o.doc.get("metadata") or {}, "spec": spec}, "workload", o.name))
            continue
        if o.kind == "PodTemplate":
            t, w = o.doc.get("template"), "template"
        elif o.kind == "CronJob":
            t, w = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template"), "spec.jobTemplate.spec.template"
        else:
            t, w = spec.get("template"), "spec.template"
        if isinstance(t, dict):
            out.append(PodGroup(o, w, t, "workload", o.name))
    return out


def _group_containers(g: PodGroup) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{g.where}.spec.{cw}", c) for cw, c in _containers(g.spec)] + g.extra


def _is_redis(g: PodGroup) -> bool:
    for _, c in _group_containers(g):
        image = str(c.get("image", "")).split("@")[0].rsplit("/", 1)[-1].split(":")[0]
        if image in ("redis", "redis-stack-server", "valkey"):
            return True
    return False


def _ray_container(g: PodGroup) -> tuple[str, dict[str, Any]] | None:
    cs = g.spec.get("containers") or []
    if cs and isinstance(cs[0], dict):
        return f"{g.where}.spec.containers[0]", cs[0]
    return None


def _literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {str(e["name"]): str(e["value"]) for e in c.get("env") or []
            if isinstance(e, dict) and e.get("name") and isinstance(e.get("value"), (str, int, float))}


def _redis_host_port(url: str) -> tuple[str, int | None]:
    u = urlparse(url if "://" in url else f"redis://{url}")
    try:
        port = u.port
    except ValueError:
        port = None
    return (u.hostname or "").lower(), port


def _request_timeout_s(spec: dict[str, Any]) -> float:
    """How long one request may last: serveConfigV2's http_options.request_timeout_s (Serve's default: none,
    counted here as coe's default 300 s)."""
    try:
        cfg = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
        return float((cfg.get("http_options") or {}).get("request_timeout_s") or 300.0)
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 300.0


def _coe_worker_rules(ctx: Context, obj: Obj) -> None:
    """coe's env (its own state Redis, no obsolete COE_API_KEYS) and the ingress readiness probe on CPU workers."""
    spec = obj.doc.get("spec") or {}
    rc = spec.get("rayClusterConfig") or {}
    gcs = rc.get("gcsFaultToleranceOptions") or {}
    gcs_host = _redis_host_port(str(gcs.get("redisAddress", "")))[0] if gcs.get("redisAddress") else ""
    port = 8000
    try:
        port = _serve_port(yaml.safe_load(spec.get("serveConfigV2") or "") or {})
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        pass
    for g in pod_groups([obj]):
        for cw, c in _group_containers(g):
            if "COE_API_KEYS" in _env(c):
                ctx.add(obj, f"{cw}.env.COE_API_KEYS", "COE_API_KEYS is read by nothing: team API keys live in "
                                                        "coe's state Redis (created over HTTP with the admin key) "
                                                        "- remove it")
        if g.kind != "ray-worker":
            continue
        rcw = _ray_container(g)
        if rcw is None:
            continue
        cw, c = rcw
        env = _env(c)
        url = env.get("COE_REDIS_URL")
        if url is None:
            ctx.add(obj, f"{cw}.env", "COE_REDIS_URL is not set: coe's shared state (keys, limits, usage) would stay "
                                      "in-process")
        elif "value" in url and gcs_host:
            host = _redis_host_port(str(url["value"]))[0]
            if host == gcs_host:
                ctx.add(obj, f"{cw}.env.COE_REDIS_URL",
                        f"COE_REDIS_URL is on the GCS Redis ({gcs_host}): coe's state needs its own Redis (e.g. "
                        f"{R.STATE_REDIS_NAME}) so its counters filling memory can never stop GCS writes")
        grace = (g.template.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        need = _request_timeout_s(spec) + 5
        if isinstance(grace, int) and grace < need:
            ctx.add(obj, f"{g.where}.spec.terminationGracePeriodSeconds",
                    f"{grace} s is shorter than Serve's graceful shutdown ({need:g} s: the request timeout, "
                    "http_options.request_timeout_s, + 5 s): Kubernetes would kill requests a draining replica "
                    "still holds")
        if _gpu_count(c) == 0:
            probe = c.get("readinessProbe") or {}
            hg = probe.get("httpGet") or {}
            if hg.get("path") not in ("/health", "/ready"):
                ctx.add(obj, f"{cw}.readinessProbe", "the ingress's CPU workers need an httpGet readiness probe on "
                                                     "/health (or /ready)")
            elif hg.get("port") not in (R.SERVE_PORT_NAME, port):
                ctx.add(obj, f"{cw}.readinessProbe.httpGet.port", f"must be the Serve port ({R.SERVE_PORT_NAME} / {port})")


# ---------------------------------------------------------------------------------------- access control


LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TRUE = ("1", "true", "yes", "on")


def check_ray_auth(ctx: Context, obj: Obj, rc: dict[str, Any], where: str) -> None:
    """The dashboard (job submission = code execution) listens on the pod IP only with Ray token authentication."""
    rsp = (rc.get("headGroupSpec") or {}).get("rayStartParams") or {}
    host = str(rsp.get("dashboard-host", "0.0.0.0"))  # KubeRay's default is 0.0.0.0
    auth = rc.get("authOptions") or {}
    if host not in LOOPBACK and auth.get("mode") != "token":
        ctx.add(obj, f"{where}.authOptions", f"dashboard-host {host} requires authOptions.mode token (Ray token "
                                             "authentication): otherwise anyone who reaches the head's dashboard or "
                                             "GCS can submit jobs, i.e. run code in the cluster")
    for g in pod_groups([obj]):
        for cw, c in _group_containers(g):
            mode = _literal_env(c).get("RAY_AUTH_MODE")
            if mode is not None and mode != "token" and auth.get("mode") == "token":
                ctx.add(obj, f"{cw}.env.RAY_AUTH_MODE", f"'{mode}' overrides authOptions.mode token")


def _mount_volume(g: PodGroup, c: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The deepest volume mount of container `c` holding `path`, and its volume (None: the root filesystem)."""
    best: tuple[dict[str, Any], dict[str, Any]] | None = None
    vols = {v.get("name"): v for v in g.spec.get("volumes") or [] if isinstance(v, dict)}
    for m in c.get("volumeMounts") or []:
        if not isinstance(m, dict) or not m.get("mountPath"):
            continue
        deeper = best is None or len(str(m["mountPath"])) > len(str(best[0]["mountPath"]))
        if _under(path, str(m["mountPath"])) and deeper:
            best = (m, vols.get(m.get("name")) or {})
    return best


def _norm(p: str) -> str:
    return posixpath.normpath(p) if p else p


def _under(path: str, mount: str) -> bool:
    """`path` is `mount` or inside it (the mount shadows it)."""
    path, mount = _norm(path), _norm(mount)
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def check_admin_key(ctx: Context, g: PodGroup) -> None:
    """Every Ray pod may host an ingress replica (Ray places it on any pod with spare CPU): each must carry the
    admin key from a Secret, or that replica would serve without authentication."""
    rcw = _ray_container(g)
    if rcw is None:
        return
    cw, c = rcw
    env = _env(c)
    key_file, key = env.get("COE_ADMIN_KEY_FILE"), env.get("COE_ADMIN_KEY")
    insecure = _literal_env(c).get("COE_INSECURE_NO_AUTH", "")
    if insecure.strip().lower() in _TRUE:
        ctx.add(g.obj, f"{cw}.env.COE_INSECURE_NO_AUTH", "serving without API keys is not allowed in a cluster")
    if key_file is not None and key is not None:
        ctx.add(g.obj, f"{cw}.env", "COE_ADMIN_KEY and COE_ADMIN_KEY_FILE are both set: coe refuses to start")
    if key is not None:
        if not ((key.get("valueFrom") or {}).get("secretKeyRef")):
            ctx.add(g.obj, f"{cw}.env.COE_ADMIN_KEY", "must come from a Secret (valueFrom.secretKeyRef); prefer "
                                                      "COE_ADMIN_KEY_FILE with the Secret mounted read-only")
        return
    if key_file is None:
        ctx.add(g.obj, f"{cw}.env", f"COE_ADMIN_KEY_FILE is not set on {g.describe()}: an ingress replica placed on "
                                    f"this pod would serve without API keys (mount the Secret {R.ADMIN_KEY_SECRET} "
                                    f"at {R.ADMIN_KEY_DIR} and set COE_ADMIN_KEY_FILE={R.ADMIN_KEY_FILE})")
        return
    path = str(key_file.get("value", ""))
    found = _mount_volume(g, c, path) if path.startswith("/") else None
    vol = found[1] if found else {}
    from_secret = bool((vol.get("secret") or {}).get("secretName")) or any(
        isinstance(src, dict) and src.get("secret") for src in (vol.get("projected") or {}).get("sources") or [])
    if not from_secret:
        ctx.add(g.obj, f"{cw}.env.COE_ADMIN_KEY_FILE", f"'{path}' is not in a mounted Secret volume "
                                                       f"(mount {R.ADMIN_KEY_SECRET} read-only at {R.ADMIN_KEY_DIR})")
    elif found and not found[0].get("readOnly"):
        ctx.add(g.obj, f"{cw}.volumeMounts", f"the admin key mount at {found[0]['mountPath']} must be readOnly")


# ---------------------------------------------------------------------------------------- pod hardening


def _effective(c: dict[str, Any], pod: dict[str, Any], key: str) -> Any:
    csc = c.get("securityContext") or {}
    return csc[key] if key in csc and csc[key] is not None else pod.get(key)


def check_hardening(ctx: Context, g: PodGroup) -> None:
    """runAsNonRoot with a numeric user, no privilege escalation, no capabilities, RuntimeDefault seccomp and a
    read-only root filesystem, on every container of every pod template (the autoscaler sidecar included)."""
    pod = g.spec.get("securityContext") or {}
    for cw, c in _group_containers(g):
        csc = c.get("securityContext") or {}
        missing: list[str] = []
        if _effective(c, pod, "runAsNonRoot") is not True:
            missing.append("runAsNonRoot: true")
        uid = _effective(c, pod, "runAsUser")
        if uid is None:
            missing.append("runAsUser (numeric: the kubelet cannot verify a named image user is not root)")
        elif uid == 0:
            missing.append("runAsUser other than 0")
        if csc.get("allowPrivilegeEscalation") is not False:
            missing.append("allowPrivilegeEscalation: false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            missing.append("capabilities.drop: [ALL]")
        if caps.get("add"):
            missing.append(f"no capabilities.add (has {caps['add']})")
        if csc.get("privileged"):
            missing.append("privileged: false")
        seccomp = (_effective(c, pod, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            missing.append("seccompProfile.type: RuntimeDefault")
        if csc.get("readOnlyRootFilesystem") is not True:
            missing.append("readOnlyRootFilesystem: true (writable paths as emptyDir volumes)")
        if missing:
            ctx.add(g.obj, f"{cw}.securityContext", f"container '{c.get('name', '?')}' is not hardened: needs "
                                                    + "; ".join(missing))


# ---------------------------------------------------------------------------------------- paths and mounts


RAY_WRITABLE = ("/tmp", "/tmp/ray")
WRITABLE_ENV = ("COE_MODEL_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TRITON_CACHE_DIR",
                "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "CUDA_CACHE_PATH", "FLASHINFER_WORKSPACE_BASE")
WRITABLE_VOLUMES = ("emptyDir", "persistentVolumeClaim", "ephemeral", "hostPath")
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(path: str, env: dict[str, str]) -> str:
    """`~` and $VAR as coe expands them in the pod (HOME from the env, else the Ray image's /home/ray)."""
    home = env.get("HOME", R.RAY_HOME)
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), path)


def _app_configs(obj: Obj) -> list[dict[str, Any]]:
    """The coe configs a RayService's serveConfigV2 deploys (config_inline, or a packaged/file config)."""
    try:
        cfg = yaml.safe_load((obj.doc.get("spec") or {}).get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return []
    out = []
    for app in cfg.get("applications") or [] if isinstance(cfg, dict) else []:
        args = (app or {}).get("args") or {} if isinstance(app, dict) else {}
        if isinstance(args, dict) and isinstance(args.get("config_inline"), dict):
            out.append(args["config_inline"])
        elif isinstance(args, dict) and isinstance(args.get("config"), str):
            try:
                from coe.config import load_config

                out.append(load_config(args["config"]).model_dump(mode="json"))
            except Exception:  # noqa: BLE001 - a bad reference is reported by the build check
                pass
    return out


def config_paths(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, path) of every file or directory a coe config reads from the image."""
    out: list[tuple[str, str]] = []
    router = config.get("router") or {}
    if router.get("kind") == "routerdc" and router.get("artifact"):
        out.append(("router.artifact (the RouterDC artifact directory)", str(router["artifact"])))
    for i, e in enumerate(config.get("experts") or []):
        path = ((e or {}).get("source") or {}).get("path") if isinstance(e, dict) else None
        if path:
            out.append((f"experts[{i}].source.path ({e.get('name', '?')})", str(path)))
    return out


def check_paths(ctx: Context, g: PodGroup, configs: list[dict[str, Any]]) -> None:
    """No volume mount hides a path the config reads from the image (a mount at or above it), and every path a
    container writes is on a writable volume when its root filesystem is read-only."""
    for cw, c in _group_containers(g):
        env = _literal_env(c)
        mounts = [m for m in c.get("volumeMounts") or [] if isinstance(m, dict) and m.get("mountPath")]
        if (cw, c) in g.extra:  # the autoscaler mounts the head pod's volumes; it reads no coe config
            protected: list[tuple[str, str]] = []
        else:
            protected = [(what, _expand(p, env)) for cfg in configs for what, p in config_paths(cfg)]
        for what, path in protected:
            if not path.startswith("/"):
                continue
            for m in mounts:
                if _under(path, str(m["mountPath"])):
                    ctx.add(g.obj, f"{cw}.volumeMounts", f"the volume '{m.get('name')}' mounted at {m['mountPath']} "
                                                        f"hides {path}, {what}, which the image provides: mount "
                                                        "writable volumes at dedicated paths instead")
        cache = _expand(env.get("COE_CACHE_DIR", "~/.cache/coe"), env)
        for m in mounts:
            if cache.startswith("/") and _under(cache, str(m["mountPath"])) and (cw, c) not in g.extra:
                ctx.warn(g.obj, f"{cw}.volumeMounts", f"the volume '{m.get('name')}' at {m['mountPath']} hides coe's "
                                                      f"image cache COE_CACHE_DIR={cache}: ONNX encoder exports built "
                                                      "into the image are redone at every start")
        if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            continue
        need: list[tuple[str, str]] = []
        if g.kind in ("ray-head", "ray-worker"):
            ray_paths = ("/tmp",) if (cw, c) in g.extra or g.kind == "ray-head" else RAY_WRITABLE
            need += [(f"Ray writes {p}", p) for p in ray_paths]  # KubeRay mounts /tmp/ray in the head pod itself
        need += [(f"{k}={env[k]}", _expand(env[k], env)) for k in WRITABLE_ENV if k in env]
        for why, path in need:
            found = _mount_volume(g, c, path) if path.startswith("/") else None
            ok = found is not None and not found[0].get("readOnly") and any(k in found[1] for k in WRITABLE_VOLUMES)
            if not ok:
                ctx.add(g.obj, f"{cw}.volumeMounts", f"{path} ({why}) is not on a writable volume, and the root "
                                                     "filesystem is read-only: mount an emptyDir there")


# ---------------------------------------------------------------------------------------- network policies


def selector_matches(sel: Any, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) against labels; an empty selector matches everything."""
    if not isinstance(sel, dict):
        return False
    for k, v in (sel.get("matchLabels") or {}).items():
        if labels.get(str(k)) != str(v):
            return False
    for e in sel.get("matchExpressions") or []:
        if not isinstance(e, dict):
            return False
        k, op, vals = str(e.get("key")), e.get("operator"), [str(x) for x in e.get("values") or []]
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def _is_everything(sel: Any) -> bool:
    return isinstance(sel, dict) and not sel.get("matchLabels") and not sel.get("matchExpressions")


def _peer_is_everyone(peer: Any) -> str | None:
    """What an open `from` peer admits (every pod of the namespace, every namespace, any address), else None."""
    if not isinstance(peer, dict):
        return None
    ip = peer.get("ipBlock")
    if isinstance(ip, dict):
        return "any address" if str(ip.get("cidr")) in ("0.0.0.0/0", "::/0") and not ip.get("except") else None
    ns, pods = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns is not None:
        return "every pod of every namespace" if _is_everything(ns) and (pods is None or _is_everything(pods)) else None
    return "every pod of the namespace" if pods is not None and _is_everything(pods) else None


def _ingress_policies(ctx: Context, g: PodGroup) -> list[Obj]:
    out = []
    for o in ctx.objs:
        if o.kind != "NetworkPolicy":
            continue
        ns = str((o.doc.get("metadata") or {}).get("namespace", ""))
        spec = o.doc.get("spec") or {}
        types = spec.get("policyTypes") or ["Ingress"]
        if ns == g.namespace and "Ingress" in types and selector_matches(spec.get("podSelector"), g.labels):
            out.append(o)
    return out


def check_network_policies(ctx: Context) -> None:
    """Each Redis and every Ray pod is selected by a NetworkPolicy with ingress rules; no rule admits every source
    to them; Redis admits only pods of its namespace; a Ray pod admits other namespaces only on listed ports."""
    for g in pod_groups(ctx.objs):
        redis = _is_redis(g)
        if not (redis or g.kind in ("ray-head", "ray-worker")):
            continue
        what = f"Redis '{g.name}'" if redis else g.describe()
        pols = _ingress_policies(ctx, g)
        if not pols:
            ctx.add(g.obj, f"{g.where}.metadata.labels",
                    f"no NetworkPolicy with ingress rules selects {what}: any pod in the cluster can "
                    "reach it")
            continue
        for pol in pols:
            for i, rule in enumerate((pol.doc.get("spec") or {}).get("ingress") or []):
                rule = rule if isinstance(rule, dict) else {}
                peers = rule.get("from")
                rw = f"spec.ingress[{i}]"
                open_to = ["any source (no 'from')"] if not peers else [x for x in map(_peer_is_everyone, peers) if x]
                if open_to:
                    ctx.add(pol, f"{rw}.from", f"admits every source to {what} ({open_to[0]})"
                                               + (": Redis must admit only the Ray pods" if redis else ""))
                    continue
                outside = [p for p in peers if isinstance(p, dict) and ("namespaceSelector" in p or "ipBlock" in p)]
                if redis and outside:
                    ctx.add(pol, f"{rw}.from", f"admits sources outside the namespace to {what}: Redis must admit "
                                               "only the Ray pods (podSelector)")
                elif outside and not rule.get("ports"):
                    ctx.add(pol, f"{rw}.ports", f"admits every port of {what} to other namespaces: list the ports")


def check_disruption_budgets(ctx: Context) -> None:
    """The Ray head and each worker group are covered by a PodDisruptionBudget."""
    pdbs = [o for o in ctx.objs if o.kind == "PodDisruptionBudget"]
    for g in pod_groups(ctx.objs):
        if g.kind not in ("ray-head", "ray-worker"):
            continue
        if not any(selector_matches((p.doc.get("spec") or {}).get("selector"), g.labels)
                   and str((p.doc.get("metadata") or {}).get("namespace", "")) == g.namespace for p in pdbs):
            ctx.add(g.obj, f"{g.where}.metadata.labels", f"no PodDisruptionBudget covers {g.describe()}")


# ---------------------------------------------------------------------------------------- credentials


_CRED_WORDS = {"PASSWORD", "PASSWD", "PASS", "TOKEN", "TOKENS", "KEY", "KEYS", "SECRET", "SECRETS", "CREDENTIAL",
               "CREDENTIALS", "APIKEY", "PRIVATE"}
_LOCATION_WORDS = {"FILE", "PATH", "DIR", "NAME", "MODE", "ID", "HEADER", "SECRETNAME"}
_PASSWORD_FLAGS = ("--requirepass", "--masterauth")
_REF = re.compile(r"^\$\([A-Za-z_][A-Za-z0-9_]*\)$")


def credential_name(name: str) -> bool:
    """An env var name that holds a credential (HF_TOKEN, REDIS_PASSWORD ...), not its location (..._FILE)."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.upper()) if w]
    return bool(words) and any(w in _CRED_WORDS for w in words) and words[-1] not in _LOCATION_WORDS


def _url_password(value: str) -> str | None:
    """The literal password of a URL (scheme://user:password@host), None when absent or a $(VAR) reference."""
    m = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^@/]*)@", value)
    if not m or ":" not in m.group(1):
        return None
    pw = m.group(1).split(":", 1)[1]
    return None if not pw or _REF.match(pw) else pw


def _walk_env(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}" if path else str(k)
            if k == "env" and isinstance(v, list):
                for i, e in enumerate(v):
                    if isinstance(e, dict):
                        yield f"{p}[{i}]", e
            else:
                yield from _walk_env(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_env(v, f"{path}[{i}]")


def check_credentials(ctx: Context) -> None:
    """No credential in plain text: no Secret with data, no credential-named env var with a literal value, no URL
    or Redis flag with a literal password ($(VAR) references are fine)."""
    for o in ctx.objs:
        if o.kind == "Secret":
            for part in ("data", "stringData"):
                if (o.doc.get(part) or {}):
                    ctx.add(o, part, "a Secret with its values in the manifests: credentials must never be "
                                     "committed - create it out of band (`coe k8s secrets --namespace NS | kubectl "
                                     f"apply -f -`) and list it in {R.ANN_EXTERNAL_SECRETS}")
        for p, e in _walk_env(o.doc):
            name, value = str(e.get("name", "")), e.get("value")
            if not isinstance(value, str) or not value:
                continue
            if credential_name(name) and "$(" not in value:
                ctx.add(o, f"{p}.value", f"env {name} holds a literal credential: use valueFrom.secretKeyRef (or a "
                                         "mounted Secret file)")
            elif _url_password(value) is not None:
                ctx.add(o, f"{p}.value", f"env {name} is a URL with a literal password: use $(VAR) from a "
                                         "secretKeyRef env var")
        for g in pod_groups([o]):
            for cw, c in _group_containers(g):
                args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                for i, a in enumerate(args):
                    flag, _, inline = a.partition("=")
                    if flag in _PASSWORD_FLAGS:
                        val = inline or (args[i + 1] if i + 1 < len(args) else "")
                        if val and not _REF.match(val):
                            ctx.add(o, f"{cw}.args", f"{flag} is given a literal password: pass $(VAR) from a "
                                                     "secretKeyRef env var")
        if o.kind == "RayService":
            try:
                cfg = yaml.safe_load((o.doc.get("spec") or {}).get("serveConfigV2") or "") or {}
            except yaml.YAMLError:
                continue
            for i, app in enumerate(cfg.get("applications") or [] if isinstance(cfg, dict) else []):
                runtime_env = (app.get("runtime_env") or {}) if isinstance(app, dict) else {}
                env_vars = runtime_env.get("env_vars") or {} if isinstance(runtime_env, dict) else {}
                for k in env_vars if isinstance(env_vars, dict) else []:
                    if credential_name(str(k)):
                        ctx.add(o, f"spec.serveConfigV2: applications[{i}].runtime_env.env_vars.{k}",
                                "a credential in serveConfigV2 (readable by anyone who can read the RayService): "
                                "use a Secret in the pod template")


# ---------------------------------------------------------------------------------------- Redis and images


def _redis_args(g: PodGroup) -> dict[str, str]:
    out: dict[str, str] = {}
    for _, c in _group_containers(g):
        args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
        for i, a in enumerate(args):
            if a.startswith("--") and i + 1 < len(args):
                out[a[2:]] = args[i + 1]
    return out


def _redis_by_host(ctx: Context, host: str) -> PodGroup | None:
    svc = next((o for o in ctx.objs if o.kind == "Service" and o.name == host.split(".")[0]), None)
    if svc is None:
        return None
    sel = (svc.doc.get("spec") or {}).get("selector") or {}
    for g in pod_groups(ctx.objs):
        if sel and _is_redis(g) and selector_matches({"matchLabels": sel}, g.labels):
            return g
    return None


def check_redis_eviction(ctx: Context, obj: Obj) -> None:
    """GCS's Redis never evicts; coe's state Redis has a maxmemory and evicts only keys with a TTL."""
    spec = obj.doc.get("spec") or {}
    rc = spec.get("rayClusterConfig") or {}
    gcs = (rc.get("gcsFaultToleranceOptions") or {}).get("redisAddress")
    if gcs:
        g = _redis_by_host(ctx, _redis_host_port(str(gcs))[0])
        policy = _redis_args(g).get("maxmemory-policy", "noeviction") if g else "noeviction"
        if g and policy != "noeviction":
            ctx.add(g.obj, f"{g.where}.spec.containers", f"the GCS Redis evicts keys (maxmemory-policy {policy}): "
                                                         "GCS fault tolerance needs noeviction")
    urls = {str(e["value"]) for g in pod_groups([obj]) for _, c in _group_containers(g)
            for e in c.get("env") or [] if isinstance(e, dict) and e.get("name") == "COE_REDIS_URL" and e.get("value")}
    for url in sorted(urls):
        g = _redis_by_host(ctx, _redis_host_port(url)[0])
        if g is None:
            continue
        args = _redis_args(g)
        policy = args.get("maxmemory-policy", "noeviction")
        if "maxmemory" not in args or not policy.startswith("volatile-"):
            ctx.add(g.obj, f"{g.where}.spec.containers",
                    f"coe's state Redis needs --maxmemory and a volatile-* --maxmemory-policy (has "
                    f"{args.get('maxmemory', 'no maxmemory')}, {policy}): only keys with a TTL (usage counters, "
                    "rate-limit buckets) may be evicted, never the team API keys")


def check_image_pins(ctx: Context) -> None:
    """A production profile should pin every image by digest (a tag can move under a running cluster)."""
    prod = [o for o in ctx.objs if o.kind == "RayService"
            and ((o.doc.get("metadata") or {}).get("annotations") or {}).get(R.ANN_PROFILE) in R.PROD_PROFILES]
    if not prod:
        return
    profile = ((prod[0].doc.get("metadata") or {}).get("annotations") or {}).get(R.ANN_PROFILE)
    for g in pod_groups(ctx.objs):
        for cw, c in _group_containers(g):
            image = c.get("image")
            if image and "@sha256:" not in str(image):
                ctx.warn(g.obj, f"{cw}.image", f"'{image}' is a mutable tag in the production profile {profile}: pin "
                                               "it by digest (options image_digest, gpu_image_digest, "
                                               "redis_image_digest)")


def check_custom_metadata(ctx: Context, obj: Obj) -> None:
    """A custom resource's metadata is an ObjectMeta (the API server prunes unknown keys such as `lables`)."""
    meta = obj.doc.get("metadata")
    if not isinstance(meta, dict):
        return
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    for path, msg in k8s_schema_errors(probe) or []:
        if path.startswith("metadata"):
            ctx.add(obj, path, f"{msg} [Kubernetes {k8s_version()} ObjectMeta schema]")


def check_builtin(ctx: Context, obj: Obj) -> None:
    errs = k8s_schema_errors(obj.doc)
    if errs is None:
        ctx.add(obj, "", f"no Kubernetes {k8s_version()} schema for kind {obj.kind} ({obj.doc.get('apiVersion')})")
        return
    for path, msg in errs:
        ctx.add(obj, path, f"{msg} [Kubernetes {k8s_version()} schema, strict]")
    spec = obj.doc.get("spec") or {}
    template = spec.get("template") or ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    if isinstance(template, dict):
        for cwhere, c in _containers(template.get("spec") or {}):
            _check_requests_limits(ctx, obj, f"spec.template.spec.{cwhere}", c.get("resources"))


def check_monitor(ctx: Context, obj: Obj) -> None:
    v = _k8s_validator_class()(MONITOR_SCHEMA)
    for path, msg in _schema_errors(v, obj.doc):
        ctx.add(obj, path, f"{msg} [Prometheus Operator, strict subset]")
    if obj.kind != "PodMonitor":
        return
    spec = obj.doc.get("spec") or {}
    want = ((spec.get("selector") or {}).get("matchLabels") or {}).get("ray.io/node-type")
    if want not in ("head", "worker"):
        return
    ports: set[str] = set()
    for o in ctx.objs:
        if o.kind not in ("RayService", "RayCluster"):
            continue
        rc = (o.doc.get("spec") or {}).get("rayClusterConfig") if o.kind == "RayService" else o.doc.get("spec")
        rc = rc or {}
        groups = [rc.get("headGroupSpec") or {}] if want == "head" else list(rc.get("workerGroupSpecs") or [])
        for g in groups:
            for c in ((g.get("template") or {}).get("spec") or {}).get("containers") or []:
                ports |= set(_port_numbers(c)) if isinstance(c, dict) else set()
    for i, ep in enumerate(spec.get("podMetricsEndpoints") or []):
        if isinstance(ep, dict) and ep.get("port") and ports and ep["port"] not in ports:
            ctx.add(obj, f"spec.podMetricsEndpoints[{i}].port", f"'{ep['port']}' is not a port of the Ray {want} "
                                                                f"containers ({sorted(ports)})")


def _cross_refs(ctx: Context) -> None:
    secrets = {o.name for o in ctx.objs if o.kind == "Secret"}
    services = {o.name: o for o in ctx.objs if o.kind == "Service"}
    serve_ports: dict[str, set[Any]] = {}
    for o in ctx.objs:
        if o.kind == "RayService":
            ss = (o.doc.get("spec") or {}).get("serveService") or {}
            nm = (ss.get("metadata") or {}).get("name") or f"{o.name}-serve-svc"
            serve_ports[nm] = {p.get(k) for p in ((ss.get("spec") or {}).get("ports") or [{"name": "serve",
                                                                                           "port": 8000}])
                               for k in ("name", "port") if isinstance(p, dict)}
            ann = (o.doc.get("metadata") or {}).get("annotations") or {}
            ctx.external_secrets |= {s.strip() for s in str(ann.get(R.ANN_EXTERNAL_SECRETS, "")).split(",") if s.strip()}
    for s in services.values():
        serve_ports.setdefault(s.name, {p.get(k) for p in ((s.doc.get("spec") or {}).get("ports") or [])
                                        for k in ("name", "port") if isinstance(p, dict)})
    for o in ctx.objs:
        for path, name in _secret_refs(o.doc):
            if name not in secrets and name not in ctx.external_secrets:
                ctx.add(o, path, f"Secret '{name}' is neither in the manifests nor declared external "
                                 f"(annotation {R.ANN_EXTERNAL_SECRETS} on the RayService)")
        if o.kind == "Ingress":
            rules = (o.doc.get("spec") or {}).get("rules") or []
            for i, rule in enumerate(rules):
                for j, p in enumerate(((rule or {}).get("http") or {}).get("paths") or []):
                    svc = ((p or {}).get("backend") or {}).get("service") or {}
                    nm = svc.get("name")
                    port = svc.get("port") or {}
                    pw = f"spec.rules[{i}].http.paths[{j}].backend.service"
                    if nm not in serve_ports:
                        ctx.add(o, f"{pw}.name", f"Service '{nm}' is not in the manifests (nor a RayService's "
                                                 "serveService)")
                    elif (port.get("name") or port.get("number")) not in serve_ports[nm]:
                        ctx.add(o, f"{pw}.port", f"Service '{nm}' has no port {port}")
    seen: dict[tuple[str, str, str], str] = {}
    for o in ctx.objs:
        key = (o.kind, str((o.doc.get("metadata") or {}).get("namespace", "")), o.name)
        if key in seen:
            ctx.add(o, "metadata.name", f"defined twice ({seen[key]} and {o.source})")
        seen[key] = o.source


def validate_objects(objs: list[Obj] | list[dict[str, Any]], *, crd_dir: str | Path | None = None,
                     require_crds: bool = True, config_dirs: Iterable[str | Path] = (),
                     warnings: list[str] | None = None) -> list[str]:
    """Every problem of a resolved object list ([] = valid). `crd_dir` defaults to :func:`default_crd_dir`.
    Warnings (e.g. a production image not pinned by digest) are appended to `warnings` when given."""
    items = [o if isinstance(o, Obj) else Obj(o, "<memory>") for o in objs]
    d = Path(crd_dir) if crd_dir else default_crd_dir()
    ctx = Context(items, d if crds_available(d) else None, [Path(x) for x in config_dirs] + [Path.cwd(), REPO_ROOT])
    if ctx.crd_dir is None and require_crds:
        ctx.add(None, "", f"KubeRay CRDs not found in {d} (ray.io_rayservices.yaml, ray.io_rayclusters.yaml): "
                          "set COE_SHARED_DATA or pass --crds")
    for o in items:
        if not isinstance(o.doc.get("metadata"), dict) or not o.doc["metadata"].get("name"):
            ctx.add(o, "metadata.name", "missing")
        if not o.doc.get("apiVersion") or not o.doc.get("kind"):
            ctx.add(o, "", "apiVersion and kind are required")
            continue
        if _is_ray(o) or str(o.doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            check_custom_metadata(ctx, o)
        if o.kind == "RayService" and _is_ray(o):
            check_rayservice(ctx, o)
            _coe_worker_rules(ctx, o)
            check_redis_eviction(ctx, o)
            configs = _app_configs(o)
            for g in pod_groups([o]):
                check_admin_key(ctx, g)
                check_paths(ctx, g, configs)
        elif o.kind == "RayCluster" and _is_ray(o):
            check_raycluster(ctx, o)
        elif str(o.doc.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            check_monitor(ctx, o)
        else:
            check_builtin(ctx, o)
    for g in pod_groups(items):
        check_hardening(ctx, g)
    check_network_policies(ctx)
    check_disruption_budgets(ctx)
    check_credentials(ctx)
    check_image_pins(ctx)
    _cross_refs(ctx)
    if not any(o.kind == "RayService" for o in items):
        ctx.add(None, "", "no RayService in the manifests")
    if warnings is not None:
        warnings.extend(ctx.warnings)
    return ctx.problems


def validate_tree(path: str | Path, *, crd_dir: str | Path | None = None, require_crds: bool = True,
                  warnings: list[str] | None = None) -> list[str]:
    """Validate each kustomization under `path` (itself, or every overlays/*); problems prefixed by overlay.
    Warnings, prefixed the same way, are appended to `warnings` when given."""
    path = Path(path)
    dirs = kustomization_dirs(path)
    if not dirs:
        return [f"{path}: no kustomization.yaml here nor under overlays/*"]
    problems: list[str] = []
    for d in dirs:
        try:
            objs = build_kustomization(d)
        except KustomizeError as err:
            problems.append(f"{d.name}: {err}")
            continue
        found: list[str] = []
        problems += [f"{d.name}: {p}" for p in validate_objects(objs, crd_dir=crd_dir, require_crds=require_crds,
                                                                config_dirs=[d], warnings=found)]
        if warnings is not None:
            warnings.extend(f"{d.name}: {w}" for w in found)
    return problems
