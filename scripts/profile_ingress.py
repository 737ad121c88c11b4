#!/usr/bin/env python
"""Where the gateway's CPU goes at concurrency 16: CPU time per request of each process, and a py-spy profile of
the ingress replica.

Starts coe (cpu-default, direct ingress, routing cache off), then for each model given (default: the pinned expert
`code`, then `coe-auto`) sends one short prompt from `--concurrency` clients for `--seconds`, reads each process'
CPU seconds from /proc before and after, and records the ingress replica with `py-spy record` (install it:
`.venv/bin/pip install py-spy`, or the `bench` extra; it needs ptrace, e.g. root). Prints the processes' CPU per request and the ingress'
heaviest frames (self and inclusive); writes the raw profiles to --out.

    .venv/bin/python scripts/profile_ingress.py [--models code coe-auto] [--seconds 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Write a Python function that reverses a list."


def cpu_by_process() -> dict[str, tuple[float, str]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()[:60]
        except OSError:
            continue
        out[pid] = ((int(st[11]) + int(st[12])) / tick, cmd)
    return out


async def load(url: str, model: str, seconds: float, concurrency: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "temperature": 0.0}
    n = 0
    t0 = time.time()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker() -> None:
            nonlocal n
            while time.time() - t0 < seconds:
                (await c.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()
                n += 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return n


def top_frames(raw: Path, k: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return ([(f, 100 * n / total) for f, n in own.most_common(k)],
            [(f, 100 * n / total) for f, n in incl.most_common(k)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["code", "coe-auto"])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench-results/profile"))
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import ray
    from ray import serve

    from coe.cli import default_profile, ensure_router_artifact, free_port, start_local_serve
    from coe.config import load_config

    config = load_config("cpu-default")
    config.router.cache_size = 0
    ensure_router_artifact(config, train_from=default_profile("cpu-default"))
    info = start_local_serve(config, port=free_port(), dashboard=False, log_to_driver=False, direct_ingress=True)
    try:
        while httpx.get(f"{info['url']}/ready", timeout=10).status_code != 200:
            time.sleep(0.5)
        pid = subprocess.run(["pgrep", "-f", "ServeReplica:coe:CoeIngress"], capture_output=True,
                             text=True).stdout.split()[0]
        for model in args.models:
            asyncio.run(load(info["url"], model, 3, args.concurrency))  # warm-up
            raw = out / f"ingress-{model}.txt"
            before = cpu_by_process()
            spy_proc = subprocess.Popen([spy, "record", "--pid", pid, "--duration", str(int(args.seconds)), "--rate",
                                         "200", "--format", "raw", "--output", str(raw), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t0 = time.time()
            n = asyncio.run(load(info["url"], model, args.seconds, args.concurrency))
            wall = time.time() - t0
            after = cpu_by_process()
            spy_proc.wait()
            print(f"\n== {model}: {n / wall:.0f} requests/s at concurrency {args.concurrency} "
                  f"(py-spy sampling the ingress at 200 Hz meanwhile)")
            print("| process | CPU % of one core | CPU ms per request |\n|---|---|---|")
            rows = sorted(((after[p][0] - before[p][0], after[p][1]) for p in after if p in before), reverse=True)
            for d, cmd in rows[:8]:
                print(f"| {cmd} | {100 * d / wall:.1f} | {1e3 * d / max(1, n):.2f} |")
            if raw.exists():
                own, incl = top_frames(raw, args.top)
                print("ingress, self time:")
                for f, p in own[:12]:
                    print(f"  {p:5.1f}%  {f[:130]}")
                print("ingress, inclusive (coe's and the HTTP path's frames):")
                for f, p in incl:
                    if any(x in f for x in ("coe/", "deployments/", "fastapi", "metrics.py", "router.py")):
                        print(f"  {p:5.1f}%  {f[:130]}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
