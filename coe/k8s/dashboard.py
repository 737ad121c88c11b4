"""coe's Grafana dashboard (rendered into k8s/grafana/coe-dashboard.json and the base's ConfigMap).

Every query reads coe's own series (coe/metrics.py, EXPORTED), Ray Serve's replica gauge, or, for vLLM experts,
the engine's stats as vLLM's Ray stat logger exports them (``ray_vllm_*``, label ``model_name`` = the expert).
tests/serve/test_metrics_export.py checks each coe and Serve series against a running coe's metrics port.
"""

from __future__ import annotations

import re
from typing import Any

DASHBOARD_UID = "coe-overview"
APP = 'application=~"$app"'


def _panel(pid: int, title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, *, w: int = 12,
           h: int = 8, description: str = "", stack: bool = False, max_: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 10,
                                                          "stacking": {"mode": "normal" if stack else "none"}}}
    if max_ is not None:
        defaults["max"] = max_
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def _q(quantile: float, metric: str, by: str = "expert") -> str:
    return (f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric}_bucket{{{APP}}}[$__rate_interval])))")


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model."""
    rate = "$__rate_interval"
    routed = f'ray_coe_requests_total{{{APP}, routed="true"}}'
    panels: list[dict[str, Any]] = [
        _row(100, "Routing", 0),
        _panel(1, "Requests per expert", [(f"sum by (expert) (rate(ray_coe_requests_total{{{APP}}}[{rate}]))",
                                            "{{expert}}")], "reqps", 0, 1, stack=True,
               description="Answered requests per second, routed (coe-auto) and pinned."),
        _panel(2, "Route share per expert (coe-auto)",
               [(f"sum by (expert) (rate({routed}[{rate}])) / scalar(sum(rate({routed}[{rate}])))", "{{expert}}")],
               "percentunit", 12, 1, stack=True, max_=1,
               description="Where the router sends coe-auto requests."),
        _panel(3, "Threshold t and load",
               [(f"max(ray_coe_controller_threshold{{{APP}}})", "t (controller)"),
                (f"avg(ray_coe_threshold{{{APP}}})", "t applied (mean over ingress replicas)"),
                (f"max(ray_coe_controller_load{{{APP}}})", "cluster load (1 = at capacity)")],
               "none", 0, 9, description="The load controller raises t under load and lowers it as load falls."),
        _panel(4, "Quality debt per expert",
               [(f"sum by (expert) (rate(ray_coe_quality_debt_total{{{APP}}}[{rate}]))", "{{expert}}")],
               "none", 12, 9, description="Predicted quality given up per second because of load (t > 0)."),
        _panel(5, "Fallbacks and errors",
               [(f"sum by (reason) (rate(ray_coe_fallbacks_total{{{APP}}}[{rate}]))", "fallback: {{reason}}"),
                (f"sum by (type) (rate(ray_coe_errors_total{{{APP}}}[{rate}]))", "error: {{type}}"),
                (f"sum by (expert) (rate(ray_coe_retries_total{{{APP}}}[{rate}]))", "retried: {{expert}}")],
               "reqps", 0, 17),
        _panel(6, "Routing decision time",
               [(_q(0.5, "ray_coe_router_latency_ms", "deployment"), "p50"),
                (_q(0.99, "ray_coe_router_latency_ms", "deployment"), "p99")], "ms", 12, 17),
        _row(101, "Experts", 25),
        _panel(7, "Time to first token per expert (streamed, in the ingress)",
               [(_q(0.5, "ray_coe_ttft_ms"), "p50 {{expert}}"), (_q(0.95, "ray_coe_ttft_ms"), "p95 {{expert}}")],
               "ms", 0, 26),
        _panel(8, "Inter-token latency per expert",
               [(_q(0.5, "ray_coe_expert_itl_ms"), "p50 {{expert}}"),
                (_q(0.95, "ray_coe_expert_itl_ms"), "p95 {{expert}}")], "ms", 12, 26),
        _panel(9, "Time to first token in the expert replica (queue included)",
               [(_q(0.5, "ray_coe_expert_ttft_ms"), "p50 {{expert}}"),
                (_q(0.95, "ray_coe_expert_ttft_ms"), "p95 {{expert}}")], "ms", 0, 34),
        _panel(10, "Request latency per expert",
               [(_q(0.5, "ray_coe_request_latency_ms"), "p50 {{expert}}"),
                (_q(0.99, "ray_coe_request_latency_ms"), "p99 {{expert}}")], "ms", 12, 34),
        _panel(11, "Tokens per second per expert",
               [(f"sum by (expert) (rate(ray_coe_completion_tokens_total{{{APP}}}[{rate}]))", "completion {{expert}}"),
                (f"sum by (expert) (rate(ray_coe_prompt_tokens_total{{{APP}}}[{rate}]))", "prompt {{expert}}")],
               "none", 0, 42),
        _panel(12, "Replicas per deployment",
               [(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}"),
                (f"max by (expert) (ray_coe_expert_load_ratio{{{APP}}})", "load ratio {{expert}}")],
               "none", 12, 42, description="Healthy replicas (experts, ingress, controller) and each expert's load."),
        _row(102, "vLLM engines (GPU experts; empty on llama.cpp)", 50),
        _panel(13, "vLLM running and waiting requests",
               [("sum by (model_name) (ray_vllm_num_requests_running)", "running {{model_name}}"),
                ("sum by (model_name) (ray_vllm_num_requests_waiting)", "waiting {{model_name}}")], "none", 0, 51),
        _panel(14, "vLLM KV cache usage and prefix cache hit rate",
               [("max by (model_name) (ray_vllm_kv_cache_usage_perc)", "KV cache {{model_name}}"),
                (f"sum by (model_name) (rate(ray_vllm_prefix_cache_hits_total[{rate}])) / "
                 f"sum by (model_name) (rate(ray_vllm_prefix_cache_queries_total[{rate}]))",
                 "prefix hits {{model_name}}")], "percentunit", 12, 51),
        _panel(15, "vLLM time to first token and time per output token (p95)",
               [("histogram_quantile(0.95, sum by (model_name, le) (rate("
                 f"ray_vllm_time_to_first_token_seconds_bucket[{rate}])))", "TTFT {{model_name}}"),
                ("histogram_quantile(0.95, sum by (model_name, le) (rate("
                 f"ray_vllm_request_time_per_output_token_seconds_bucket[{rate}])))", "TPOT {{model_name}}")],
               "s", 0, 59, w=24),
    ]
    return {
        "uid": DASHBOARD_UID, "title": "coe: routing and experts", "tags": ["coe", "ray-serve"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            {"name": "app", "type": "query", "label": "application", "includeAll": True, "multi": True,
             "datasource": {"type": "prometheus", "uid": "${datasource}"}, "refresh": 2,
             "query": {"query": "label_values(ray_coe_requests_total, application)", "refId": "app"},
             "definition": "label_values(ray_coe_requests_total, application)",
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": panels,
    }


METRIC_RE = re.compile(r"\b(ray_[a-z0-9_]+)\b")


def queried_metrics(board: dict[str, Any] | None = None) -> set[str]:
    """Every series name the dashboard's panels and variables query."""
    board = board or dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    names: set[str] = set()
    for e in exprs:
        for m in METRIC_RE.findall(e):
            names.add(m + "_bucket" if m + "_bucket" in e else m)
    return names
