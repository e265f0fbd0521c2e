"""The `elasticserve` command: generate, shapes, serve, calibrate, eval, profile, bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--pack/--dtype/--device, shared by every command that loads a model."""
    parser.add_argument(
        "--model", default=None, help="HF dir, .safetensors or .gguf (default: SmolLM2-135M)"
    )
    parser.add_argument("--pack", default=None, help="pack directory (default: the model's own)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")


def _generate(args: argparse.Namespace) -> None:
    from ..engine.llm import LLM
    from ..engine.sampling import SamplingParams

    llm = LLM(args.model, args.pack, dtype=args.dtype, device=args.device)
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

    bundle = load_bundle(args.model, args.pack, dtype=args.dtype, device=args.device)
    rows = [
        {
            "shape": s.name,
            "id": s.id,
            "depth": s.shape.depth,
            "width": s.shape.width,
            "weight_fraction": round(s.weight_fraction, 4),
            "ppl": s.ppl,
        }
        for s in bundle.specs
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'id':>3}  {'shape':<12} {'weights':>8} {'ppl':>9}")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] is not None else "-"
        print(f"{r['id']:>3}  {r['shape']:<12} {r['weight_fraction']:>8.1%} {ppl:>9}")


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; optional parts register themselves."""
    parser = argparse.ArgumentParser(prog="elasticserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion at one shape")
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

    shapes = sub.add_parser("shapes", help="list the shape grid of a model and pack")
    add_model_arguments(shapes)
    shapes.add_argument("--json", action="store_true")
    shapes.set_defaults(func=_shapes)

    for register in _registrations():
        register(sub)
    return parser


def _serve(args: argparse.Namespace) -> None:
    from ..server.ray.args import use_ray

    if use_ray(args):
        from ..server.ray.serve import run_ray_serve

        run_ray_serve(args)
    else:
        from ..server.serve import run_serve

        run_serve(args)


def _register_serve(sub: argparse._SubParsersAction) -> None:
    from ..server.args import add_serve_arguments
    from ..server.ray.args import add_ray_arguments

    serve = sub.add_parser(
        "serve", help="start the OpenAI-compatible server (--replicas N: on Ray Serve)"
    )
    add_serve_arguments(serve)
    add_ray_arguments(serve)
    serve.set_defaults(func=_serve)


def _registrations() -> list[Callable[[argparse._SubParsersAction], None]]:
    from .bench import register as bench
    from .calibrate import register as calibrate
    from .finetune import register as finetune
    from .profile import register as profile

    return [_register_serve, calibrate, finetune, profile, bench]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `elasticserve` command."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"elasticserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
