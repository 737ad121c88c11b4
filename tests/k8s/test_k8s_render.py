"""`coe k8s render`: the committed k8s/ tree is its output, and serveConfigV2 is exactly what `coe serve` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coe.config import load_config
from coe.errors import ConfigError
from coe.k8s import render as R
from coe.k8s.cli import main as k8s_main
from tests.k8s.helpers import K8S, OVERLAYS

GENERATED_DIRS = ("base", "overlays")


def _committed_files() -> dict[str, str]:
    return {str(p.relative_to(K8S)): p.read_text()
            for d in GENERATED_DIRS for p in sorted((K8S / d).rglob("*")) if p.is_file()}


def test_committed_manifests_are_fresh() -> None:
    fresh = R.render_committed()
    committed = _committed_files()
    stale = sorted(rel for rel in fresh if committed.get(rel) != fresh[rel])
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, (
        f"k8s/ is stale (differs from a fresh render: {stale}; not generated: {extra}). "
        f"Regenerate with `{R.REGENERATE_CMD}` (or `python -m coe.k8s.cli k8s render --all`) and commit the result."
    )


def test_render_is_deterministic() -> None:
    assert R.render_committed() == R.render_committed()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_the_coe_serve_app(overlay: str) -> None:
    """serveConfigV2 = build_app's import path + args carrying the whole validated config, at route '/'."""
    ref = R.COMMITTED_OVERLAYS[overlay]
    config = load_config(ref)
    rs = yaml.safe_load((K8S / "overlays" / overlay / "rayservice.yaml").read_text())
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve == R.serve_config(config, R.cluster_options(overlay))
    (app,) = serve["applications"]
    assert app["import_path"] == "deployments.app:build_app"
    assert app["name"] == config.app_name and app["route_prefix"] == "/"
    assert app["args"] == {"config_inline": config.model_dump(mode="json")}
    assert "deployments" not in app, "build_app applies every deployment option; no second copy in the manifest"
    assert serve["http_options"]["port"] == config.server.port
    assert serve["http_options"]["request_timeout_s"] == config.server.request_timeout_s

    from deployments.app import AppArgs

    assert AppArgs.model_validate(app["args"]).load() == config
    assert rs["metadata"]["annotations"][R.ANN_CONFIG] == ref
    assert rs["metadata"]["annotations"][R.ANN_CONFIG_SHA] == R.config_sha256(app["args"]["config_inline"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_groups_follow_the_config(overlay: str) -> None:
    config = load_config(R.COMMITTED_OVERLAYS[overlay])
    rs = yaml.safe_load((K8S / "overlays" / overlay / "rayservice.yaml").read_text())
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu_shapes = {int(-(-e.resources.num_gpus // 1)) for e in config.experts if e.resources.num_gpus > 0}
    assert set(groups) == {"cpu"} | {f"gpu-{n}x" for n in gpu_shapes}
    for n in gpu_shapes:
        spec = groups[f"gpu-{n}x"]["template"]["spec"]
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(n)
        assert c["image"].endswith("-gpu")
        assert spec["tolerations"] and spec["nodeSelector"]
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_cli_render_all_reproduces_k8s(tmp_path: Path) -> None:
    assert k8s_main(["k8s", "render", "--all", "--out", str(tmp_path), "--no-validate"]) == 0
    got = {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert got == _committed_files()


def test_cli_render_custom_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Any config renders into base + overlays/<overlay>, with options from flags, and validates."""
    cfg = load_config("cpu-default").model_dump(mode="json")
    cfg["experts"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    cfg_path = tmp_path / "mine.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    rc = k8s_main(["k8s", "render", "--config", str(cfg_path), "--out", str(out), "--name", "coe-staging",
                   "--namespace", "staging", "--image", "registry.local/coe:cpu", "--overlay", "staging"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "valid: staging" in printed.out
    kust = yaml.safe_load((out / "overlays/staging/kustomization.yaml").read_text())
    assert kust["namespace"] == "staging"
    rs = yaml.safe_load((out / "overlays/staging/rayservice.yaml").read_text())
    assert rs["metadata"]["name"] == "coe-staging"
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.local/coe:cpu"
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] >= 2


def test_cluster_options_are_strict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'cpu_grup'"):
        R.cluster_options("cpu-demo", {"cpu_grup": {"cpu": 4}})
    with pytest.raises(ConfigError, match="unknown k8s profile"):
        R.cluster_options("gpu-demo")
    bad = tmp_path / "opts.yaml"
    bad.write_text("head: {cpus: 2}\n")
    assert k8s_main(["k8s", "render", "--config", "cpu-default", "--out", str(tmp_path / "o"),
                     "--options", str(bad)]) == 1


def test_serve_config_survives_the_yaml_block_literal() -> None:
    """Multi-line prompt templates and stop strings round-trip through the serveConfigV2 string."""
    config = load_config("cpu-default")
    doc = yaml.safe_load(R.dump_yaml(R.rayservice(config, R.cluster_options("cpu-demo"), "cpu-default", "cpu-demo")))
    assert "\n" in config.expert("translation").prompt.template
    assert yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["config_inline"] == \
        config.model_dump(mode="json")


def test_readme_states_the_upgrade_spare_capacity() -> None:
    readme = (K8S / "README.md").read_text()
    for overlay, ref in R.COMMITTED_OVERLAYS.items():
        spare = R.upgrade_spare_capacity(load_config(ref), R.cluster_options(overlay))
        assert str(spare) in readme, f"k8s/README.md must state the spare capacity of {overlay}: {spare}"
        assert str(spare) in (K8S / "overlays" / overlay / "rayservice.yaml").read_text()


def test_readme_scaling_table_matches_the_render() -> None:
    rows = {}
    for line in (K8S / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in R.COMMITTED_OVERLAYS:
            rows[(cells[0], cells[1])] = (int(cells[3]), int(cells[4]))
    expected = {(o, p.name): (p.min_pods, p.max_pods) for o, ref in R.COMMITTED_OVERLAYS.items()
                for p in R.plan_groups(load_config(ref), R.cluster_options(o))}
    assert rows == expected, "update the scaling table in k8s/README.md"


def test_coe_k8s_imports_neither_deployments_nor_test_extras() -> None:
    code = ("import sys, coe.k8s.render, coe.k8s.validate, coe.k8s.cli; "
            "bad = [m for m in ('deployments', 'jsonschema', 'kubernetes_validate', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_credential_is_committed() -> None:
    """No Secret object, demo value or obsolete API-key variable anywhere in the generated tree."""
    for rel, text in _committed_files().items():
        assert "kind: Secret" not in text, rel
        for gone in ("coe-demo-key", "coe-demo-redis-password", "COE_API_KEYS", "coe-api-keys", "stringData"):
            assert gone not in text, f"{rel} contains {gone}"
    assert not (K8S / "overlays" / "cpu-demo" / "secrets.yaml").exists()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_coe_state_redis_is_not_the_gcs_redis(overlay: str) -> None:
    rs = yaml.safe_load((K8S / "overlays" / overlay / "rayservice.yaml").read_text())
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["gcsFaultToleranceOptions"]["redisAddress"] == "coe-redis:6379"
    for g in rc["workerGroupSpecs"]:
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env["COE_REDIS_URL"]["value"] == "redis://:$(COE_STATE_REDIS_PASSWORD)@coe-state-redis:6379/0"
        assert env["COE_STATE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "coe-state-redis",
                                                                               "key": "password"}
        assert env["COE_ADMIN_KEY_FILE"]["value"] == "/etc/coe/secrets/admin-key"
    with pytest.raises(ConfigError, match="state_redis_host must not be the GCS Redis"):
        R.cluster_options(overlay, {"state_redis_host": "coe-redis"})


def test_image_digest_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="image_digest: .*64 lowercase hex"):
        R.cluster_options("gpu-prod", {"image_digest": "sha256:abc"})
    with pytest.raises(ConfigError, match="give the digest in gpu_image_digest"):
        R.cluster_options("gpu-prod", {"gpu_image": "registry/coe@sha256:" + "0" * 64})
    opts = R.cluster_options("gpu-prod", {"image_digest": "sha256:" + "0" * 64})
    assert opts.image_ref() == "ghcr.io/coe-project/coe:0.1.0-cpu@sha256:" + "0" * 64
    assert opts.image_ref(gpu=True) == "ghcr.io/coe-project/coe:0.1.0-gpu"


def test_network_policy_namespaces_are_options() -> None:
    config = load_config("gpu-experts")
    opts = R.cluster_options("gpu-prod", {"ingress_namespace_selector": {"team": "edge"},
                                          "monitoring_namespace_selector": None})
    ray = next(p for p in R.network_policies(config, opts) if p["metadata"]["name"] == "coe-ray")
    rules = ray["spec"]["ingress"]
    assert rules[1] == {"from": [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}],
                        "ports": [{"protocol": "TCP", "port": 8000}]}
    assert len(rules) == 3, "no scraping rule without a monitoring namespace"
    default = R.cluster_options("gpu-prod")
    assert default.ingress_namespace_selector == {"kubernetes.io/metadata.name": "ingress-nginx"}


def test_cli_secrets_prints_fresh_random_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert k8s_main(["k8s", "secrets", "--namespace", "coe-demo"]) == 0
    first = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(first.out) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == R.required_secrets()
    assert all(d["kind"] == "Secret" and d["metadata"]["namespace"] == "coe-demo" for d in docs)
    values = {d["metadata"]["name"]: d["stringData"] for d in docs}
    for name in (R.REDIS_SECRET, R.STATE_REDIS_SECRET):
        pw = values[name]["password"]
        assert len(pw) == 64 and all(ch in "0123456789abcdef" for ch in pw), "hex: it goes into COE_REDIS_URL"
    assert len(values[R.ADMIN_KEY_SECRET]["admin-key"]) >= 40
    assert "kubectl -n coe-demo get secret coe-admin-key -o jsonpath='{.data.admin-key}' | base64 -d" in first.err
    assert "coe-hf-token" not in first.err
    assert k8s_main(["k8s", "secrets", "--namespace", "coe", "--profile", "gpu-prod"]) == 0
    second = capsys.readouterr()
    again = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(second.out) if d}
    assert all(again[n] != values[n] for n in values), "every run generates new values"
    assert "create secret generic coe-hf-token" in second.err


def test_readme_deploys_with_generated_secrets() -> None:
    readme = (K8S / "README.md").read_text()
    assert "coe k8s secrets --namespace coe-demo | kubectl apply -f -" in readme
    assert "coe k8s secrets --namespace coe --profile gpu-prod | kubectl apply -f -" in readme
    for gone in ("coe-api-keys", "demo Secrets", "database 1", "secrets.yaml"):
        assert gone not in readme, f"k8s/README.md still mentions {gone}"
