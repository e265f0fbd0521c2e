"""What shape-aware LoRA costs a native decode step: tok/s with adapters against without, one run.

The default model in the native kernels with random rank-r experts (the work does not depend on
their values); each shape decodes at batch 1 and 8 with the adapters bound and with none, the
configurations interleaved (best of `--repeats`, decode time alone, as bench_decode.py). The full
shape has no adapter, so its two rows measure the noise of the machine.

    python bench/bench_lora_decode.py [--shapes d30-w0.75,d24-w0.75-q4,full] [--rank 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_decode import decode_seconds, ours, prompts

from elasticserve.engine.llm import LLM
from elasticserve.model.adapters import LoraConfig, LoraExperts, effective_weights
from elasticserve.model.device import cpu_model, kernel_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="full,d30-w0.75,d24-w0.75-q4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/lora_decode.json")
    args = parser.parse_args()
    llm = LLM()
    bundle = llm.bundle
    if bundle.native is None:
        raise SystemExit("the native CPU kernels do not run here")
    torch.manual_seed(0)
    config = LoraConfig(rank=args.rank, experts=args.experts)
    experts = LoraExperts(bundle.config, bundle.pack.widths, config, bundle.specs)
    with torch.no_grad():
        for b in experts.b.values():
            b.normal_(0, 0.01)
    lora = effective_weights(experts, bundle.specs, bundle.model.dtype, torch.device("cpu"))
    shapes = args.shapes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    runs = {}
    for shape in shapes:
        for batch in batches:
            run = ours(llm, prompts(llm.tokenizer, batch, args.prompt_len), shape)
            for on in (False, True):

                def timed(n: int, run=run, on=on) -> object:
                    bundle.model.lora = lora if on else None
                    return run(n)

                runs[(shape, batch, on)] = timed
    best, _ = decode_seconds(runs, args.new_tokens, args.repeats)
    bundle.model.lora = None
    print(f"CPU: {cpu_model()}, flags: {' '.join(kernel_flags())}; dtype {bundle.model.dtype}")
    print(
        f"rank {args.rank} x {args.experts} experts; {args.new_tokens} new tokens, best of "
        f"{args.repeats}"
    )
    print(f"{'shape':<16} {'batch':>5} {'tok/s':>8} {'+LoRA':>8} {'ratio':>6}")
    rows = []
    for shape in shapes:
        for batch in batches:
            off, on = (batch * args.new_tokens / best[(shape, batch, x)] for x in (False, True))
            rows.append({"shape": shape, "batch": batch, "tok_s": off, "lora_tok_s": on})
            print(f"{shape:<16} {batch:>5} {off:8.1f} {on:8.1f} {on / off:6.2f}")
    result = {
        "args": vars(args),
        "cpu": cpu_model(),
        "cpu_flags": kernel_flags(),
        "dtype": str(bundle.model.dtype),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
