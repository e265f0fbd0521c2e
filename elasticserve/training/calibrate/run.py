"""Calibration end to end: statistics, orderings, widths, biases, layer tables, quality."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ...model.bundle import load_bundle
from ...model.config import ModelConfig
from ...model.loader import load_config, load_state_dict, load_tokenizer, resolve_model_dir
from ...model.pack import Pack, default_depths, model_fingerprint
from ...model.shapes import DEFAULT_WIDTHS
from ..data import load_token_ids, sample_windows
from ..evaluate import shape_report
from .depth import LayerRunner, dp_tables, refine_tables
from .importance import activation_stats, bias_compensation, load_dense, orders, wifv_scores
from .sensitivity import MLP_LEVELS, knapsack_widths, layer_costs

PathLike = str | os.PathLike[str]


def _fingerprint(model_dir: Path, config: ModelConfig) -> str:
    return model_fingerprint(config, load_state_dict(model_dir))


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[PathLike],
    exclude: Sequence[str],
    tokens: int,
    seq_len: int,
) -> torch.Tensor:
    """About `tokens` calibration tokens as windows spread over the data: [N, seq_len]."""
    ids = load_token_ids(tokenizer, data, exclude=exclude)
    return sample_windows(ids, max(1, tokens // seq_len), seq_len)


def dp_batch(calib: torch.Tensor, tokens: int) -> torch.Tensor:
    """Every k-th calibration window, about `tokens` in all: the batch the searches score on."""
    rows = max(1, tokens // calib.shape[1])
    return calib[:: max(1, calib.shape[0] // rows)][:rows]


def calibrate(
    model: PathLike | None,
    data: Sequence[PathLike],
    out: PathLike | None = None,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    depths: Sequence[int] | None = None,
    tokens: int = 16384,
    seq_len: int = 256,
    dp_tokens: int = 1024,
    dp_beam: int = 2,
    refine_rounds: int = 3,
    eval_data: Sequence[PathLike] = (),
    eval_tokens: int = 4096,
    exclude: Sequence[str] = (),
    meta: dict[str, object] | None = None,
) -> Pack:
    """Calibrate `model` on `data`, measure held-out quality on `eval_data`, save to `out`."""
    started = time.monotonic()
    model_dir = resolve_model_dir(model)
    config, _ = load_config(model_dir)
    depths = sorted(set(depths or default_depths(config.num_layers)), reverse=True)
    if not all(1 <= d <= config.num_layers for d in depths):
        raise ValueError(f"depths must be in 1..{config.num_layers}, got {depths}")
    widths = sorted({float(w) for w in widths} | {1.0}, reverse=True)
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_windows(tokenizer, data, exclude, tokens, seq_len)  # [N, T]
    torch.manual_seed(0)
    hf = load_dense(model_dir)
    stats = activation_stats(hf, calib)
    head_scores, mlp_scores = wifv_scores(hf, stats, config)
    head_order, mlp_order = orders(head_scores, mlp_scores, config)
    runner = LayerRunner(hf, dp_batch(calib, dp_tokens), seq_len // 2)
    levels = sorted({*MLP_LEVELS, min(widths) / 2}, reverse=True)  # the smallest width fits
    costs = layer_costs(hf, runner, stats, head_order, mlp_order, config, levels)
    layer_widths = knapsack_widths(costs, config, widths)
    bias = bias_compensation(hf, stats, head_order, mlp_order, layer_widths, config)
    searched = dp_tables(runner, depths, beam=dp_beam)
    tables = refine_tables(runner, searched, rounds=refine_rounds)
    pack = Pack(
        fingerprint=_fingerprint(model_dir, config),
        config=config,
        head_order=head_order,
        mlp_order=mlp_order,
        layer_widths=layer_widths,
        layer_tables=tables,
        bias=bias,
        meta={
            "kind": "calibrated",
            "data": [str(p) for p in data],
            "exclude": list(exclude),
            "calibration_tokens": int(calib.numel()),
            "dp_tokens": runner.ids.numel(),
            "dp_beam": dp_beam,
            "refine_rounds": refine_rounds,
            "dp_tables": {str(d): list(layers) for d, layers in searched.items()},
            **(meta or {}),
        },
    )
    if eval_data:
        pack.quality = measure_quality(model_dir, pack, eval_data, eval_tokens, tokenizer)
        pack.meta["quality_data"] = {"data": [str(p) for p in eval_data], "tokens": eval_tokens}
    pack.meta["seconds"] = round(time.monotonic() - started)
    if out is not None:
        pack.save(out)
        write_readme(pack, Path(out))
    return pack


def write_readme(pack: Pack, out: Path) -> None:
    """A README beside the manifest: what the pack is and the command that regenerates it."""
    command = pack.meta.get("command", "(not recorded: made through the Python API)")
    lines = [
        f"# Calibrated pack ({pack.config.model_type}, {pack.config.num_layers} layers)",
        "",
        "Orderings, per-layer widths, bias compensation and layer tables (no weights), made by",
        "`elasticserve calibrate`. Regenerate it (from the repository root) with:",
        "",
        "```",
        str(command),
        "```",
        "",
        f"Calibration text: {pack.meta.get('data')} (excluding {pack.meta.get('exclude')}),",
        f"{pack.meta.get('calibration_tokens')} tokens for the WIFV statistics and "
        f"{pack.meta.get('dp_tokens')} for the width and depth searches; took "
        f"{pack.meta.get('seconds')} s.",
        "`quality` in manifest.json: held-out perplexity per shape on "
        f"{pack.meta.get('quality_data')}.",
        "",
        "| shape | weight bytes | ppl |",
        "|---|---|---|",
    ]
    for spec in pack.specs():
        ppl = pack.quality.get(spec.name)
        shown = "-" if ppl is None else f"{ppl:.2f}"
        lines.append(f"| {spec.name} | {spec.weight_fraction:.1%} | {shown} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def measure_quality(
    model_dir: Path,
    pack: Pack,
    data: Sequence[PathLike],
    max_tokens: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, float]:
    """Held-out perplexity of every shape of `pack`, by shape name."""
    bundle = load_bundle(model_dir, pack=pack, dtype="float32", device="cpu")
    ids = load_token_ids(tokenizer or bundle.tokenizer, data, max_tokens=max_tokens)
    rows = shape_report(bundle, bundle.specs, ids)
    tqdm.write(f"full-shape perplexity {rows[0]['ppl']:.2f} on {len(ids)} tokens")
    return {str(r["shape"]): round(float(r["ppl"]), 3) for r in rows}  # type: ignore[arg-type]
