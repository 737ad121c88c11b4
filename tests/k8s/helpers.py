"""Helpers for the offline Kubernetes tests: paths, mutation of a resolved overlay, assertions."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from coe.k8s.validate import Obj, validate_objects

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu-demo", "gpu-prod")

Mutator = Callable[[dict[str, Any], list[Obj]], None]


def problems_after(built: dict[str, list[Obj]], overlay: str, mutate: Mutator, crd_dir: Path | None = None) -> list[str]:
    """Validate a deep copy of an overlay after `mutate(rayservice_doc, objects)`."""
    objs = copy.deepcopy(built[overlay])
    rs = next(o for o in objs if o.kind == "RayService")
    mutate(rs.doc, objs)
    return validate_objects(objs, crd_dir=crd_dir, require_crds=crd_dir is not None)


def worker_groups(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def worker_container(doc: dict[str, Any], group: int = 0) -> dict[str, Any]:
    return worker_groups(doc)[group]["template"]["spec"]["containers"][0]


def edit_serve_config(doc: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    edit(cfg)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def obj(objs: list[Obj], kind: str) -> dict[str, Any]:
    return next(o for o in objs if o.kind == kind).doc


def assert_caught(problems: list[str], *fragments: str) -> None:
    """Some problem line contains every fragment."""
    assert any(all(f in p for f in fragments) for p in problems), (
        f"expected a problem mentioning {fragments}, got:\n" + "\n".join(problems))
