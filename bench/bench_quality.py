"""Quality of the pack's shapes against training-free baselines, on held-out text, in one run.

Width (full depth, equal weight bytes): the pack (per-layer heads and channels by a knapsack over
measured KL costs + bias compensation) vs a global median-normalised WIFV ranking + bias vs
FLAP-style uniform per-layer WIFV + bias vs the unpermuted prefix (no calibration).
Depth (full width): the pack's DP layer tables vs block influence (ShortGPT) vs greedy removal,
the last two computed here on the same calibration batch the DP used.

    python bench/bench_quality.py            # ~25 min on 2 CPU cores
    python bench/bench_quality.py --quick    # 1,024 held-out tokens instead of 4,096
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from elasticserve.model.bundle import ModelBundle, load_bundle
from elasticserve.model.device import cpu_model
from elasticserve.model.pack import Pack, identity_pack, uniform_widths
from elasticserve.training.calibrate.depth import LayerRunner, block_influence_tables, greedy_tables
from elasticserve.training.calibrate.importance import (
    activation_stats,
    bias_compensation,
    load_dense,
    orders,
    wifv_scores,
)
from elasticserve.training.calibrate.run import calibration_windows, dp_batch
from elasticserve.training.calibrate.widths import global_widths
from elasticserve.training.data import load_token_ids
from elasticserve.training.evaluate import perplexity

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "austen"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pack", default=str(ROOT / "elasticserve/packs/smollm2-135m"))
    p.add_argument("--calib-data", default=str(CORPUS))
    p.add_argument("--eval-data", default=str(CORPUS / "persuasion.txt"))
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (as the pack)")
    p.add_argument("--dp-tokens", type=int, default=1024, help="depth-search tokens (as the pack)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="1,024 eval tokens")
    p.add_argument("--out", default=str(ROOT / "bench/results/bench_quality.json"))
    p.add_argument("--markdown", default=str(ROOT / "bench/results/quality_table.md"))
    args = p.parse_args()
    if args.quick:
        args.eval_tokens = 1024  # the baselines still search on the pack's token counts
    return args


def machine() -> str:
    cpu = cpu_model()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32"


def ppl(bundle: ModelBundle, shape: str, ids: list[int]) -> float:
    value = perplexity(bundle, shape, ids)
    print(f"  {bundle.pack.meta.get('kind', '?'):>10} {shape:<10} ppl {value:10.2f}", flush=True)
    return value


def shape_rows(bundle: ModelBundle, ids: list[int]) -> list[dict]:
    """Every shape of the pack: weight fraction and perplexity."""
    return [
        {"shape": s.name, "weight_fraction": s.weight_fraction, "ppl": ppl(bundle, s.name, ids)}
        for s in bundle.specs
    ]


def width_rows(args, pack: Pack, bundle: ModelBundle, hf, calib, ids, full: dict) -> list[dict]:
    """Pack widths vs global WIFV + bias vs uniform WIFV + bias vs prefix, at full depth."""
    cfg, num = pack.config, pack.config.num_layers
    stats = activation_stats(hf, calib)
    widths = [w for w in pack.widths if w < 1]
    head_scores, mlp_scores = wifv_scores(hf, stats, cfg)
    head_order, mlp_order = orders(head_scores, mlp_scores, cfg)

    def wifv_pack(layer_widths: dict, kind: str) -> Pack:
        bias = bias_compensation(hf, stats, head_order, mlp_order, layer_widths, cfg)
        tables = {num: tuple(range(num))}
        meta: dict[str, object] = {"kind": kind}
        return Pack(
            pack.fingerprint, cfg, head_order, mlp_order, layer_widths, tables, bias, meta=meta
        )

    ranked = global_widths(head_scores, mlp_scores, cfg, pack.widths)
    uniform = {w: uniform_widths(cfg, w) for w in pack.widths}
    prefix = identity_pack(cfg, pack.fingerprint, tuple(pack.widths), [num])
    packs = {
        "global_wifv_bias": wifv_pack(ranked, "global"),
        "uniform_wifv_bias": wifv_pack(uniform, "uniform"),
        "prefix": prefix,
    }
    baselines = {k: load_bundle(bundle.model_dir, p, "float32") for k, p in packs.items()}
    rows = []
    for w in widths:
        name = f"d{num}-w{w}"
        row = {
            "width": w,
            "pack": full[name]["ppl"],
            "weight_fraction": full[name]["weight_fraction"],
        }
        for key, b in baselines.items():
            row[key] = ppl(b, name, ids)
            row[f"{key}_weight_fraction"] = b.spec(name).weight_fraction
        rows.append(row)
    return rows


def depth_rows(args, pack: Pack, bundle: ModelBundle, hf, calib, ids, full: dict) -> list[dict]:
    """DP layer tables vs block influence vs greedy removal, at full width."""
    num = pack.config.num_layers
    depths = [d for d in pack.depths if d < num]
    runner = LayerRunner(hf, dp_batch(calib, args.dp_tokens), args.seq_len // 2)
    searched = pack.meta.get("dp_tables") or {}  # the DP's own tables, before refinement
    tables = {
        "dp": {int(d): tuple(layers) for d, layers in searched.items()},
        "block_influence": block_influence_tables(runner, depths),
        "greedy": greedy_tables(runner, depths),
    }
    rows = []
    for d in depths:
        row: dict = {
            "depth": d,
            "pack": full[f"d{d}-w1.0"]["ppl"],
            "pack_layers": pack.layer_tables[d],
            "pack_kl": runner.score(pack.layer_tables[d], 0),
        }
        for key, table in tables.items():
            if d not in table:
                row[key] = None
                continue
            base = load_bundle(
                bundle.model_dir, pack=_with_table(pack, d, table[d]), dtype="float32"
            )
            row[key] = ppl(base, f"d{d}-w1.0", ids)
            row[f"{key}_layers"] = table[d]
            row[f"{key}_kl"] = runner.score(table[d], 0)  # on the search's calibration batch
        rows.append(row)
    return rows


def _with_table(pack: Pack, depth: int, layers: tuple[int, ...]) -> Pack:
    num = pack.config.num_layers
    widths = {1.0: pack.layer_widths[1.0]}
    tables = {num: tuple(range(num)), depth: layers}
    kind: dict[str, object] = {"kind": "depth-baseline"}
    return Pack(
        pack.fingerprint, pack.config, pack.head_order, pack.mlp_order, widths, tables, meta=kind
    )


def print_tables(result: dict) -> None:
    full_ppl = result["shapes"][0]["ppl"]
    print(f"\nfull model ppl {full_ppl:.2f} ({result['eval_tokens']} tokens of persuasion.txt)")
    print(f"\n{'shape':<12}{'weights':>9}{'ppl':>10}{'x full':>8}  usable (<=1.5x)")
    for r in result["shapes"]:
        ratio = r["ppl"] / full_ppl
        mark = "yes" if ratio <= 1.5 else ""
        print(f"{r['shape']:<12}{r['weight_fraction']:>9.1%}{r['ppl']:>10.2f}{ratio:>8.2f}  {mark}")
    print(
        f"\n{'width':<7}{'weights':>9}{'pack':>9}{'global':>9}{'uniform':>10}{'prefix':>11}"
        f"{'unif/pack':>11}"
    )
    for r in result["width"]:
        print(
            f"{r['width']:<7}{r['weight_fraction']:>9.1%}{r['pack']:>9.2f}"
            f"{r['global_wifv_bias']:>9.2f}{r['uniform_wifv_bias']:>10.2f}{r['prefix']:>11.1f}"
            f"{r['uniform_wifv_bias'] / r['pack']:>11.2f}"
        )
    print(
        f"\n{'depth':<7}{'pack':>9}{'DP alone':>10}{'block infl.':>13}{'greedy':>9}"
        f"{'BI/pack':>9}{'greedy/pack':>13}   calibration KL: pack / DP / greedy"
    )
    for r in result["depth"]:
        print(
            f"{r['depth']:<7}{r['pack']:>9.2f}{_num(r['dp']):>10}{r['block_influence']:>13.2f}"
            f"{r['greedy']:>9.2f}{r['block_influence'] / r['pack']:>9.2f}"
            f"{r['greedy'] / r['pack']:>13.2f}   {r['pack_kl']:.4f} / "
            f"{_num(r.get('dp_kl'), 4)} / {r['greedy_kl']:.4f}"
        )


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The BENCHMARKS.md section: command, machine and the three tables."""
    full_ppl = result["shapes"][0]["ppl"]
    lines = [
        "## Quality of the shapes (held-out perplexity)",
        "",
        f"`{result['command']}` on {result['machine']}: perplexity on the first "
        f"{result['eval_tokens']} tokens of persuasion.txt (non-overlapping windows of "
        f"{result['window']}), pack `{result['pack']}` calibrated on the other five novels. "
        f"Usable = within 1.5x of the full model ({full_ppl:.2f}).",
        "",
        "| shape | weight bytes | ppl | x full | usable |",
        "|---|---|---|---|---|",
    ]
    for r in result["shapes"]:
        ratio = r["ppl"] / full_ppl
        usable = "yes" if ratio <= 1.5 else ""
        fraction = f"{r['weight_fraction']:.1%}"
        lines.append(f"| {r['shape']} | {fraction} | {r['ppl']:.2f} | {ratio:.2f} | {usable} |")
    lines += [
        "",
        "Width at full depth, equal weight bytes: pack (per-layer heads and channels by a "
        "knapsack over measured KL costs, + bias) vs a global median-normalised WIFV ranking + "
        "bias vs uniform per-layer WIFV + bias (FLAP-style) vs the unpermuted prefix.",
        "",
        "| width | weight bytes | pack | global WIFV + bias | uniform WIFV + bias | prefix "
        "| uniform / pack |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["width"]:
        lines.append(
            f"| {r['width']} | {r['weight_fraction']:.1%} | {r['pack']:.2f} | "
            f"{r['global_wifv_bias']:.2f} | {r['uniform_wifv_bias']:.2f} | {r['prefix']:.4g} | "
            f"{r['uniform_wifv_bias'] / r['pack']:.2f} |"
        )
    lines += [
        "",
        "Depth at full width: the pack's layer tables (DP with a beam of "
        f"{result['dp_beam']}, then refined by greedy descents and exchanges) vs the DP's own "
        "tables vs block influence vs greedy removal (all searched on the same calibration "
        "batch; KL: mean per-token KL from the full model on that batch).",
        "",
        "| depth | pack | DP alone | block influence | greedy | BI / pack | greedy / pack "
        "| KL pack / DP / greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["depth"]:
        lines.append(
            f"| {r['depth']} | {r['pack']:.2f} | {_num(r['dp'])} | {r['block_influence']:.2f} | "
            f"{r['greedy']:.2f} | {r['block_influence'] / r['pack']:.2f} | "
            f"{r['greedy'] / r['pack']:.2f} | {r['pack_kl']:.3f} / {_num(r.get('dp_kl'), 3)} / "
            f"{r['greedy_kl']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.monotonic()
    pack = Pack.load(args.pack)
    bundle = load_bundle(None, pack=pack, dtype="float32")
    ids = load_token_ids(bundle.tokenizer, [args.eval_data], max_tokens=args.eval_tokens)
    exclude = [Path(args.eval_data).name]
    calib = calibration_windows(
        bundle.tokenizer, [args.calib_data], exclude, args.tokens, args.seq_len
    )
    hf = load_dense(bundle.model_dir)
    print("pack shapes:")
    shapes = shape_rows(bundle, ids)
    full = {r["shape"]: r for r in shapes}
    print("width baselines:")
    width = width_rows(args, pack, bundle, hf, calib, ids, full)
    print("depth baselines:")
    depth = depth_rows(args, pack, bundle, hf, calib, ids, full)
    result = {
        "command": "python " + shlex.join(["bench/bench_quality.py", *sys.argv[1:]]),
        "machine": machine(),
        "eval_tokens": len(ids),
        "window": min(bundle.max_model_len, 512),
        "pack": str(Path(args.pack).resolve().relative_to(ROOT)),
        "shapes": shapes,
        "width": width,
        "depth": depth,
        "dp_beam": pack.meta.get("dp_beam", 1),
        "seconds": round(time.monotonic() - started),
    }
    print_tables(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.markdown).write_text(markdown(result))
    print(f"\nwrote {args.out} and {args.markdown} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
