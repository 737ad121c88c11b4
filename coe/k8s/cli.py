"""`coe k8s render | validate`: Kubernetes manifests from the coe config, checked offline.

    coe k8s render --all                                   # re-render the committed k8s/ tree
    coe k8s render --config my.yaml --profile gpu-prod --out deploy/k8s [--name ... --image ...]
    coe k8s validate k8s/                                  # every overlay, as `kubectl apply -k` sees it
    coe k8s secrets --namespace coe | kubectl apply -f -   # the Secrets, with fresh random values

Also runnable as `python -m coe.k8s.cli ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml


def add_k8s_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from coe.k8s.render import COMMITTED_OVERLAYS, PROFILES

    k = sub.add_parser("k8s", help="render and validate the Kubernetes (KubeRay RayService) manifests")
    ks = k.add_subparsers(dest="k8s_command", required=True)

    committed = ", ".join(f"{o} <- {c}" for o, c in COMMITTED_OVERLAYS.items())
    r = ks.add_parser("render", help="write a kustomize tree (base + overlay) from a coe config",
                      description="Render Kubernetes manifests from a coe config into OUT/base and "
                                  "OUT/overlays/<overlay>, then validate them offline.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="coe config file or packaged name (cpu-default, gpu-experts)")
    src.add_argument("--all", action="store_true", help=f"re-render the committed tree ({committed})")
    r.add_argument("--out", help="output directory (default with --all: the repository's k8s/)")
    r.add_argument("--profile", choices=sorted(PROFILES), help="cluster preset (default: gpu-prod when an expert "
                                                                "needs a GPU, else cpu-demo)")
    r.add_argument("--overlay", help="overlay directory name (default: the profile)")
    r.add_argument("--options", help="YAML file of cluster options overriding the profile (unknown keys are errors)")
    r.add_argument("--name", help="RayService name (default coe)")
    r.add_argument("--namespace", help="namespace of every object")
    r.add_argument("--image", help="image of the head and CPU workers")
    r.add_argument("--gpu-image", help="image of the GPU workers (carries vLLM)")
    r.add_argument("--no-validate", action="store_true", help="skip the offline validation after rendering")
    r.add_argument("--crds", help="directory with KubeRay's CRDs (default: $COE_SHARED_DATA/k8s)")
    r.set_defaults(func=cmd_render)

    v = ks.add_parser("validate", help="validate manifests offline (CRDs, Kubernetes schemas, serveConfigV2)")
    v.add_argument("dir", help="a kustomization directory, or a tree with overlays/*")
    v.add_argument("--crds", help="directory with KubeRay's CRDs (default: $COE_SHARED_DATA/k8s)")
    v.add_argument("--skip-crds", action="store_true", help="do not fail when the CRDs are not available")
    v.add_argument("--strict", action="store_true", help="warnings (e.g. a production image not pinned by digest) "
                                                         "are errors")
    v.set_defaults(func=cmd_validate)

    s = ks.add_parser("secrets", help="print the Secrets the manifests need, with fresh random values",
                      description="Print the Secret manifests the rendered overlays reference (admin key, both "
                                  "Redis passwords) with freshly generated random values, for `kubectl apply -f -`. "
                                  "Nothing is written to disk. Running it again generates new values: applying "
                                  "them rotates every credential (use `kubectl create -f -` to add only missing "
                                  "ones).")
    s.add_argument("--namespace", required=True, help="namespace of the Secrets (the overlay's namespace)")
    s.add_argument("--profile", choices=sorted(PROFILES), default="cpu-demo",
                   help="cluster preset (gpu-prod also needs the optional Hugging Face token Secret, see the hint)")
    s.set_defaults(func=cmd_secrets)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from coe.errors import ConfigError

    data: dict[str, Any] = {}
    if args.options:
        try:
            loaded = yaml.safe_load(Path(args.options).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read cluster options {args.options}: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"cluster options {args.options}: top level must be a mapping")
        data.update(loaded)
    for flag, key in (("name", "name"), ("namespace", "namespace"), ("image", "image"), ("gpu_image", "gpu_image")):
        if getattr(args, flag):
            data[key] = getattr(args, flag)
    return data


def cmd_render(args: argparse.Namespace) -> int:
    from coe.config import load_config
    from coe.errors import ConfigError
    from coe.k8s import render as R
    from coe.k8s.validate import REPO_ROOT

    overrides = _overrides(args)
    if args.all:
        if overrides or args.profile or args.overlay:
            raise ConfigError("--all renders the committed overlays with their presets; "
                              "use --config for other options")
        out = Path(args.out) if args.out else (REPO_ROOT / "k8s" if (REPO_ROOT / "k8s").is_dir() else Path("k8s"))
        files = R.render_committed()
        overlays = list(R.COMMITTED_OVERLAYS)
    else:
        if not args.out:
            raise ConfigError("--out is required with --config")
        out = Path(args.out)
        config = load_config(args.config)
        profile = args.profile or R.default_profile(config)
        options = R.cluster_options(profile, overrides)
        overlay = args.overlay or profile
        files = {**R.render_base(options),
                 **R.render_overlay(config, options, config_ref=args.config, profile=profile, overlay=overlay)}
        overlays = [overlay]
    R.write_tree(files, out)
    print(f"wrote {len(files)} files under {out}/ (overlays: {', '.join(overlays)})")
    if args.no_validate:
        return 0
    return _report([out / "overlays" / o for o in overlays], args.crds, require_crds=False)


def cmd_validate(args: argparse.Namespace) -> int:
    from coe.k8s.validate import kustomization_dirs

    dirs = kustomization_dirs(args.dir)
    if not dirs:
        print(f"coe: {args.dir}: no kustomization.yaml here nor under overlays/*", file=sys.stderr)
        return 1
    return _report(dirs, args.crds, require_crds=not args.skip_crds, strict=args.strict)


def cmd_secrets(args: argparse.Namespace) -> int:
    from coe.k8s import render as R

    ns = args.namespace
    print(R.dump_docs(R.generated_secrets(ns), "# Generated by `coe k8s secrets`: random values, do not commit.\n"),
          end="")
    hint = [
        f"coe: {len(R.required_secrets())} Secrets for namespace {ns} on stdout (pipe them to `kubectl apply -f -`).",
        f"coe: the admin key: kubectl -n {ns} get secret {R.ADMIN_KEY_SECRET} "
        f"-o jsonpath='{{.data.{R.ADMIN_KEY_SECRET_KEY}}}' | base64 -d",
    ]
    if args.profile != "cpu-demo":
        hint.append(f"coe: gated Hugging Face models also need: kubectl -n {ns} create secret generic "
                    f"{R.HF_TOKEN_SECRET} --from-literal={R.HF_TOKEN_SECRET_KEY}=hf_...")
    print("\n".join(hint), file=sys.stderr)
    return 0


def _report(dirs: list[Path], crds: str | None, *, require_crds: bool, strict: bool = False) -> int:
    from coe.k8s.validate import (
        crds_available,
        default_crd_dir,
        k8s_version,
        validate_tree,
    )

    crd_dir = Path(crds) if crds else default_crd_dir()
    have_crds = crds_available(crd_dir)
    problems: list[str] = []
    warnings: list[str] = []
    for d in dirs:
        problems += validate_tree(d, crd_dir=crd_dir, require_crds=require_crds, warnings=warnings)
    if strict:
        problems += [f"{w} [--strict]" for w in warnings]
        warnings = []
    names = ", ".join(d.name for d in dirs)
    if not have_crds and not require_crds:
        print(f"note: KubeRay CRDs not found in {crd_dir}: CRD schema checks skipped (set COE_SHARED_DATA or --crds)")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {names}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    what = f"KubeRay CRDs ({crd_dir}), " if have_crds else ""
    tail = f"; {len(warnings)} warning(s)" if warnings else ""
    print(f"valid: {names} ({what}Kubernetes {k8s_version()} strict schemas, serveConfigV2, operator and coe "
          f"rules{tail})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coe")
    add_k8s_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as err:
        from coe.errors import CoeError

        if isinstance(err, CoeError):
            print(f"coe: {err.message}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
