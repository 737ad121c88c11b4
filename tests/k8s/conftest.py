"""Fixtures for the offline Kubernetes checks (no cluster, no Ray start).

KubeRay's CRDs come from ``$COE_SHARED_DATA/k8s`` (default ``<repo>/../shared/data/k8s``); tests that need
them skip with a clear reason when they are absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.k8s.validate import Obj, build_kustomization, crds_available, default_crd_dir
from tests.k8s.helpers import K8S, OVERLAYS


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    d = default_crd_dir()
    if not crds_available(d):
        pytest.fail(f"KubeRay CRDs not found in {d} (ray.io_rayservices.yaml, ray.io_rayclusters.yaml): "
                    "set COE_SHARED_DATA to the shared data directory")
    return d


@pytest.fixture(scope="session")
def built() -> dict[str, list[Obj]]:
    """Each committed overlay, resolved the way `kubectl apply -k` resolves it."""
    return {o: build_kustomization(K8S / "overlays" / o) for o in OVERLAYS}
