"""`coe profile [run] ...` and `coe profile report DIR`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path


def add_profile_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("profile", help="measure your experts on suites; the router's training data (run | report)")
    ps = p.add_subparsers(dest="profile_command", required=True)

    r = ps.add_parser("run", help="answer and score every suite item with every expert (the default subcommand)")
    r.add_argument("--config", default="cpu-default", help="config file or packaged name (default: cpu-default)")
    r.add_argument("--suite", action="append", required=True, metavar="NAME[:PATH]",
                   help="math[:GSM8K folder or file], code, translation, general, or NAME:FILE.jsonl (repeatable)")
    r.add_argument("--out", required=True, help="profile folder (a rerun continues it)")
    r.add_argument("--endpoint", help="a running coe (http://host:port): experts are called by name; default: "
                                      "in-process engines")
    r.add_argument("--api-key", default=None, help="for --endpoint: default $COE_API_KEY, else the admin key")
    r.add_argument("--limit", type=int, default=None, help="items per suite (a seeded sample; default: all)")
    r.add_argument("--concurrency", type=int, default=1, help="requests in flight per expert (default 1)")
    r.add_argument("--split", type=float, default=0.8, help="train share of the items (default 0.8)")
    r.add_argument("--seed", type=int, default=0, help="sample and split seed (default 0)")
    r.add_argument("--experts", nargs="+", help="only these experts (default: all of the config)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_profile)

    rep = ps.add_parser("report", help="accuracy, cost, latency per expert and suite; router vs best single")
    rep.add_argument("dir")
    rep.add_argument("--plot", help="PNG path (default DIR/report.png)")
    rep.add_argument("--json", help="JSON path (default DIR/report.json)")
    rep.add_argument("--router-out", help="keep the router trained on the train split here")
    rep.set_defaults(func=cmd_report)

    sig = ps.add_parser("signals", help="log-probability signals of every profiled answer (the cascade's calibration)")
    sig.add_argument("dir")
    sig.add_argument("--config", required=True, help="the config the profile was made with (its experts' models)")
    sig.add_argument("--threads", type=int, help="llama.cpp threads (default: each expert's own)")
    sig.add_argument("--no-progress", action="store_true")
    sig.set_defaults(func=cmd_signals)


def cmd_signals(args: argparse.Namespace) -> int:
    from coe.config import load_config
    from router_models.profile_signals import compute_signals

    t0 = time.time()
    added = compute_signals(Path(args.dir), load_config(args.config), threads=args.threads,
                            progress=not args.no_progress)
    print(f"signals added: {added} in {time.time() - t0:.0f} s -> {Path(args.dir) / 'signals'}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from coe.admin_cli import client_key
    from coe.config import load_config
    from router_models.profile import ProfileOptions, print_stats, run_profile

    opts = ProfileOptions(
        config=load_config(args.config), config_ref=args.config, suites=args.suite, out=Path(args.out),
        endpoint=args.endpoint, api_key=client_key(args.api_key) if args.endpoint else None, limit=args.limit,
        concurrency=args.concurrency, split=args.split, seed=args.seed, experts=args.experts,
        progress=not args.no_progress,
    )
    t0 = time.time()
    try:
        stats = asyncio.run(run_profile(opts))
    except KeyboardInterrupt:
        # Every answer already received is on disk; an engine thread may still be generating: do not wait for it.
        print(f"\ninterrupted: answers so far are kept in {args.out}; rerun the same command to continue",
              file=sys.stderr, flush=True)
        os._exit(130)
    print_stats(stats, opts.out, time.time() - t0)
    return 1 if stats.errors else 0


def cmd_report(args: argparse.Namespace) -> int:
    from router_models.profile_report import build_report, plot_profile, print_profile_report

    out = Path(args.dir)
    report = build_report(out, router_out=Path(args.router_out) if args.router_out else None)
    print_profile_report(report)
    import json

    Path(args.json or out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"plot written to {plot_profile(report, args.plot or out / 'report.png')}")
    return 0
