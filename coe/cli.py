"""The `coe` command line: serve, status, chat.

This is the top-level composer: `coe serve` imports the app builder from `deployments/` lazily,
inside the command, so the library itself never imports the serving graph.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coe.config import CoeConfig

DEFAULT_URL = "http://127.0.0.1:8000"


def _loopback_ray_env() -> None:
    """Keep every Ray process on 127.0.0.1 (Ray otherwise binds the machine's external address)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def default_profile(config_ref: object) -> Path | None:
    """The measured profile a packaged config's router is trained from (cpu-default), else None."""
    import importlib.util

    spec = importlib.util.find_spec("router_models")
    if config_ref != "cpu-default" or spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "profiles" / "cpu-default"


def ensure_router_artifact(config: CoeConfig, *, train_from: Path | None) -> None:
    """A RouterDC config needs its artifact. With `train_from` (a `coe profile` folder) it is trained from that
    profile's score matrix when missing or trained from other data (about 20 s); otherwise a missing artifact
    is an error (router.require_artifact) or a degraded start."""
    from coe.errors import RouterArtifactError

    rc = config.router
    if rc.kind != "routerdc":
        return
    path = rc.artifact_path()
    if train_from is None:
        if (path / "config.json").exists():
            return
        msg = f"router artifact {path} not found: train it with `coe router train --data FILE --out {path}`"
        if rc.require_artifact:
            raise RouterArtifactError(msg)
        print(f"[coe] WARNING: {msg}; starting DEGRADED: coe-auto goes to '{rc.fallback_expert}' "
              "(router.require_artifact: true refuses instead)", file=sys.stderr, flush=True)
        return
    from router_models.profile_report import profile_digest, train_profile_router

    digest = profile_digest(train_from, rc.fallback_expert)
    stamp = path / "trained_from.json"
    if (path / "config.json").exists() and stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return
    from coe.routerdc import save_artifact
    from router_models.profile import load_profile

    experts = [e.name for e in config.experts]
    profiled = list(load_profile(train_from)[0]["experts"])
    if sorted(profiled) != sorted(experts):
        raise RouterArtifactError(f"profile {train_from} measured experts {profiled}, the config has {experts}")
    print(f"[coe] training the router from the measured profile {train_from} into {path} ...", flush=True)
    model, _, _ = train_profile_router(train_from, split=None, fallback_expert=rc.fallback_expert)
    save_artifact(path, model)
    stamp.write_text(json.dumps({"profile": str(train_from), "digest": digest}))


def auth_notice(host: str, *, insecure_no_auth: bool = False) -> str:
    """One line on whether keys are required; ConfigError for an open endpoint on a non-loopback address."""
    from coe.config import RuntimeSettings
    from coe.errors import ConfigError
    from deployments.ingress import is_loopback

    settings = RuntimeSettings()
    if settings.admin_key_value() is not None:
        where = "Redis (COE_REDIS_URL)" if settings.redis_url else "this process (lost on restart; set COE_REDIS_URL)"
        return f"auth: ON: every request needs an API key (create one: coe keys create --team NAME); keys in {where}"
    if is_loopback(host):
        return (f"auth: OFF: open endpoint on loopback ({host}) only; set COE_ADMIN_KEY to require API keys")
    if insecure_no_auth:
        return f"auth: OFF on {host} (--insecure-no-auth): ANYONE who reaches this address can use every expert"
    raise ConfigError(
        f"refusing to serve on {host} without authentication: set COE_ADMIN_KEY (or COE_ADMIN_KEY_FILE) and create "
        "team keys with `coe keys create`, bind to 127.0.0.1, or pass --insecure-no-auth to serve an open endpoint")


def start_local_serve(
    config_ref: str | CoeConfig, *, port: int | None = None, num_cpus: int | None = None, dashboard: bool = True,
    log_to_driver: bool = True, insecure_no_auth: bool = False, metrics_port: int | None = None,
    direct_ingress: bool = False, direct_port: int | None = None, metrics_interval_ms: int | None = None,
) -> dict[str, Any]:
    """Start a local Ray bound to loopback, deploy coe, wait until ready. Returns {url, app_name, auth,
    proxy_url, metrics_url}.

    `log_to_driver` False keeps the replicas' logs in Ray's log files only (benchmarks with a progress bar).
    Refuses (ConfigError) to serve without keys on a non-loopback address unless `insecure_no_auth`.
    `metrics_port`: where Ray's metrics agent serves Prometheus' /metrics (default: a port Ray picks).
    `direct_ingress`: Ray Serve's direct ingress (the ingress replica serves HTTP itself, without the proxy actor
    hop): `url` is the ingress replica's own port (`direct_port`, default the config's port) and Serve's proxy
    moves to a free port (`proxy_url`). One ingress replica only: nothing balances several direct ports here.
    """
    _loopback_ray_env()
    from coe.config import CoeConfig, load_config
    from coe.errors import ConfigError

    config = config_ref.model_copy(deep=True) if isinstance(config_ref, CoeConfig) else load_config(config_ref)
    if insecure_no_auth:
        os.environ["COE_INSECURE_NO_AUTH"] = "1"  # Ray's workers inherit the driver's environment at ray.init
    notice = auth_notice(config.server.host, insecure_no_auth=insecure_no_auth)
    import ray
    from ray import serve

    from deployments.app import build_from_config

    ensure_router_artifact(config, train_from=default_profile(config_ref))
    if port is not None:
        config.server.port = port
    url_port = config.server.port
    if direct_ingress:
        auto = config.server.ingress_autoscaling
        if auto.max_replicas > 1:
            raise ConfigError("direct ingress serves one ingress replica on the config's port; with "
                              f"server.ingress_autoscaling.max_replicas {auto.max_replicas} put a load balancer "
                              "(Ray's RAY_SERVE_ENABLE_HA_PROXY) in front instead")
        url_port = direct_port or config.server.port
        config.server.port = free_port() if url_port == config.server.port else config.server.port
        # Read by Serve's controller and the replicas, which inherit the driver's environment at ray.init.
        os.environ.update({
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(url_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(url_port + 1),
            # A restarted ingress replica takes the same port at once (Ray holds a freed port back 150 s), and
            # nothing outside needs the 30 s drain Ray gives a load balancer to notice a leaving replica.
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        })
    init_kw: dict[str, Any] = {}
    if metrics_port is not None:
        init_kw["_metrics_export_port"] = metrics_port
    if metrics_interval_ms is not None:  # how often the processes report metrics (Ray's default: 10 s)
        init_kw["_system_config"] = {"metrics_report_interval_ms": metrics_interval_ms}
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=log_to_driver,
        **init_kw,
    )
    serve.start(
        http_options={
            "host": config.server.host,
            "port": config.server.port,
            "request_timeout_s": config.server.request_timeout_s,
        }
    )
    serve.run(build_from_config(config), name=config.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    node = ray.nodes()[0] if ray.nodes() else {}
    mport = metrics_port or node.get("MetricsExportPort")
    return {"url": f"http://{host}:{url_port}", "proxy_url": f"http://{host}:{config.server.port}",
            "app_name": config.app_name, "auth": notice, "direct_ingress": direct_ingress,
            "metrics_url": f"http://127.0.0.1:{mport}/metrics" if mport else None}


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_token_hint() -> str:
    """Where the Ray dashboard's token is (Ray 2.60 asks for it), or '' when token auth is off."""
    from pathlib import Path

    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if mode == "disabled":
        return ""
    if path.exists() or mode == "token":
        return f"token: `ray get-auth-token` or the file {path}"
    return ""


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    t0 = time.time()
    stop = threading.Event()
    # Explicit handlers: a background job inherits SIGINT as ignored, and Ctrl-C / SIGTERM must both
    # shut Serve and Ray down cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        from coe.config import load_config

        direct = args.direct_ingress and load_config(args.config).server.ingress_autoscaling.max_replicas == 1
        if args.direct_ingress and not direct:
            print("[coe] several ingress replicas: answering through Serve's proxy (direct ingress serves one "
                  "replica on the port; see the README)", flush=True)
        info = start_local_serve(args.config, port=args.port, num_cpus=args.num_cpus,
                                 insecure_no_auth=args.insecure_no_auth, metrics_port=args.metrics_port,
                                 direct_ingress=direct)
        ok = wait_ready(info["url"], timeout=args.ready_timeout)
        print(f"coe is serving at {info['url']}/v1 ({'ready' if ok else 'NOT ready'} after {time.time() - t0:.1f}s)")
        print(f"  {info['auth']}")
        if info["direct_ingress"]:
            print(f"  direct ingress: the ingress replica answers at {info['url']} (Serve's proxy: {info['proxy_url']})")
        if info["metrics_url"]:
            print(f"  Prometheus metrics: {info['metrics_url']} (Grafana dashboard: k8s/base/grafana/coe-dashboard.json)")
        print(f"  try: coe chat 'Write a Python function that reverses a string' --url {info['url']}")
        hint = ray_token_hint()
        print(f"  Ray dashboard: http://127.0.0.1:8265{f' ({hint})' if hint else ''}   stop: Ctrl-C", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down coe ...", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def wait_ready(url: str, timeout: float, path: str = "/ready", poll_s: float = 0.5) -> bool:
    """Poll GET url+path until it answers 200 (True) or `timeout` seconds pass (False)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return False


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    from coe.admin_cli import auth_headers, client_key

    headers = auth_headers(client_key(args.api_key))
    try:
        ready = httpx.get(f"{args.url}/ready", timeout=10)
        r = httpx.get(f"{args.url}/v1/models", timeout=10, headers=headers)
    except httpx.HTTPError as err:
        print(f"coe is not reachable at {args.url}: {err}", file=sys.stderr)
        return 1
    if r.status_code in (401, 403):
        print(f"coe at {args.url} needs an API key: pass --api-key or set COE_API_KEY", file=sys.stderr)
        return 1
    models = r.json()
    state = ready.json()
    print(f"coe at {args.url}: {'READY' if state.get('ready') else 'NOT READY'}")
    info = {m["id"]: m for m in models.get("data", [])}
    print(f"{'expert':<16}{'status':<14}{'replicas':>9}  {'engine':<10}{'$/1k tok':>9}  description")
    for name, e in state.get("experts", {}).items():
        m = info.get(name, {})
        print(f"{name:<16}{e['status']:<14}{e['running_replicas']:>9}  {m.get('engine', '?'):<10}"
              f"{m.get('price_per_1k_tokens', 0):>9.4f}  {m.get('description', '')}")
    try:
        coe_state = httpx.get(f"{args.url}/v1/coe/state", timeout=10, headers=headers).json()
    except (httpx.HTTPError, ValueError):
        coe_state = {}
    ctrl = coe_state.get("controller") or {}
    th = ctrl.get("threshold") or coe_state.get("threshold")
    if th:
        print(f"threshold t = {th['t']:.4f} (version {th['version']}, range {ctrl.get('t_min', '?')}-"
              f"{ctrl.get('t_max', '?')}, cluster load {th['load']:.2f}): {th['reason']}")
    loads, share = ctrl.get("loads", {}), ctrl.get("routing_share", {})
    if loads:
        print(f"{'expert':<16}{'in flight':>10}{'replicas':>9}{'load':>7}{'p99 ms':>9}{'share':>7}{'penalty':>9}")
        for name, lo in loads.items():
            p99 = lo.get("total_p99_ms")
            print(f"{name:<16}{lo['in_flight']:>10}{lo['replicas']:>9}{lo['load_ratio']:>7.2f}"
                  f"{(f'{p99:.0f}' if p99 is not None else '-'):>9}{share.get(name, 0) * 100:>6.0f}%"
                  f"{(th or {}).get('penalties', {}).get(name, 0):>9.3f}")
    debt = ctrl.get("quality_debt")
    if debt:
        print(f"quality debt: {debt.get('total', 0):.4f} over {debt.get('requests', 0)} degraded requests "
              f"{debt.get('per_expert', {})}")
    return 0 if state.get("ready") else 2


def cmd_chat(args: argparse.Namespace) -> int:
    import httpx

    body: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.message}],
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    from coe.admin_cli import auth_headers, client_key

    try:
        with httpx.stream("POST", f"{args.url}/v1/chat/completions", json=body, timeout=300,
                          headers=auth_headers(client_key(args.api_key))) as r:
            if r.status_code != 200:
                r.read()
                print(f"error {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            print(f"[{r.headers.get('x-coe-expert')} | confidence {r.headers.get('x-coe-confidence', '-')}"
                  f" | {r.headers.get('x-coe-route-reason', 'pinned')}]")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                    return 1
                for choice in chunk.get("choices", []):
                    print(choice.get("delta", {}).get("content") or "", end="", flush=True)
            print()
    except httpx.HTTPError as err:
        print(f"coe is not reachable at {args.url}: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coe", description="Composition-of-Experts LLM serving on Ray Serve.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start a local Ray on loopback and serve the experts")
    s.add_argument("--config", default="cpu-default", help="config file or packaged name (default: cpu-default)")
    s.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    s.add_argument("--ready-timeout", type=float, default=300.0)
    s.add_argument("--insecure-no-auth", action="store_true",
                   help="serve without API keys on a non-loopback address (refused otherwise)")
    s.add_argument("--metrics-port", type=int, default=None,
                   help="port of Prometheus' /metrics (Ray's metrics agent; default: a port Ray picks, printed)")
    s.add_argument("--no-direct-ingress", dest="direct_ingress", action="store_false",
                   help="answer through Ray Serve's HTTP proxy actor instead of the ingress replica's own server "
                        "(direct ingress, the default here: one hop less, see the README's gateway measurements)")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("status", help="readiness and experts of a running coe")
    st.add_argument("--url", default=DEFAULT_URL)
    st.add_argument("--api-key", default=None, help="default: $COE_API_KEY, else the admin key from the environment")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("chat", help="send one chat message and stream the answer")
    c.add_argument("message")
    c.add_argument("--model", default="coe-auto")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--url", default=DEFAULT_URL)
    c.add_argument("--api-key", default=None, help="default: $COE_API_KEY, else the admin key from the environment")
    c.set_defaults(func=cmd_chat)

    # Training code is imported only for `coe router ...`, never on the serving path.
    from coe.admin_cli import add_admin_parsers
    from coe.k8s.cli import add_k8s_parser
    from router_models.cli import add_router_parser
    from router_models.profile_cli import add_profile_parser

    add_admin_parsers(sub)
    add_router_parser(sub)
    add_profile_parser(sub)
    add_k8s_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"] and (len(argv) < 2 or argv[1] not in ("run", "report", "signals", "-h", "--help")):
        argv.insert(1, "run")  # `coe profile --config ...` is `coe profile run --config ...`
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as err:  # noqa: BLE001 - a CLI prints a clear line, not a traceback
        from coe.errors import CoeError

        if isinstance(err, CoeError):
            print(f"coe: {err.message}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
