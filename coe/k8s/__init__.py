"""Kubernetes (KubeRay) manifests rendered from the one coe config, and their offline validation.

* :mod:`coe.k8s.render` turns a :class:`coe.config.CoeConfig` into a kustomize tree (pure functions).
* :mod:`coe.k8s.validate` checks a tree the way `kubectl apply -k` would see it, without a cluster.
* :mod:`coe.k8s.cli` adds `coe k8s render | validate`.

Nothing here imports `deployments/` at import time; validation imports the Serve import path dynamically.
"""
