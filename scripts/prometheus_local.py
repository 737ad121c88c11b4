"""A real Prometheus (Debian's `prometheus` binary) scraping a local coe's Ray metrics port, and a plot of the main
series from its query API. Used by `scripts/loadtest.py --prometheus`.

Bound to 127.0.0.1, its data in a temporary folder, stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx

# What the README's picture shows: the dashboard's main series (coe/k8s/dashboard.py), over a short window.
SERIES: dict[str, str] = {
    "route_share": 'sum by (expert) (rate(ray_coe_requests_total{routed="true"}[10s])) / '
                   'scalar(sum(rate(ray_coe_requests_total{routed="true"}[10s])))',
    "t": "max(ray_coe_controller_threshold)",
    "load": "max(ray_coe_controller_load)",
    "ttft_p50": "histogram_quantile(0.5, sum by (expert, le) (rate(ray_coe_expert_ttft_ms_bucket[10s])))",
    "requests": "sum by (expert) (rate(ray_coe_requests_total[10s]))",
}


class LocalPrometheus:
    """`prometheus` scraping `targets` (host:port) every `interval_s`, on a free loopback port."""

    def __init__(self, targets: list[str], interval_s: float = 1.0, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("prometheus")
        if self.binary is None:
            raise SystemExit("no prometheus binary: install Debian's (apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="coe-prometheus-"))
        (self.dir / "prometheus.yml").write_text(
            "global:\n"
            f"  scrape_interval: {interval_s:g}s\n"
            "scrape_configs:\n"
            "  - job_name: coe\n"
            "    static_configs:\n"
            f"      - targets: [{', '.join(repr(t) for t in targets)}]\n")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalPrometheus:
        log = (self.dir / "prometheus.log").open("wb")
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        from coe.cli import wait_ready

        if wait_ready(self.url, 30, path="/-/ready", poll_s=0.3):
            return self
        self.__exit__()
        raise SystemExit(f"prometheus did not start; see {self.dir / 'prometheus.log'}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def targets_up(self) -> bool:
        r = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
        return all(t["health"] == "up" for t in r["data"]["activeTargets"])

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query_range", timeout=30,
                      params={"query": expr, "start": start, "end": end, "step": step_s})
        r.raise_for_status()
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body}")
        return list(body["data"]["result"])


def plot_series(prom: LocalPrometheus, start: float, end: float, out: Path, title: str,
                marks: list[tuple[float, str]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Query SERIES over [start, end] and draw route share, t and load, TTFT p50 per expert. Returns the data."""
    data = {k: prom.query_range(q, start, end) for k, q in SERIES.items()}
    draw(data, start, out, title, marks)
    return data


def draw(data: dict[str, list[dict[str, Any]]], start: float, out: Path, title: str,
         marks: list[tuple[float, str]] | None = None) -> None:
    """The picture of plot_series (also from a saved prometheus.json: `python scripts/prometheus_local.py`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xy(res: dict[str, Any]) -> tuple[list[float], list[float]]:
        """Points, with a break (NaN) where samples are missing for more than 2 steps (no traffic)."""
        xs: list[float] = []
        ys: list[float] = []
        for t, v in res["values"]:
            if v in ("NaN", "+Inf", "-Inf"):
                continue
            if xs and float(t) - start - xs[-1] > 2.5:
                xs.append(xs[-1] + 1)
                ys.append(float("nan"))
            xs.append(float(t) - start)
            ys.append(float(v))
        return xs, ys

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for res in data["route_share"]:
        axes[0].plot(*xy(res), label=res["metric"].get("expert", "?"))
    axes[0].set_ylabel("route share (coe-auto)")
    axes[0].set_ylim(0, 1.05)
    for res in data["t"]:
        axes[1].plot(*xy(res), label="t set by the controller", color="tab:blue")
    axes[1].set_ylabel("threshold t")
    twin = axes[1].twinx()
    for res in data["load"]:
        twin.plot(*xy(res), label="cluster load (right)", color="tab:orange", alpha=0.6)
    twin.set_ylabel("cluster load (1 = at capacity)")
    twin.legend(loc="upper left", fontsize=8)
    for res in data["ttft_p50"]:
        axes[2].plot(*xy(res), label=res["metric"].get("expert", "?"))
    axes[2].set_ylabel("TTFT p50 in the expert (ms)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("seconds (Prometheus range query, 1 s step, rates over 10 s)")
    for ax in axes:
        for at, label in marks or []:
            ax.axvline(at - start, color="grey", linestyle=":", linewidth=1)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    for at, label in marks or []:
        axes[0].text(at - start, 1.0, f" {label}", fontsize=8, va="top")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":  # redraw a saved view: python scripts/prometheus_local.py prometheus.json out.png
    import json
    import sys

    saved = json.loads(Path(sys.argv[1]).read_text())
    draw(saved["series"], saved["start"], Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else
         "coe in Prometheus during the load test", [tuple(m) for m in saved["marks"]])
