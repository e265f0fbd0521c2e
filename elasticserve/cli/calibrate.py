"""`elasticserve calibrate` and `elasticserve eval`: the command-line face of calibration."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from ..model.shapes import DEFAULT_WIDTHS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `calibrate` and `eval` subcommands to the elasticserve CLI."""
    cal = subparsers.add_parser("calibrate", help="build a pack: orderings, widths, layer tables")
    _model_args(cal)
    cal.add_argument("--data", nargs="+", required=True, help="calibration text files or dirs")
    cal.add_argument("--out", required=True, help="pack directory to write (atomically)")
    cal.add_argument("--widths", type=_floats, default=list(DEFAULT_WIDTHS), help="e.g. 1,0.75,0.5")
    cal.add_argument(
        "--depths", type=_ints, default=None, help="e.g. 30,27,24 (default: ~10%% steps)"
    )
    cal.add_argument(
        "--tokens", type=int, default=16384, help="calibration tokens (WIFV statistics)"
    )
    cal.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    cal.add_argument(
        "--dp-tokens", type=int, default=1024, help="tokens scored by the width and depth searches"
    )
    cal.add_argument("--dp-beam", type=int, default=2, help="candidates kept per depth-DP cell")
    cal.add_argument(
        "--refine-rounds", type=int, default=3, help="exchange rounds after the depth DP (0: none)"
    )
    cal.add_argument("--exclude", nargs="*", default=[], help="file names in --data to skip")
    cal.add_argument(
        "--eval-data", nargs="*", default=[], help="held-out text for per-shape quality"
    )
    cal.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per shape")
    cal.set_defaults(func=run_calibrate)

    ev = subparsers.add_parser("eval", help="held-out perplexity of each shape")
    _model_args(ev)
    ev.add_argument("--pack", default=None, help="pack directory (default: the model's own)")
    ev.add_argument("--data", nargs="+", default=[], help="text file(s): held-out perplexity")
    ev.add_argument(
        "--chat",
        default=None,
        help="chat JSONL (elasticserve distill-data): each shape's mean KL to the full shape "
        "and greedy-token agreement over the full shape's answers",
    )
    ev.add_argument(
        "--chat-split",
        default="heldout",
        choices=("heldout", "train", "all"),
        help="which records of --chat to evaluate",
    )
    ev.add_argument("--shapes", default="all", help="'all' or a comma list, e.g. full,d24-w0.75")
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens")
    ev.add_argument("--window", type=int, default=None, help="window (default: min(context, 512))")
    ev.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ev.add_argument(
        "--record",
        action="store_true",
        help="write the measured perplexity / chat quality into the --pack directory's manifest "
        "(what the policy and /v1/shapes read)",
    )
    ev.add_argument(
        "--no-lora", action="store_true", help="the pack without its fine-tuned adapters"
    )
    ev.add_argument(
        "--precisions",
        default=None,
        help="quantized precisions to add to the grid, e.g. q8,q4 (default: the pack's)",
    )
    ev.add_argument(
        "--quant-method",
        default="mse",
        choices=("minmax", "mse"),
        help="q8/q4 scales of weights not taken from a GGUF's blocks",
    )
    ev.set_defaults(func=run_eval)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="HF dir, .safetensors or .gguf (default: embedded)"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _model(arg: str | None) -> str | None:
    return None if arg in (None, "default") else arg


def run_calibrate(args: argparse.Namespace) -> int:
    """Calibrate and write the pack; print where it went and how long it took."""
    from ..training.calibrate.run import calibrate

    started = time.monotonic()
    command = "elasticserve " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None
    pack = calibrate(
        _model(args.model),
        args.data,
        args.out,
        widths=args.widths,
        depths=args.depths,
        tokens=args.tokens,
        seq_len=args.seq_len,
        dp_tokens=args.dp_tokens,
        dp_beam=args.dp_beam,
        refine_rounds=args.refine_rounds,
        eval_data=args.eval_data,
        eval_tokens=args.eval_tokens,
        exclude=args.exclude,
        meta={"command": command} if command else None,
    )
    shapes = len(pack.depths) * len(pack.widths)
    print(f"wrote {args.out}: {shapes} shapes in {time.monotonic() - started:.0f} s")
    return 0


