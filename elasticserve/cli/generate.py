"""`elasticserve generate` and `elasticserve shapes`: one completion, and the shape grid."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .args import add_model_arguments, model_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` and `shapes` subcommands."""
    gen = subparsers.add_parser("generate", help="generate a completion at one shape")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--shape", default=None, help="d<layers>-w<ratio>, e.g. d24-w0.75 (default full)"
    )
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_generate)

    shapes = subparsers.add_parser("shapes", help="list the shape grid of a model and pack")
    add_model_arguments(shapes)
    shapes.add_argument("--json", action="store_true")
    shapes.set_defaults(func=_shapes)


def _generate(args: argparse.Namespace) -> None:
    from ..engine.llm import LLM
    from ..engine.sampling import SamplingParams

    llm = LLM(args.model, args.pack, **model_options(args))
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = llm.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    out = llm.generate(prompt, params, shape=args.shape)[0]
    print(out.outputs[0].text)
    print(f"[{llm.bundle.name}@{out.narrowest_shape}]", file=sys.stderr)


def _shapes(args: argparse.Namespace) -> None:
    from ..model.bundle import load_bundle

    bundle = load_bundle(args.model, args.pack, **model_options(args))
    rows: list[dict[str, Any]] = [
        {
            "shape": s.name,
            "id": s.id,
            "depth": s.shape.depth,
            "width": s.shape.width,
            "precision": s.shape.precision or str(bundle.model.dtype).removeprefix("torch."),
            "weight_fraction": round(s.weight_fraction, 4),
            "weight_bytes": bundle.weight_bytes(s),
            "ppl": s.ppl,
        }
        for s in bundle.specs
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'id':>3}  {'shape':<15} {'precision':>9} {'weights':>8} {'MB/token':>9} {'ppl':>9}")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] is not None else "-"
        print(
            f"{r['id']:>3}  {r['shape']:<15} {r['precision']:>9} {r['weight_fraction']:>8.1%} "
            f"{r['weight_bytes'] / 1e6:>9.1f} {ppl:>9}"
        )
