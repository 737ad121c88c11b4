"""`coe router train | route | signal | eval`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from coe.encoder import QUANTIZATIONS, SentenceEncoder
from coe.routerdc import RouterDCRouter, save_artifact
from router_models.data import concat, load_any
from router_models.train import TrainConfig, train_router


def add_router_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("router", help="train, apply and evaluate the RouterDC router")
    rs = r.add_subparsers(dest="router_command", required=True)

    t = rs.add_parser("train", help="train a router artifact from scored queries")
    t.add_argument("--data", nargs="+", required=True, help="RouterDC JSON or RouterBench CSV files")
    t.add_argument("--out", required=True, help="artifact directory to write")
    t.add_argument("--prices", help='JSON {"expert": USD per query or per 1k tokens}, a file or inline')
    t.add_argument("--encoder", help="sentence-transformers model dir (default: packaged all-MiniLM-L6-v2)")
    t.add_argument("--encoder-quantization", choices=QUANTIZATIONS, default="onnx-int8",
                   help="onnx-int8: int8 in ONNX Runtime (default; 9.0 ms a query on 2 cores); int8: torch dynamic "
                        "int8 (16.8 ms); none: float torch")
    t.add_argument("--fallback-expert", help="safe generalist (default: best single expert on train)")
    t.add_argument("--min-confidence", type=float, default=0.0, help="below it, route to the fallback")
    t.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    t.add_argument("--finetune-layers", type=int, default=TrainConfig.finetune_layers,
                   help="fine-tune the encoder's top N blocks with the RouterDC loss (default 0: frozen encoder); "
                        f"only with at least {TrainConfig.finetune_min_queries} training queries, kept only if "
                        "it routes the validation split better")
    t.add_argument("--finetune-epochs", type=int, default=TrainConfig.finetune_epochs)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    ro = rs.add_parser("route", help="route every query of a file; writes JSONL decisions in order")
    ro.add_argument("--router", required=True)
    ro.add_argument("--input", required=True, help="JSON list with 'question' or JSONL of {question}")
    ro.add_argument("--output", required=True)
    ro.add_argument("--threshold", type=float, default=None)
    ro.set_defaults(func=cmd_route)

    sg = rs.add_parser("signal", help="is there routing signal within each training file? (CV on training data)")
    sg.add_argument("--data", nargs="+", required=True, help="scored training files (one task per file)")
    sg.add_argument("--encoder", help="sentence-transformers model dir (default: packaged all-MiniLM-L6-v2)")
    sg.add_argument("--encoder-quantization", choices=QUANTIZATIONS, default="onnx-int8")
    sg.add_argument("--repeats", type=int, default=4, help="repeats of the 5-fold split")
    sg.add_argument("--plot", help="write the PNG plot here")
    sg.add_argument("--json", help="write the report as JSON here")
    sg.set_defaults(func=cmd_signal)

    ev = rs.add_parser("eval", help="accuracy per file, baselines, quality against cost, decision latency; or a "
                                    "protocol under shift (trains its own routers from --train)")
    ev.add_argument("--router", help="artifact to evaluate (not with a protocol)")
    ev.add_argument("--data", nargs="+", required=True, help="scored test files (never the training files)")
    proto = ev.add_mutually_exclusive_group()
    proto.add_argument("--merge-groups", action="store_true",
                       help="no labels: merge the --train files into one group, train, test on --data")
    proto.add_argument("--leave-one-group-out", action="store_true",
                       help="unseen task: per group, train on the others, test on its test file")
    proto.add_argument("--shift", type=float, metavar="S",
                       help="shifted mix: test on a mixture at total variation distance S from the training mix")
    ev.add_argument("--train", nargs="+", help="training files for a protocol")
    ev.add_argument("--prices", help="for a protocol: as in `coe router train --prices`")
    ev.add_argument("--seed", type=int, default=None, help="for --shift: the seed of the mixture (default 0)")
    ev.add_argument("--plot", help="write the PNG plot here")
    ev.add_argument("--json", help="write the full report as JSON here")
    ev.add_argument("--latency-queries", type=int, default=None, help="queries timed one by one (default 200; 0: skip)")
    ev.set_defaults(func=cmd_eval)


def _prices(arg: str | None) -> dict[str, float] | None:
    if not arg:
        return None
    p = Path(arg)
    raw = json.loads(p.read_text() if p.exists() else arg)
    return {k: float(v) for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys document the file


def cmd_train(args: argparse.Namespace) -> int:
    data = concat([load_any(f) for f in args.data], name="train")
    encoder = SentenceEncoder(args.encoder, quantize=args.encoder_quantization)
    if args.finetune_layers < 0 or args.finetune_epochs < 0:
        raise SystemExit("--finetune-layers and --finetune-epochs must be >= 0")
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, min_confidence=args.min_confidence,
                      finetune_layers=args.finetune_layers, finetune_epochs=args.finetune_epochs)
    model, report = train_router(data, encoder, prices=_prices(args.prices), fallback_expert=args.fallback_expert,
                                 cfg=cfg)
    out = save_artifact(args.out, model)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(f"router written to {out}")
    for k, v in report.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _read_questions(path: str) -> list[str]:
    p = Path(path)
    text = p.read_text()
    try:
        rows = json.loads(text)
        if isinstance(rows, dict):
            rows = [rows]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["question"] if isinstance(r, dict) else str(r) for r in rows]


def cmd_route(args: argparse.Namespace) -> int:
    router = RouterDCRouter(args.router)
    questions = _read_questions(args.input)
    with open(args.output, "w") as f:
        for i in range(0, len(questions), 64):
            batch = questions[i : i + 64]
            for q, d in zip(batch, router.route_batch(batch, threshold=args.threshold)):
                f.write(json.dumps({"question": q, "expert": d.expert, "scores": d.scores,
                                    "confidence": round(d.confidence, 4), "ood": d.ood, "reason": d.reason}) + "\n")
    print(f"{len(questions)} decisions written to {args.output}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from router_models.evaluate import evaluate, plot_report, print_report

    if args.merge_groups or args.leave_one_group_out or args.shift is not None:
        return _cmd_protocol(args)
    if not args.router:
        raise SystemExit("coe router eval: --router is required (or a protocol: --merge-groups, "
                         "--leave-one-group-out, --shift S with --train FILES)")

    if args.train or args.prices:
        raise SystemExit("coe router eval: --train and --prices are for a protocol (--merge-groups, "
                         "--leave-one-group-out, --shift S)")
    report = evaluate(args.router, args.data,
                      latency_queries=200 if args.latency_queries is None else args.latency_queries)
    print_report(report)
    return _write_outputs(args, report, lambda out: plot_report(report, out, title=f"router {args.router}"))


def _cmd_protocol(args: argparse.Namespace) -> int:
    from router_models import shift

    if not args.train:
        raise SystemExit("coe router eval: a protocol trains its own routers: pass --train FILES")
    for given, flag in ((args.router, "--router"), (args.plot, "--plot"), (args.latency_queries, "--latency-queries")):
        if given is not None:
            raise SystemExit(f"coe router eval: {flag} is not used by a protocol (it trains its own routers on --train)")
    if args.seed is not None and args.shift is None:
        raise SystemExit("coe router eval: --seed is for --shift")
    kw: dict[str, Any] = {"encoder": SentenceEncoder(quantize="onnx-int8"), "prices": _prices(args.prices)}
    if args.merge_groups:
        res = shift.merge_groups(args.train, args.data, **kw)
    elif args.leave_one_group_out:
        res = shift.leave_one_group_out(args.train, args.data, **kw)
    else:
        res = shift.shifted_mix(args.train, args.data, args.shift, seed=args.seed or 0, **kw)
    shift.print_protocol(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res.__dict__, indent=2))
    return 0


def _write_outputs(args: argparse.Namespace, report: Any, plot: Callable[[str], Path]) -> int:
    """--plot PNG and --json FILE of an eval or signal report."""
    if args.plot:
        print(f"plot written to {plot(args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0


def cmd_signal(args: argparse.Namespace) -> int:
    from router_models.signal import plot_signal, print_signal, within_group_signal
    from router_models.train import cached_encode

    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    data = concat([load_any(f) for f in args.data], name="train")
    emb = cached_encode(SentenceEncoder(args.encoder, quantize=args.encoder_quantization), data.questions)
    report = within_group_signal(emb, data.correct(), list(data.tasks), repeats=args.repeats)
    print_signal(report)
    return _write_outputs(args, report, lambda out: plot_signal(report, out))
