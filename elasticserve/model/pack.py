"""The pack: orderings, per-layer widths, layer tables and bias compensation of one base model.

On disk a pack is a directory with `manifest.json` (small, human-readable) and `tensors.safetensors`
(head/channel orderings and bias-compensation vectors). Weights are never stored: the pack permutes
the base model's weights once at load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .shapes import DEFAULT_WIDTHS, DENSE, Shape, ShapeSpec, format_width, parse_precisions

FORMAT_VERSION = 1


class PackMismatchError(ValueError):
    """The pack was calibrated for another model."""


def model_fingerprint(config: ModelConfig, state: dict[str, torch.Tensor]) -> str:
    """A short hash of the model's dimensions and a few of its weights, to refuse foreign packs."""
    h = hashlib.sha256(json.dumps(config.__dict__, sort_keys=True, default=list).encode())
    for name in (
        "model.embed_tokens.weight",
        f"model.layers.{config.num_layers - 1}.mlp.down_proj.weight",
    ):
        sample = state[name].flatten()[:4096].to(torch.float16)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Pack:
    """Everything needed to serve every shape of the grid from one set of weights."""

    fingerprint: str
    config: ModelConfig
    head_order: list[torch.Tensor]  # [num_layers] x [num_heads] original head of each serving slot
    mlp_order: list[torch.Tensor]  # [num_layers] x [intermediate] original channel of each slot
    layer_widths: dict[float, tuple[tuple[int, ...], tuple[int, ...]]]  # width -> (heads, mlp)
    layer_tables: dict[int, tuple[int, ...]]  # depth -> kept layers
    bias: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)  # shape name -> held-out perplexity
    # shape name -> {"kl": mean KL to full, "agree": greedy agreement} on held-out chat answers
    chat_quality: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)  # how it was made (command, data, ...)
    # quantized precisions the grid offers besides the model's dtype ("q8", "q4"), from the same
    # stored weights; quantized once at load (model/quant.py)
    precisions: tuple[str, ...] = ()

    @property
    def widths(self) -> list[float]:
        return sorted(self.layer_widths, reverse=True)

    @property
    def depths(self) -> list[int]:
        return sorted(self.layer_tables, reverse=True)

    def specs(
        self,
        precisions: tuple[str, ...] | None = None,
        dense_bits: int = 16,
        precision_bits: Mapping[str, float] | None = None,
    ) -> list[ShapeSpec]:
        """The shape grid: the model's dtype first, then each quantized precision, each widest
        and deepest first; a spec's position is its shape id. `precisions` overrides the pack's;
        `dense_bits` is the model dtype's width, against which quantized shapes count bytes;
        `precision_bits`: the measured bits per weight of each precision (default: nominal)."""
        measured = precision_bits or {}
        chosen = self.precisions if precisions is None else parse_precisions(precisions)
        full = self.config.layer_params() * self.config.num_layers
        out: list[ShapeSpec] = []
        for precision in (DENSE, *chosen):
            for depth in self.depths:
                for width in self.widths:
                    heads, mlp = self.layer_widths[width]
                    layers = self.layer_tables[depth]
                    params = sum(self.config.layer_params(heads[i], mlp[i]) for i in layers)
                    shape = Shape(depth, width, precision)
                    bits = dense_bits if precision == DENSE else measured.get(precision, shape.bits)
                    out.append(
                        ShapeSpec(
                            id=len(out),
                            shape=shape,
                            layers=layers,
                            heads=heads,
                            mlp=mlp,
                            weight_fraction=params / full * bits / dense_bits,
                            ppl=self.quality.get(str(shape)),
                            chat=self.chat_quality.get(str(shape)),
                        )
                    )
        return out

    def check_model(self, config: ModelConfig, fingerprint: str) -> None:
        """Refuse to serve a pack made for another model."""
        if fingerprint != self.fingerprint or config != self.config:
            raise PackMismatchError(
                f"pack was calibrated for model {self.fingerprint} ({self.config.model_type}, "
                f"{self.config.num_layers} layers, hidden {self.config.hidden_size}), but the "
                f"loaded "
                f"model is {fingerprint} ({config.model_type}, {config.num_layers} layers, hidden "
                f"{config.hidden_size})"
            )

    # -- persistence -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temp dir renamed over `path`, so an interrupt leaves no half pack."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tensors: dict[str, torch.Tensor] = {}
        for i, (heads, mlp) in enumerate(zip(self.head_order, self.mlp_order, strict=True)):
            tensors[f"head_order.{i}"] = heads.to(torch.int32).contiguous()
            tensors[f"mlp_order.{i}"] = mlp.to(torch.int32).contiguous()
        for (width, layer), (o_bias, down_bias) in self.bias.items():
            tensors[f"bias.{format_width(width)}.{layer}.o"] = o_bias.float().contiguous()
            tensors[f"bias.{format_width(width)}.{layer}.down"] = down_bias.float().contiguous()
        save_file(tensors, tmp / "tensors.safetensors")
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "config": {**self.config.__dict__, "eos_token_ids": list(self.config.eos_token_ids)},
            "layer_widths": {
                format_width(w): {"heads": list(h), "mlp": list(m)}
                for w, (h, m) in sorted(self.layer_widths.items(), reverse=True)
            },
            "layer_tables": {str(d): list(t) for d, t in sorted(self.layer_tables.items())},
            "quality": self.quality,
            "chat_quality": self.chat_quality,
            "meta": self.meta,
            "precisions": list(self.precisions),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Pack:
        """Read a pack directory written by `save`."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a pack directory (no manifest.json): {path}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"pack {path} has format version {manifest.get('format_version')}, "
                f"this elasticserve reads version {FORMAT_VERSION}"
            )
        raw = dict(manifest["config"])
        raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
        config = ModelConfig(**raw)
        tensors = load_file(path / "tensors.safetensors")
        bias: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith("bias.") and name.endswith(".o"):
                parts = name.split(".")  # bias.<width with a dot>.<layer>.o
                width, layer = float(".".join(parts[1:-2])), int(parts[-2])
                bias[(width, layer)] = (tensor, tensors[name[: -len(".o")] + ".down"])
        n = config.num_layers
        return cls(
            fingerprint=manifest["fingerprint"],
            config=config,
            head_order=[tensors[f"head_order.{i}"].long() for i in range(n)],
            mlp_order=[tensors[f"mlp_order.{i}"].long() for i in range(n)],
            layer_widths={
                float(w): (tuple(v["heads"]), tuple(v["mlp"]))
                for w, v in manifest["layer_widths"].items()
            },
            layer_tables={int(d): tuple(t) for d, t in manifest["layer_tables"].items()},
            bias=bias,
            quality={k: float(v) for k, v in manifest.get("quality", {}).items()},
            chat_quality={
                k: {m: float(x) for m, x in v.items()}
                for k, v in manifest.get("chat_quality", {}).items()
            },
            meta=dict(manifest.get("meta", {})),
            precisions=parse_precisions(manifest.get("precisions", [])),
        )


def record_quality(
    path: str | os.PathLike[str],
    ppl: dict[str, float] | None = None,
    chat: dict[str, dict[str, float]] | None = None,
    source: dict[str, object] | None = None,
) -> None:
    """Write measured per-shape perplexity and chat quality into a pack directory's manifest
    (only the manifest: the pack's tensors, adapters and README stay), replacing those shapes'
    entries; `source` (what was measured how) goes into meta["quality_record"]."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"not a pack directory (no manifest.json): {path}")
    manifest = json.loads(manifest_path.read_text())
    manifest.setdefault("quality", {}).update({k: round(v, 3) for k, v in (ppl or {}).items()})
    manifest.setdefault("chat_quality", {}).update(
        {k: {m: round(x, 4) for m, x in v.items()} for k, v in (chat or {}).items()}
    )
    if source:
        manifest.setdefault("meta", {})["quality_record"] = source
    tmp = manifest_path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)