def _record(args: argparse.Namespace, rows: list[dict[str, object]], notes: list[str]) -> None:
    """Write the measured columns into the pack directory's manifest."""
    from ..model.pack import record_quality

    if args.pack is None:
        raise ValueError("--record writes into a pack directory: pass --pack")
    ppl = {str(r["shape"]): float(r["ppl"]) for r in rows if "ppl" in r}  # type: ignore[arg-type]
    chat = {
        str(r["shape"]): {
            "kl": float(r["chat_kl"]),  # type: ignore[arg-type]
            "agree": float(r["chat_agree"]),  # type: ignore[arg-type]
        }
        for r in rows
        if "chat_kl" in r
    }
    argv = getattr(args, "argv", sys.argv[1:])
    command = "elasticserve " + shlex.join(argv) if argv else None
    source: dict[str, object] = {
        "command": command,
        "measured": "; ".join(notes),
        "lora": not args.no_lora,
    }
    record_quality(args.pack, ppl, chat, source)


def run_eval(args: argparse.Namespace) -> int:
    """Print held-out perplexity and/or chat agreement per shape as a table or JSON."""
    from ..model.bundle import load_bundle
    from ..training.chat import conversation_ids, read_chat
    from ..training.data import load_token_ids
    from ..training.evaluate import chat_report, shape_report

    if not args.data and not args.chat:
        raise ValueError("pass --data (perplexity), --chat (chat KL and agreement), or both")
    bundle = load_bundle(
        _model(args.model),
        pack=args.pack,
        dtype=args.dtype,
        lora=not args.no_lora,
        precisions=args.precisions,
        quant_method=args.quant_method,
    )
    names = [s.name for s in bundle.specs] if args.shapes == "all" else args.shapes.split(",")
    specs = [bundle.spec(n) for n in names]
    rows: list[dict[str, object]] = [
        {"shape": s.name, "weight_fraction": round(s.weight_fraction, 4)} for s in specs
    ]
    notes = []
    if args.data:
        ids = load_token_ids(bundle.tokenizer, args.data, max_tokens=args.max_tokens)
        for row, ppl in zip(rows, shape_report(bundle, specs, ids, args.window), strict=True):
            row["ppl"] = ppl["ppl"]
        notes.append(f"{len(ids)} tokens")
    if args.chat:
        split = None if args.chat_split == "all" else args.chat_split
        records = read_chat(args.chat, split)
        if not records:
            raise ValueError(f"{args.chat} has no {args.chat_split} records")
        convs = [conversation_ids(bundle.tokenizer, r) for r in records]
        for row, chat in zip(rows, chat_report(bundle, specs, convs, progress=True), strict=True):
            row["chat_kl"], row["chat_agree"] = chat["chat_kl"], chat["chat_agree"]
        notes.append(f"{len(records)} chat answers ({sum(len(a) for _, a in convs)} tokens)")
    if args.record:
        _record(args, rows, notes)
    if args.json:
        print(json.dumps(rows))
        return 0
    full = next((r.get("ppl") for r in rows if r["shape"] == bundle.full.name), None)
    header = f"{'shape':<16} {'weights':>8}"
    if args.data:
        header += f" {'ppl':>10} {'vs full':>8}"
    if args.chat:
        header += f" {'chat KL':>8} {'agree':>7}"
    print(header)
    for r in rows:
        line = f"{r['shape']:<16} {r['weight_fraction']:>8.1%}"
        if args.data:
            ratio = f"{r['ppl'] / full:.2f}x" if full else "-"  # type: ignore[operator]
            line += f" {r['ppl']:>10.2f} {ratio:>8}"
        if args.chat:
            line += f" {r['chat_kl']:>8.3f} {r['chat_agree']:>7.1%}"
        print(line)
    print("; ".join(notes))
    return 0
