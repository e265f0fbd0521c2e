"""`elasticserve finetune` and `elasticserve export`: the command-line face of SMoL fine-tuning."""

from __future__ import annotations

import argparse
import shlex
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` and `export` subcommands to the elasticserve CLI."""
    ft = subparsers.add_parser(
        "finetune", help="train shape-aware LoRA experts by in-place distillation"
    )
    _model_args(ft)
    ft.add_argument("--data", nargs="+", required=True, help="training text files or dirs")
    ft.add_argument("--exclude", nargs="*", default=[], help="file names in --data to skip")
    ft.add_argument("--eval-data", nargs="*", default=[], help="held-out text for periodic eval")
    ft.add_argument(
        "--chat-data",
        default=None,
        help="chat JSONL (elasticserve distill-data): its train records join the text stream",
    )
    ft.add_argument(
        "--chat-share",
        type=float,
        default=0.5,
        help="share of each batch's windows drawn from --chat-data",
    )
    ft.add_argument("--out", required=True, help="pack directory to write (pack + adapters)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--lr", type=float, default=1e-3)
    ft.add_argument("--gate-lr-ratio", type=float, default=0.1, help="gate lr / expert lr")
    ft.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%%)")
    ft.add_argument("--rank", type=int, default=8, help="rank r of each expert")
    ft.add_argument("--experts", type=int, default=4, help="experts E per linear")
    ft.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    ft.add_argument("--seq-len", type=int, default=256)
    ft.add_argument("--batch", type=int, default=4)
    ft.add_argument("--random-shapes", type=int, default=2, help="random students per step")
    ft.add_argument("--eval-every", type=int, default=50, help="steps between held-out evals")
    ft.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens per eval")
    ft.add_argument("--checkpoint", default=None, help="checkpoint file (default <out>.ckpt.pt)")
    ft.add_argument("--checkpoint-every", type=int, default=25)
    ft.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument(
        "--adapter-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="how the pack stores the experts (bfloat16: half the file)",
    )
    ft.add_argument(
        "--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)"
    )
    ft.set_defaults(func=run_finetune)

    dd = subparsers.add_parser(
        "distill-data",
        help="write a chat distillation set: prompts answered by the full shape (JSONL)",
    )
    _model_args(dd)
    dd.add_argument("--out", required=True, help="JSONL file to write")
    dd.add_argument("--data", nargs="*", default=[], help="text files or dirs for passage tasks")
    dd.add_argument("--exclude", nargs="*", default=[], help="file names in --data to skip")
    dd.add_argument(
        "--seed-prompts", type=int, default=None, help="how many of the built-in requests (all)"
    )
    dd.add_argument(
        "--self-prompts", type=int, default=60, help="requests the full shape writes itself"
    )
    dd.add_argument("--passages", type=int, default=60, help="tasks over passages of --data")
    dd.add_argument("--max-tokens", type=int, default=256, help="longest answer")
    dd.add_argument("--temperature", type=float, default=0.7, help="answers' temperature")
    dd.add_argument("--heldout", type=float, default=0.15, help="share of prompts held out")
    dd.add_argument("--seed", type=int, default=0)
    dd.set_defaults(func=run_distill_data)

    ex = subparsers.add_parser("export", help="write one shape as an HF model dir + peft LoRA")
    _model_args(ex)
    ex.add_argument("--shape", required=True, help="d<layers>-w<ratio>, e.g. d24-w0.75")
    ex.add_argument("--out", required=True, help="directory to write")
    ex.add_argument("--no-lora", action="store_true", help="export without the shape's adapter")
    ex.set_defaults(func=run_export)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF dir, .safetensors or .gguf")
    parser.add_argument("--pack", default=None, help="pack directory (default: the model's own)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune, write the pack with adapters, print the held-out trend."""
    import torch

    from ..model.adapters import LoraConfig
    from ..model.bundle import load_bundle
    from ..training.data import load_token_ids
    from ..training.finetune import FinetuneConfig, finetune

    if args.threads:  # on shared cores an op's threads wait on each other: fewer can be faster
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    bundle = load_bundle(args.model, args.pack, args.dtype, args.device, lora=False)
    train = load_token_ids(bundle.tokenizer, args.data, exclude=args.exclude)
    held_out = load_token_ids(bundle.tokenizer, args.eval_data) if args.eval_data else []
    chat: list[int] = []
    if args.chat_data:
        from ..training.chat import chat_stream, read_chat

        chat = chat_stream(bundle.tokenizer, read_chat(args.chat_data, "train"))
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    config = FinetuneConfig(
        steps=args.steps,
        lr=args.lr,
        gate_lr_ratio=args.gate_lr_ratio,
        warmup=args.warmup,
        lora=LoraConfig(rank=args.rank, experts=args.experts, alpha=alpha),
        seq_len=args.seq_len,
        batch=args.batch,
        random_shapes=args.random_shapes,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        chat_share=args.chat_share if chat else 0.0,
        adapter_dtype=args.adapter_dtype,
    )
    meta = {
        "command": "elasticserve " + shlex.join(sys.argv[1:]),
        "device": str(bundle.model.device),
        "train_tokens": len(train),
        "chat_tokens": len(chat),
    }
    result = finetune(
        bundle, train, held_out, args.out, config, args.checkpoint, args.resume, meta, chat_ids=chat
    )
    minutes = (time.monotonic() - started) / 60
    resumed = f" ({result.start_step} resumed)" if result.start_step else ""
    print(f"wrote {args.out}: {result.steps} steps{resumed} in {minutes:.1f} min")
    for row in result.history:
        cells = [f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
        print("  " + ", ".join(cells))
    return 0


def run_distill_data(args: argparse.Namespace) -> int:
    """Write the distillation set and say what is in it."""
    from collections import Counter

    from ..model.bundle import load_bundle
    from ..training.chat import SEED_PROMPTS, build_distill_set, write_jsonl

    started = time.monotonic()
    bundle = load_bundle(args.model, args.pack, args.dtype, args.device, lora=False)
    records = build_distill_set(
        bundle,
        data=args.data,
        exclude=args.exclude,
        seed_prompts=len(SEED_PROMPTS) if args.seed_prompts is None else args.seed_prompts,
        self_count=args.self_prompts,
        passage_count=args.passages if args.data else 0,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        heldout=args.heldout,
        seed=args.seed,
    )
    n = write_jsonl(records, args.out)
    sources = Counter(r["source"] for r in records)
    splits = Counter(r["split"] for r in records)
    minutes = (time.monotonic() - started) / 60
    print(f"wrote {args.out}: {n} conversations in {minutes:.1f} min")
    print("  sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    print("  splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the shape's HF directory (and its peft adapter) and say how to load it."""
    from ..model.bundle import load_bundle
    from ..training.export import ADAPTER_DIR, export_shape

    bundle = load_bundle(args.model, args.pack, args.dtype, args.device, lora=not args.no_lora)
    spec = bundle.spec(args.shape)
    out = export_shape(bundle, spec, args.out, lora=not args.no_lora)
    print(f"wrote {out} ({spec.name}, {spec.weight_fraction:.1%} of the layer weights)")
    if (out / ADAPTER_DIR).is_dir():
        print(f"adapter: PeftModel.from_pretrained(model, '{out / ADAPTER_DIR}')")
    return 0
