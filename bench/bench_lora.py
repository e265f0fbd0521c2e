"""Held-out perplexity of every shape after calibration only and after SMoL fine-tuning, one run.

Both columns come from the serving forward pass of one loaded pack: with its precomputed per-shape
adapters, then with them switched off (what `elasticserve eval --no-lora` measures).

    python bench/bench_lora.py --pack bench/results/smollm2-135m-lora --threads 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from elasticserve.model.adapters import CONFIG_FILE
from elasticserve.model.bundle import ModelBundle, load_bundle
from elasticserve.model.device import cpu_model
from elasticserve.training.data import load_token_ids
from elasticserve.training.evaluate import perplexity

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "austen"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--pack", default=str(ROOT / "bench/results/smollm2-135m-lora"))
    p.add_argument("--eval-data", default=str(CORPUS / "persuasion.txt"))
    p.add_argument("--eval-tokens", type=int, default=4096, help="as the pack's own quality")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="1 is fastest on a busy machine")
    p.add_argument("--out", default=str(ROOT / "bench/results/bench_lora.json"))
    p.add_argument("--markdown", default=str(ROOT / "bench/results/lora_table.md"))
    return p.parse_args()


def machine(bundle: ModelBundle) -> str:
    cpu = cpu_model()
    if bundle.model.device.type == "cuda":
        cpu = torch.cuda.get_device_name(bundle.model.device)
    dtype = str(bundle.model.dtype).removeprefix("torch.")
    return f"{cpu}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, {dtype}"


def all_ppl(bundle: ModelBundle, ids: list[int], label: str) -> dict[str, float]:
    """Perplexity of every shape of the grid, printed as it goes."""
    out = {}
    for spec in bundle.specs:
        out[spec.name] = perplexity(bundle, spec, ids)
        print(f"  {label:<11} {spec.name:<12} ppl {out[spec.name]:9.2f}", flush=True)
    return out


def markdown(rows: list[dict], ft: dict, command: str, device: str) -> str:
    """The before/after table with the commands and the machine."""
    lines = [
        "| shape | weights | ppl calibrated | ppl fine-tuned | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = r["ppl_finetuned"] / r["ppl_calibrated"] - 1
        lines.append(
            f"| {r['shape']} | {r['weight_fraction']:.1%} | {r['ppl_calibrated']:.2f} | "
            f"{r['ppl_finetuned']:.2f} | {change:+.1%} |"
        )
    return "\n".join(
        [
            "Held-out perplexity on persuasion.txt before / after SMoL fine-tuning "
            "(full shape: no adapter).",
            "",
            *lines,
            "",
            f"- bench: `{command}` on {device}",
            f"- fine-tune: `{ft.get('command', '?')}`, {ft.get('steps', '?')} steps on "
            f"{ft.get('device', '?')} ({ft.get('train_tokens', '?')} training tokens)",
            "",
        ]
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    bundle = load_bundle(args.model, args.pack, dtype=args.dtype, lora=True)
    if bundle.model.lora is None:
        sys.exit(f"{args.pack} has no adapters ({CONFIG_FILE}): run `elasticserve finetune` first")
    finetune = json.loads((Path(args.pack) / CONFIG_FILE).read_text()).get("meta", {})
    ids = load_token_ids(bundle.tokenizer, [args.eval_data], max_tokens=args.eval_tokens)
    tuned = all_ppl(bundle, ids, "fine-tuned")
    adapters, bundle.model.lora = bundle.model.lora, None  # the same pack, calibration only
    calibrated = all_ppl(bundle, ids, "calibrated")
    bundle.model.lora = adapters
    rows = [
        {
            "shape": s.name,
            "weight_fraction": s.weight_fraction,
            "ppl_calibrated": calibrated[s.name],
            "ppl_finetuned": tuned[s.name],
        }
        for s in bundle.specs
    ]
    below_full = rows[1:]
    improved = sum(r["ppl_finetuned"] < r["ppl_calibrated"] for r in below_full)
    command = "python " + shlex.join(["bench/bench_lora.py", *sys.argv[1:]])
    device = machine(bundle)
    print(markdown(rows, finetune, command, device))
    print(f"fine-tuning lowers perplexity for {improved} of {len(below_full)} shapes below full")
    result = {
        "command": command,
        "device": device,
        "eval_data": args.eval_data,
        "eval_tokens": len(ids),
        "seconds": round(time.monotonic() - started),
        "finetune": {k: finetune.get(k) for k in ("command", "steps", "device", "train_tokens")},
        "finetune_history": finetune.get("history"),
        "improved_below_full": f"{improved}/{len(below_full)}",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.markdown).write_text(markdown(rows, finetune, command, device))
    print(f"wrote {args.out} and {args.markdown}")


if __name__ == "__main__":
    main()
