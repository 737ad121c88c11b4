"""Offline validation: both overlays pass everything; each kind of broken manifest is caught with a clear message."""

from __future__ import annotations

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
    expected = (["Ingress", "PodMonitor", "PodMonitor", "RayService", "Service", "Service", "StatefulSet",
                 "StatefulSet"] + ["NetworkPolicy"] * 3 + ["PodDisruptionBudget"] * (1 + groups))
    assert kinds == sorted(expected), "no Secret is ever rendered: `coe k8s secrets` creates them"
    ns = {"cpu-demo": "coe-demo", "gpu-prod": "coe"}[overlay]
    assert all(o.doc["metadata"]["namespace"] == ns for o in built[overlay])
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
