"""Offline validation: both overlays pass everything; each kind of broken manifest is caught with a clear message."""

from __future__ import annotations

import json

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from coe.config import load_config
from coe.k8s import render as R
from coe.k8s.cli import main as k8s_main
from coe.k8s.validate import (
    KustomizeError,
    Obj,
    build_kustomization,
    credential_name,
    parse_quantity,
    strict_schema,
    validate_objects,
    validate_tree,
)
from tests.k8s.helpers import (
    K8S,
    OVERLAYS,
    assert_caught,
    edit_serve_config,
    obj,
    problems_after,
    worker_container,
    worker_groups,
)

Built = dict[str, list[Obj]]


# -------------------------------------------------------------------------------------------------- the good case


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_every_validation(overlay: str, crd_dir: Path) -> None:
    assert validate_tree(K8S / "overlays" / overlay, crd_dir=crd_dir) == []


def test_cli_validate_whole_tree(crd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert k8s_main(["k8s", "validate", str(K8S), "--crds", str(crd_dir)]) == 0
    assert "valid: cpu-demo, gpu-prod" in capsys.readouterr().out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_contents(overlay: str, built: Built) -> None:
    kinds = sorted(o.kind for o in built[overlay])
    groups = {"cpu-demo": 1, "gpu-prod": 3}[overlay]
    expected = (["ConfigMap", "Ingress", "PodMonitor", "PodMonitor", "RayService", "Service", "Service", "StatefulSet",
                 "StatefulSet"] + ["NetworkPolicy"] * 3 + ["PodDisruptionBudget"] * (1 + groups))
    assert kinds == sorted(expected), "no Secret is ever rendered: `coe k8s secrets` creates them"
    ns = {"cpu-demo": "coe-demo", "gpu-prod": "coe"}[overlay]
    assert all(o.doc["metadata"]["namespace"] == ns for o in built[overlay])
    board = next(o for o in built[overlay] if o.kind == "ConfigMap" and o.name == "coe-grafana-dashboard")
    assert board.doc["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's dashboard sidecar loads it
    assert json.loads(board.doc["data"]["coe-dashboard.json"])["uid"] == "coe-overview"
    rs = obj(built[overlay], "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["version"] == "v2"
    assert rc["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == R.REDIS_SECRET
    assert rc["authOptions"] == {"mode": "token"}
    assert rs["metadata"]["annotations"][R.ANN_EXTERNAL_SECRETS] == "coe-admin-key,coe-redis,coe-state-redis"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resolver_matches_kubectl_kustomize(overlay: str, built: Built) -> None:
    assert shutil.which("kubectl"), "kubectl is needed for this cross-check of the kustomize resolver"
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60, check=True).stdout

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(yaml.safe_load_all(out), key=key) == sorted((o.doc for o in built[overlay]), key=key)


# ------------------------------------------------------------------------------------- typos in fields (strict CRD)


def test_typo_in_worker_group_field(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_groups(d)[0]["rayStartParam"] = worker_groups(d)[0].pop("rayStartParams")

    probs = problems_after(built, "gpu-prod", mutate, crd_dir)
    assert_caught(probs, "workerGroupSpecs[0].rayStartParam", "unknown field", "did you mean 'rayStartParams'",
                  "KubeRay CRD")


def test_typo_in_replicas_field(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_groups(d)[1]["maxReplica"] = worker_groups(d)[1].pop("maxReplicas")

    probs = problems_after(built, "gpu-prod", mutate, crd_dir)
    assert_caught(probs, "workerGroupSpecs[1].maxReplica", "did you mean 'maxReplicas'")
    assert_caught(probs, "workerGroupSpecs[1]", "'maxReplicas' is required")


def test_typo_in_rayservice_spec(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["spec"]["upgradeStrategy"] = {"typ": "NewCluster"}

    assert_caught(problems_after(built, "cpu-demo", mutate, crd_dir), "spec.upgradeStrategy.typ", "did you mean 'type'")


def test_typo_in_pod_template_container(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_container(d)["readinesProbe"] = worker_container(d).pop("readinessProbe")

    probs = problems_after(built, "cpu-demo", mutate, crd_dir)
    assert_caught(probs, "containers[0].readinesProbe", "did you mean 'readinessProbe'", "PodTemplate schema")
    assert_caught(probs, "readinessProbe", "/health")


def test_wrong_type_in_crd_field(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_groups(d)[0]["minReplicas"] = "1"

    assert_caught(problems_after(built, "cpu-demo", mutate, crd_dir), "workerGroupSpecs[0].minReplicas",
                  "is not of type 'integer'")


def test_typo_in_custom_resource_metadata(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["metadata"]["annotation"] = d["metadata"].pop("annotations")

    assert_caught(problems_after(built, "gpu-prod", mutate), "RayService/coe", "metadata.annotation",
                  "did you mean 'annotations'", "ObjectMeta")


def test_typo_in_builtin_kind(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        obj(objs, "StatefulSet")["spec"]["servicename"] = obj(objs, "StatefulSet")["spec"].pop("serviceName")

    assert_caught(problems_after(built, "cpu-demo", mutate), "StatefulSet/coe-redis", "spec.servicename",
                  "did you mean 'serviceName'", "Kubernetes")


def test_typo_in_pod_monitor(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        obj(objs, "PodMonitor")["spec"]["podMetricEndpoints"] = obj(objs, "PodMonitor")["spec"].pop("podMetricsEndpoints")

    assert_caught(problems_after(built, "gpu-prod", mutate), "PodMonitor/coe-ray-head", "podMetricEndpoints",
                  "did you mean 'podMetricsEndpoints'")


def test_pod_monitor_port_must_exist(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        obj(objs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] = "metric"

    assert_caught(problems_after(built, "gpu-prod", mutate), "'metric' is not a port of the Ray head containers")


# ----------------------------------------------------------------------------------------------- serveConfigV2


def test_misspelled_serve_key_num_gpu(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0].update(
            deployments=[{"name": "code", "ray_actor_options": {"num_gpu": 1}}]))

    assert_caught(problems_after(built, "gpu-prod", mutate), "deployments[0].ray_actor_options.num_gpu",
                  "did you mean 'num_gpus'", "silently ignore")


def test_misspelled_serve_keys_at_every_level(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        def edit(c: dict[str, Any]) -> None:
            c["proxy_locaton"] = c.pop("proxy_location")
            c["http_options"]["request_timeout"] = 10
            c["applications"][0]["route_prefx"] = c["applications"][0].pop("route_prefix")
            c["applications"][0]["deployments"] = [{"name": "CoeIngress", "autoscaling_config": {"max_replica": 3}}]

        edit_serve_config(d, edit)

    probs = problems_after(built, "cpu-demo", mutate)
    for frag in ("proxy_locaton", "http_options.request_timeout", "applications[0].route_prefx",
                 "autoscaling_config.max_replica"):
        assert_caught(probs, frag, "unknown key")


def test_serve_override_of_unknown_deployment(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0].update(deployments=[{"name": "Coeingress"}]))

    assert_caught(problems_after(built, "cpu-demo", mutate), "'Coeingress' is not a deployment", "CoeIngress")


def test_bad_import_path(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0].update(import_path="deployments.app:build_ap"))

    assert_caught(problems_after(built, "cpu-demo", mutate), "import_path", "'deployments.app:build_ap' does not import",
                  "build_ap")


def test_unknown_build_app_arg(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0]["args"].update(confg="cpu-default"))

    assert_caught(problems_after(built, "cpu-demo", mutate), "args.confg", "unknown key 'confg'", "AppArgs")


def test_invalid_inline_config(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0]["args"]["config_inline"]["experts"][0].update(
            max_ongoing_request=3))

    assert_caught(problems_after(built, "cpu-demo", mutate), "does not build", "unknown key 'max_ongoing_request'")


def test_wrong_serve_value_type(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["http_options"].update(port="eighty"))

    assert_caught(problems_after(built, "cpu-demo", mutate), "http_options.port", "Ray Serve schema")


def test_hand_edited_serve_config_is_stale(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0]["args"]["config_inline"]["experts"][0]["autoscaling"]
                          .update(max_replicas=2))

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "edited by hand", R.ANN_CONFIG_SHA, "coe k8s render --all")
    assert_caught(probs, "stale", "experts[0].autoscaling.max_replicas: manifest 2 != config 4")


def test_config_changed_but_manifest_not_rerendered(tmp_path: Path) -> None:
    """The config file moved on; the manifest rendered from it did not: validation names the drift."""
    cfg = load_config("cpu-default").model_dump(mode="json")
    path = tmp_path / "coe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    files = {**R.render_base(), **R.render_overlay(load_config(path), R.cluster_options("cpu-demo"),
                                                   config_ref=str(path), profile="cpu-demo")}
    R.write_tree(files, tmp_path / "k8s")
    assert validate_tree(tmp_path / "k8s", require_crds=False) == []
    cfg["experts"][1]["sampling"]["temperature"] = 0.5
    path.write_text(yaml.safe_dump(cfg))
    assert_caught(validate_tree(tmp_path / "k8s", require_crds=False), "cpu-demo:", "stale",
                  "experts[1].sampling.temperature: manifest 0.2 != config 0.5")


# ------------------------------------------------------------------------------------- placement of the experts


def test_gpu_expert_without_gpu_group(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        groups = d["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        groups[:] = [g for g in groups if g["groupName"] != "gpu-2x"]

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "deployment 'general' needs 8 CPU, 2 GPU per replica but no worker group can host it",
                  "add a GPU worker group with at least 2 nvidia.com/gpu")
    assert not any("'code'" in p for p in probs)


def test_gpu_expert_in_cpu_only_config(built: Built) -> None:
    """A config that gains a GPU expert but keeps the CPU-only worker groups is caught."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        def edit(c: dict[str, Any]) -> None:
            c["applications"][0]["args"]["config_inline"] = load_config("gpu-experts").model_dump(mode="json")

        edit_serve_config(d, edit)

    assert_caught(problems_after(built, "cpu-demo", mutate), "deployment 'code' needs 4 CPU, 1 GPU",
                  "no worker group can host it")


def test_minimum_replicas_exceed_cluster(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        for g in worker_groups(d):
            if g["groupName"].startswith("gpu-"):
                g["maxReplicas"] = g["minReplicas"] = g["replicas"] = 1

    assert_caught(problems_after(built, "gpu-prod", mutate), "minimum replicas need 5 GPU", "at most 3")


def test_head_must_not_run_workloads(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        del d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"]

    assert_caught(problems_after(built, "cpu-demo", mutate), "headGroupSpec.rayStartParams", "num-cpus: '0'")


def test_gpu_group_needs_toleration_and_limits(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        g = next(g for g in worker_groups(d) if g["groupName"] == "gpu-1x")
        del g["template"]["spec"]["tolerations"]
        del g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "tolerations", "GPU taint")
    assert_caught(probs, "nvidia.com/gpu must be set in limits")


# ------------------------------------------------------------------------------------------ operator rules


@pytest.mark.parametrize(("name", "fragment"), [
    ("c" * 48, "48 characters; KubeRay allows at most 47"),
    ("Coe", "not a DNS-1035 label"),
    ("1coe", "not a DNS-1035 label"),
    ("coe.prod", "not a DNS-1035 label"),
])
def test_rayservice_name_rules(built: Built, name: str, fragment: str) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["metadata"]["name"] = name

    assert_caught(problems_after(built, "cpu-demo", mutate), f"RayService/{name}", "metadata.name", fragment)


def test_longest_allowed_name_passes(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["metadata"]["name"] = "c" * 47

    assert not any("metadata.name" in p for p in problems_after(built, "cpu-demo", mutate))


def test_min_replicas_above_max(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_groups(d)[0]["minReplicas"] = 5

    assert_caught(problems_after(built, "cpu-demo", mutate), "worker group cpu has minReplicas 5 greater than "
                                                             "maxReplicas 2")


def test_upgrade_strategy_and_autoscaler_rules(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["spec"]["upgradeStrategy"]["type"] = "BlueGreen"
        d["spec"]["rayClusterConfig"]["autoscalerOptions"]["version"] = "v1"
        worker_groups(d)[0]["template"]["spec"]["restartPolicy"] = "Always"

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "spec.upgradeStrategy.type", "'BlueGreen' is not one of")
    assert_caught(probs, "autoscalerOptions.version", "must be 'v2'")


def test_gcs_fault_tolerance_rules(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        rc = d["spec"]["rayClusterConfig"]
        rc["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
        rc["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "REDIS_PASSWORD", "value": "x"})

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "redisPassword", "must come from a Secret")
    assert_caught(probs, "REDIS_PASSWORD cannot be set with gcsFaultToleranceOptions")


# ------------------------------------------------------------------------------------------------ coe's rules


@pytest.mark.parametrize("url", ["redis://:$(COE_STATE_REDIS_PASSWORD)@coe-redis:6379/1",
                                 "redis://:$(COE_STATE_REDIS_PASSWORD)@coe-redis:6379/0", "redis://coe-redis"])
def test_coe_state_must_not_use_the_gcs_redis(built: Built, url: str) -> None:
    """Any database of the GCS Redis is refused: coe's counters filling its memory would stop GCS writes."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        env = worker_container(d)["env"]
        next(e for e in env if e["name"] == "COE_REDIS_URL")["value"] = url

    assert_caught(problems_after(built, "cpu-demo", mutate), "env.COE_REDIS_URL",
                  "COE_REDIS_URL is on the GCS Redis (coe-redis)", "own Redis")


def test_every_container_needs_requests_and_limits(built: Built) -> None:
    def mutate(d: dict[str, Any], objs: list[Obj]) -> None:
        del d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        del d["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
        del obj(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "headGroupSpec.template.spec.containers[0].resources.limits", "missing cpu, memory")
    assert_caught(probs, "autoscalerOptions.resources.requests", "missing")
    assert_caught(probs, "StatefulSet/coe-redis", "resources.requests")


def test_secret_and_service_references(built: Built) -> None:
    def mutate(d: dict[str, Any], objs: list[Obj]) -> None:
        d["metadata"]["annotations"][R.ANN_EXTERNAL_SECRETS] = "coe-redis,coe-state-redis"
        obj(objs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] = "coe-svc"

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "volumes[3].secret", "Secret 'coe-admin-key' is neither in the manifests nor declared "
                                              "external")
    assert_caught(probs, "Ingress/coe", "Service 'coe-svc' is not in the manifests")


def test_obsolete_api_keys_env_is_refused(built: Built) -> None:
    """COE_API_KEYS was injected but read by nothing: team keys live in the state Redis now."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        worker_container(d, 1)["env"].append(
            {"name": "COE_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "coe-api-keys", "key": "keys"}}})

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "workerGroupSpecs[1]", "env.COE_API_KEYS", "read by nothing")
    assert_caught(probs, "Secret 'coe-api-keys' is neither in the manifests nor declared external")


def test_serve_port_mismatch(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["http_options"].update(port=8001))

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "port 'serve' is 8000 but serveConfigV2 http_options.port is 8001")
    assert_caught(probs, "spec.serveService.spec.ports", "no port 8001")


# ------------------------------------------------------------------------------- the machinery, and the CLI


def test_cli_validate_reports_a_broken_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("README.md", "images"))
    rs = tmp_path / "k8s/overlays/gpu-prod/rayservice.yaml"
    rs.write_text(rs.read_text().replace("deployments.app:build_app", "deployments.app:build", 1))
    assert k8s_main(["k8s", "validate", str(tmp_path / "k8s"), "--skip-crds"]) == 1
    err = capsys.readouterr().err
    assert "- gpu-prod: RayService/coe: spec.serveConfigV2: applications[0].import_path" in err
    assert "- cpu-demo" not in err


def test_kustomize_strategic_merge_patch(tmp_path: Path) -> None:
    shutil.copytree(K8S / "base", tmp_path / "base")
    shutil.copytree(K8S / "overlays/cpu-demo", tmp_path / "overlays/demo")
    (tmp_path / "overlays/demo/bigger.yaml").write_text(yaml.safe_dump({
        "apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "coe"},
        "spec": {"rayClusterConfig": {"workerGroupSpecs": [{"groupName": "cpu", "maxReplicas": 4}]}}}))
    k = yaml.safe_load((tmp_path / "overlays/demo/kustomization.yaml").read_text())
    k["patches"] = [{"path": "bigger.yaml"}]
    (tmp_path / "overlays/demo/kustomization.yaml").write_text(yaml.safe_dump(k))
    objs = build_kustomization(tmp_path / "overlays/demo")
    # Worker groups are a list without "name": strategic merge replaces it (as kustomize does for CRDs).
    groups = obj(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups == [{"groupName": "cpu", "maxReplicas": 4}]
    assert obj(objs, "RayService")["spec"]["serveConfigV2"]
    k["helmCharts"] = [{"name": "x"}]
    (tmp_path / "overlays/demo/kustomization.yaml").write_text(yaml.safe_dump(k))
    with pytest.raises(KustomizeError, match="unsupported kustomization fields"):
        build_kustomization(tmp_path / "overlays/demo")


def test_strict_schema_handles_kubernetes_extensions() -> None:
    s = strict_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "obj": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {"spec": {"type": "object"}}},
        "n": {"type": "integer", "format": "int32"},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
    }})
    assert s["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["raw"]
    assert {"apiVersion", "kind", "metadata"} <= set(s["properties"]["obj"]["properties"])
    assert s["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert s["properties"]["n"]["maximum"] == 2**31 - 1
    assert s["properties"]["tags"]["uniqueItems"] is True


def test_duplicate_container_names_are_caught(built: Built, crd_dir: Path) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        cs = worker_groups(d)[0]["template"]["spec"]["containers"]
        cs.append(dict(cs[0]))

    assert_caught(problems_after(built, "cpu-demo", mutate, crd_dir), "containers", "duplicate entry",
                  "'ray-worker'")


@pytest.mark.parametrize(("q", "v"), [("500m", 0.5), ("2", 2.0), (4, 4.0), ("8Gi", 8 * 2**30), ("1e3", 1000.0),
                                      ("1.5k", 1500.0)])
def test_parse_quantity(q: Any, v: float) -> None:
    assert parse_quantity(q) == pytest.approx(v)


def test_objects_without_rayservice() -> None:
    assert_caught(validate_objects([], require_crds=False), "no RayService")


# ------------------------------------------------------------------------------------------- access control


def _head(d: dict[str, Any]) -> dict[str, Any]:
    return d["spec"]["rayClusterConfig"]["headGroupSpec"]


def _statefulset(objs: list[Obj], name: str) -> dict[str, Any]:
    return next(o for o in objs if o.kind == "StatefulSet" and o.name == name).doc


def _policy(objs: list[Obj], name: str) -> dict[str, Any]:
    return next(o for o in objs if o.kind == "NetworkPolicy" and o.name == name).doc


def _env_entry(c: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in c["env"] if e["name"] == name)


@pytest.mark.parametrize("auth", [None, {"mode": "disabled"}])
def test_dashboard_on_all_interfaces_needs_token_auth(built: Built, auth: dict[str, str] | None) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        if auth is None:
            del d["spec"]["rayClusterConfig"]["authOptions"]
        else:
            d["spec"]["rayClusterConfig"]["authOptions"] = auth

    assert_caught(problems_after(built, "cpu-demo", mutate), "rayClusterConfig.authOptions",
                  "dashboard-host 0.0.0.0 requires authOptions.mode token")


def test_dashboard_default_host_needs_token_auth_too(built: Built) -> None:
    """KubeRay binds the dashboard to 0.0.0.0 when dashboard-host is not given."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        del d["spec"]["rayClusterConfig"]["authOptions"]
        del _head(d)["rayStartParams"]["dashboard-host"]

    assert_caught(problems_after(built, "gpu-prod", mutate), "requires authOptions.mode token")


def test_loopback_dashboard_does_not_need_token_auth(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        del d["spec"]["rayClusterConfig"]["authOptions"]
        _head(d)["rayStartParams"]["dashboard-host"] = "127.0.0.1"

    assert not any("authOptions" in p for p in problems_after(built, "cpu-demo", mutate))


def test_auth_token_crd_fields(built: Built, crd_dir: Path) -> None:
    """authOptions is checked against the v1.7 CRD like every field (mode is an enum there)."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        d["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "Token", "secretname": "x"}

    probs = problems_after(built, "cpu-demo", mutate, crd_dir)
    assert_caught(probs, "authOptions.secretname", "did you mean 'secretName'", "KubeRay CRD")
    assert_caught(probs, "authOptions.mode", "KubeRay CRD")


def test_redis_needs_a_network_policy(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        objs[:] = [o for o in objs if not (o.kind == "NetworkPolicy" and o.name == "coe-state-redis")]

    assert_caught(problems_after(built, "cpu-demo", mutate), "StatefulSet/coe-state-redis",
                  "no NetworkPolicy with ingress rules selects Redis 'coe-state-redis'")


def test_ray_pods_need_a_network_policy(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        objs[:] = [o for o in objs if not (o.kind == "NetworkPolicy" and o.name == "coe-ray")]

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "headGroupSpec.template", "no NetworkPolicy with ingress rules selects the Ray head")
    assert_caught(probs, "workerGroupSpecs[2].template", "selects Ray worker group 'gpu-2x'")


def test_egress_only_policy_does_not_count(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        _policy(objs, "coe-gcs-redis")["spec"]["policyTypes"] = ["Egress"]

    assert_caught(problems_after(built, "cpu-demo", mutate), "selects Redis 'coe-redis'")


@pytest.mark.parametrize("rule", [
    {},
    {"from": []},
    {"from": [{"podSelector": {}}]},
    {"from": [{"namespaceSelector": {}}]},
    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 6379}]},
])
def test_no_policy_admits_everything_to_redis(built: Built, rule: dict[str, Any]) -> None:
    """NetworkPolicies add up: one open rule in any policy selecting Redis opens it to everyone."""
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        _policy(objs, "coe-gcs-redis")["spec"]["ingress"].append(rule)

    assert_caught(problems_after(built, "cpu-demo", mutate), "NetworkPolicy/coe-gcs-redis", "spec.ingress[1].from",
                  "admits every source to Redis 'coe-redis'")


def test_redis_admits_only_pods_of_its_namespace(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        _policy(objs, "coe-state-redis")["spec"]["ingress"][0]["from"].append(
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})

    assert_caught(problems_after(built, "gpu-prod", mutate), "NetworkPolicy/coe-state-redis",
                  "outside the namespace to Redis 'coe-state-redis'")


def test_ray_pods_admit_other_namespaces_only_on_listed_ports(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        rules = _policy(objs, "coe-ray")["spec"]["ingress"]
        del rules[1]["ports"]  # the Ingress controller's namespace, now on every Ray port
        rules.append({"from": [{"namespaceSelector": {}}], "ports": [{"port": 8265}]})

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "NetworkPolicy/coe-ray", "spec.ingress[1].ports", "admits every port of the Ray head")
    assert_caught(probs, "NetworkPolicy/coe-ray", "spec.ingress[4].from", "admits every source")


@pytest.mark.parametrize(("where", "fragment"), [
    ("worker", "readOnlyRootFilesystem: true"),
    ("head", "allowPrivilegeEscalation: false"),
    ("autoscaler", "capabilities.drop: [ALL]"),
    ("redis", "runAsUser (numeric"),
    ("redis-root", "runAsUser other than 0"),
    ("seccomp", "seccompProfile.type: RuntimeDefault"),
    ("nonroot", "runAsNonRoot: true"),
])
def test_every_container_is_hardened(built: Built, where: str, fragment: str) -> None:
    def mutate(d: dict[str, Any], objs: list[Obj]) -> None:
        redis = _statefulset(objs, "coe-state-redis")["spec"]["template"]["spec"]
        if where == "worker":
            worker_container(d)["securityContext"]["readOnlyRootFilesystem"] = False
        elif where == "head":
            del _head(d)["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
        elif where == "autoscaler":
            d["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]["capabilities"] = {"add": ["NET_RAW"]}
        elif where == "redis":
            del redis["securityContext"]["runAsUser"]
        elif where == "redis-root":
            redis["containers"][0]["securityContext"]["runAsUser"] = 0
        elif where == "seccomp":
            del redis["securityContext"]["seccompProfile"]
        elif where == "nonroot":
            worker_container(d)["securityContext"]["runAsNonRoot"] = False

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "securityContext", "is not hardened", fragment)


def test_pod_level_settings_count_for_every_container(built: Built) -> None:
    """runAsNonRoot, runAsUser and seccompProfile may come from the pod; the container may override them."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        pod = worker_groups(d)[0]["template"]["spec"]["securityContext"]
        worker_container(d)["securityContext"]["seccompProfile"] = pod.pop("seccompProfile")

    assert not any("not hardened" in p for p in problems_after(built, "cpu-demo", mutate))


def test_writable_paths_need_volumes(built: Built) -> None:
    """With a read-only root filesystem, Ray's /tmp and every cache the env names must be on a writable volume."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        c = worker_container(d, 1)
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]
        _env_entry(c, "HF_HOME")["value"] = "/home/ray/hf"
        for m in c["volumeMounts"]:
            if m["name"] == "cache":
                m["readOnly"] = True

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "workerGroupSpecs[1]", "/tmp (Ray writes /tmp) is not on a writable volume")
    assert_caught(probs, "workerGroupSpecs[1]", "/home/ray/hf (HF_HOME=/home/ray/hf) is not on a writable volume")
    assert_caught(probs, "workerGroupSpecs[1]", "/var/cache/coe/models (COE_MODEL_CACHE_DIR")


def test_old_cache_mount_hiding_the_router_artifact_is_caught(built: Built) -> None:
    """The bug this rule exists for: cpu-demo mounted an emptyDir at /home/ray/.cache, hiding the router artifact
    Dockerfile.cpu builds at ~/.cache/coe/routers/cpu-default, so the ingress could not start."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        c = worker_container(d)
        c["volumeMounts"].append({"name": "model-cache", "mountPath": "/home/ray/.cache"})
        worker_groups(d)[0]["template"]["spec"]["volumes"].append({"name": "model-cache", "emptyDir": {"sizeLimit": "10Gi"}})

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "workerGroupSpecs[0].template.spec.containers[0].volumeMounts",
                  "'model-cache' mounted at /home/ray/.cache hides /home/ray/.cache/coe/routers/cpu-default",
                  "router.artifact")


@pytest.mark.parametrize("mount", ["/home/ray/.cache/coe/routers/cpu-default", "/home/ray", "/home/ray/.cache/"])
def test_any_mount_at_or_above_the_artifact_is_caught(built: Built, mount: str) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        _head(d)["template"]["spec"]["containers"][0]["volumeMounts"].append({"name": "cache", "mountPath": mount})

    assert_caught(problems_after(built, "cpu-demo", mutate), "headGroupSpec", f"mounted at {mount}", "hides",
                  "router.artifact")


def test_artifact_path_follows_home_and_env(built: Built) -> None:
    """`~` is the pod's HOME and $VARs are the pod's env, as coe expands them."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        def edit(c: dict[str, Any]) -> None:
            c["applications"][0]["args"]["config_inline"]["router"]["artifact"] = "$COE_ROUTERS/demo"

        edit_serve_config(d, edit)
        worker_container(d)["env"].append({"name": "COE_ROUTERS", "value": "/var/cache/coe/routers"})

    assert_caught(problems_after(built, "cpu-demo", mutate), "'cache' mounted at /var/cache/coe hides "
                                                             "/var/cache/coe/routers/demo")


def test_expert_source_path_must_not_be_hidden(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        def edit(c: dict[str, Any]) -> None:
            c["applications"][0]["args"]["config_inline"]["experts"][0]["source"] = {"path": "/tmp/models/g.gguf"}

        edit_serve_config(d, edit)

    assert_caught(problems_after(built, "cpu-demo", mutate), "'tmp' mounted at /tmp hides /tmp/models/g.gguf",
                  "experts[0].source.path (general)")


def test_mount_over_the_image_cache_is_a_warning(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        _env_entry(worker_container(d), "COE_CACHE_DIR")["value"] = "/var/cache/coe/coe"

    objs = copy.deepcopy(built["cpu-demo"])
    mutate(next(o for o in objs if o.kind == "RayService").doc, objs)
    warnings: list[str] = []
    assert validate_objects(objs, require_crds=False, warnings=warnings) == []
    assert_caught(warnings, "hides coe's image cache COE_CACHE_DIR=/var/cache/coe/coe")


def test_every_ray_pod_carries_the_admin_key(built: Built) -> None:
    """Ray may place an ingress replica on any pod with spare CPU, GPU pods included."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        c = worker_container(d, 2)
        c["env"] = [e for e in c["env"] if e["name"] != "COE_ADMIN_KEY_FILE"]

    assert_caught(problems_after(built, "gpu-prod", mutate), "workerGroupSpecs[2]",
                  "COE_ADMIN_KEY_FILE is not set on Ray worker group 'gpu-2x'", "without API keys")


def test_admin_key_file_must_be_a_mounted_secret(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        _env_entry(worker_container(d), "COE_ADMIN_KEY_FILE")["value"] = "/tmp/admin-key"
        for m in _head(d)["template"]["spec"]["containers"][0]["volumeMounts"]:
            if m["name"] == "admin-key":
                m["readOnly"] = False

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "workerGroupSpecs[0]", "'/tmp/admin-key' is not in a mounted Secret volume")
    assert_caught(probs, "headGroupSpec", "the admin key mount at /etc/coe/secrets must be readOnly")


def test_admin_key_never_literal_and_auth_never_off(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        c = worker_container(d)
        c["env"] = [e for e in c["env"] if e["name"] != "COE_ADMIN_KEY_FILE"]
        c["env"] += [{"name": "COE_ADMIN_KEY", "value": "0123456789abcdef0123"},
                     {"name": "COE_INSECURE_NO_AUTH", "value": "true"}]

    probs = problems_after(built, "cpu-demo", mutate)
    assert_caught(probs, "env.COE_ADMIN_KEY", "must come from a Secret")
    assert_caught(probs, "env.COE_INSECURE_NO_AUTH", "not allowed")
    assert_caught(probs, "env[", "env COE_ADMIN_KEY holds a literal credential")


def test_head_and_every_worker_group_have_a_disruption_budget(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        objs[:] = [o for o in objs if not (o.kind == "PodDisruptionBudget" and o.name in ("coe-ray-head",
                                                                                          "coe-ray-worker-gpu-1x"))]

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "headGroupSpec.template", "no PodDisruptionBudget covers the Ray head")
    assert_caught(probs, "workerGroupSpecs[1].template", "no PodDisruptionBudget covers Ray worker group 'gpu-1x'")
    assert not any("'gpu-2x'" in p for p in probs)


def test_plaintext_secret_objects_are_refused(built: Built) -> None:
    """The committed cpu-demo Secrets (coe-demo-key ...) must never come back."""
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        objs += [Obj(doc, "<test>") for doc in R.generated_secrets("coe-demo")]

    probs = problems_after(built, "cpu-demo", mutate)
    for name in R.required_secrets():
        assert_caught(probs, f"Secret/{name}: stringData", "credentials must never be committed", "coe k8s secrets")


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("HF_TOKEN", "hf_abcdef", "env HF_TOKEN holds a literal credential"),
    ("REDIS_PASSWORD", "hunter2", "env REDIS_PASSWORD holds a literal credential"),
    ("OPENAI_API_KEY", "sk-123", "env OPENAI_API_KEY holds a literal credential"),
    ("COE_REDIS_URL", "redis://:hunter2@coe-state-redis:6379/0", "env COE_REDIS_URL is a URL with a literal password"),
    ("BACKUP_URL", "rediss://default:pw@example:6380", "is a URL with a literal password"),
])
def test_plaintext_credentials_in_env_are_refused(built: Built, name: str, value: str, fragment: str) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        c = worker_container(d)
        c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, "value": value}]

    assert_caught(problems_after(built, "cpu-demo", mutate), "workerGroupSpecs[0]", fragment)


def test_redis_password_flag_must_be_a_reference(built: Built) -> None:
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        _statefulset(objs, "coe-redis")["spec"]["template"]["spec"]["containers"][0]["args"][1] = "hunter2"

    assert_caught(problems_after(built, "cpu-demo", mutate), "StatefulSet/coe-redis",
                  "--requirepass is given a literal password")


def test_credential_in_serve_config_is_refused(built: Built) -> None:
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: c["applications"][0].update(runtime_env={"env_vars": {"COE_ADMIN_KEY": "x"}}))

    assert_caught(problems_after(built, "cpu-demo", mutate), "runtime_env.env_vars.COE_ADMIN_KEY",
                  "a credential in serveConfigV2")


@pytest.mark.parametrize(("name", "expected"), [
    ("HF_TOKEN", True), ("REDIS_PASSWORD", True), ("COE_ADMIN_KEY", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("COE_ADMIN_KEY_FILE", False), ("RAY_AUTH_TOKEN_PATH", False), ("TOKENIZERS_PARALLELISM", False),
    ("COE_REDIS_URL", False), ("HF_HOME", False), ("KEYCLOAK_HOST", False),
])
def test_credential_names(name: str, expected: bool) -> None:
    assert credential_name(name) is expected


def test_state_redis_eviction_policy(built: Built) -> None:
    """coe's state Redis may evict only keys with a TTL (never team API keys); the GCS Redis never evicts."""
    def mutate(_: dict[str, Any], objs: list[Obj]) -> None:
        args = _statefulset(objs, "coe-state-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
        args[args.index("--maxmemory-policy") + 1] = "allkeys-lru"
        gcs = _statefulset(objs, "coe-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
        gcs[gcs.index("--maxmemory-policy") + 1] = "volatile-lru"

    probs = problems_after(built, "gpu-prod", mutate)
    assert_caught(probs, "StatefulSet/coe-state-redis", "volatile-* --maxmemory-policy", "allkeys-lru")
    assert_caught(probs, "StatefulSet/coe-redis", "GCS fault tolerance needs noeviction")


def test_production_images_must_be_pinned_by_digest(crd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gpu-prod's placeholder images are tags: a warning, an error with --strict; cpu-demo does not warn."""
    warnings: list[str] = []
    assert validate_tree(K8S / "overlays" / "gpu-prod", crd_dir=crd_dir, warnings=warnings) == []
    assert_caught(warnings, "gpu-prod: RayService/coe", "workerGroupSpecs[1]", "'ghcr.io/coe-project/coe:0.1.0-gpu' "
                  "is a mutable tag in the production profile gpu-prod", "gpu_image_digest")
    assert_caught(warnings, "StatefulSet/coe-state-redis", "'redis:7.4-alpine' is a mutable tag")
    demo: list[str] = []
    assert validate_tree(K8S / "overlays" / "cpu-demo", crd_dir=crd_dir, warnings=demo) == [] and demo == []
    assert k8s_main(["k8s", "validate", str(K8S / "overlays" / "gpu-prod"), "--crds", str(crd_dir)]) == 0
    assert "warning: gpu-prod: " in capsys.readouterr().err
    assert k8s_main(["k8s", "validate", str(K8S / "overlays" / "gpu-prod"), "--crds", str(crd_dir), "--strict"]) == 1
    assert "mutable tag in the production profile gpu-prod: pin it by digest" in capsys.readouterr().err


def test_digest_pinned_production_render_has_no_warning(tmp_path: Path) -> None:
    digests = {k: "sha256:" + c * 64 for k, c in (("image_digest", "a"), ("gpu_image_digest", "b"),
                                                     ("redis_image_digest", "c"))}
    options = R.cluster_options("gpu-prod", digests)
    files = {**R.render_base(options), **R.render_overlay(load_config("gpu-experts"), options,
                                                          config_ref="gpu-experts", profile="gpu-prod")}
    R.write_tree(files, tmp_path)
    warnings: list[str] = []
    assert validate_tree(tmp_path, require_crds=False, warnings=warnings) == []
    assert warnings == []
    text = (tmp_path / "overlays/gpu-prod/rayservice.yaml").read_text()
    assert "image: ghcr.io/coe-project/coe:0.1.0-gpu@sha256:" + "b" * 64 in text
    assert "redis:7.4-alpine@sha256:" + "c" * 64 in (tmp_path / "base/redis.yaml").read_text()


def test_worker_grace_period_shorter_than_the_longest_call_is_caught(built: Built) -> None:
    """A draining worker must outlive Serve's graceful shutdown, or Kubernetes kills requests it still holds."""
    def mutate(d: dict[str, Any], _: list[Obj]) -> None:
        for g in worker_groups(d):
            g["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    assert_caught(problems_after(built, "cpu-demo", mutate), "terminationGracePeriodSeconds", "graceful shutdown")


def test_vllm_engine_kwargs_travel_in_config_inline_and_owned_keys_are_caught(built: Built) -> None:
    """engine_kwargs ride in serveConfigV2's config_inline; one that overrides what coe sets is refused."""
    def expert(c: dict[str, Any]) -> dict[str, Any]:
        return next(e for e in c["applications"][0]["args"]["config_inline"]["experts"] if e["engine"] == "vllm")

    def ok(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: expert(c)["vllm"].update(
            engine_kwargs={"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}))

    probs = problems_after(built, "gpu-prod", ok)  # only the hand edit itself is reported (hash, staleness)
    assert not any("coe sets them" in p or "unknown" in p for p in probs), probs

    def owned(d: dict[str, Any], _: list[Obj]) -> None:
        edit_serve_config(d, lambda c: expert(c)["vllm"].update(engine_kwargs={"tensor_parallel_size": 8}))

    assert_caught(problems_after(built, "gpu-prod", owned), "engine_kwargs", "coe sets them")