# -- the identity pack: original order, uniform widths, evenly spaced layers ----------------------


def rank_major_heads(config: ModelConfig) -> torch.Tensor:
    """Slot i holds rank i // G of KV group i % G: a prefix of m*G heads keeps m per group."""
    groups, per_group = config.num_groups, config.num_heads // config.num_groups
    slots = torch.arange(config.num_heads)
    return (slots % groups) * per_group + slots // groups  # [num_heads] original head per slot


def channel_multiple(config: ModelConfig) -> int:
    """MLP widths are multiples of 64 channels (or finer for toy models)."""
    return min(64, max(1, config.intermediate_size // 16))


def uniform_widths(config: ModelConfig, width: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same kept heads and channels in every layer, rounded to the grid's granularity."""
    groups, mult = config.num_groups, channel_multiple(config)
    heads = max(groups, round(config.num_heads * width / groups) * groups)
    mlp = max(mult, round(config.intermediate_size * width / mult) * mult)
    n = config.num_layers
    return (min(heads, config.num_heads),) * n, (min(mlp, config.intermediate_size),) * n


def default_depths(num_layers: int) -> list[int]:
    """Full depth down to about half, in steps of about a tenth of the layers."""
    step = max(1, round(num_layers / 10))
    return sorted({num_layers, *range(num_layers - step, num_layers // 2 - 1, -step)}, reverse=True)


def evenly_spaced_layers(num_layers: int, depth: int) -> tuple[int, ...]:
    """Keep `depth` layers spread evenly, always including the first and the last."""
    if depth == 1:
        return (num_layers - 1,)
    step = (num_layers - 1) / (depth - 1)
    return tuple(sorted({round(i * step) for i in range(depth)}))


def identity_pack(
    config: ModelConfig,
    fingerprint: str,
    widths: tuple[float, ...] = DEFAULT_WIDTHS,
    depths: list[int] | None = None,
) -> Pack:
    """A pack without calibration: original channel order, uniform widths, evenly spaced layers."""
    depths = default_depths(config.num_layers) if depths is None else depths
    n = config.num_layers
    return Pack(
        fingerprint=fingerprint,
        config=config,
        head_order=[rank_major_heads(config) for _ in range(n)],
        mlp_order=[torch.arange(config.intermediate_size) for _ in range(n)],
        layer_widths={w: uniform_widths(config, w) for w in widths},
        layer_tables={d: evenly_spaced_layers(n, d) for d in depths},
        meta={"kind": "identity"},
    )
