"""Shape-aware mixture of LoRAs (AmoebaLLM's SMoL): experts, the shape gate, their persistence.

Fine-tuning trains `E` rank-`r` experts per elastic linear (q, o, gate, up, down) and one gate for
the whole model that maps a shape's encoding (kept-layer mask ⊕ width one-hot) to top-2 expert
weights. The gate sees only the shape, so every shape collapses to one rank-`2r` adapter
(`A = [A_e1 | A_e2]`, `B = [g1·B_e1 ; g2·B_e2]`), precomputed at load and indexed by shape at
serving time, sliced to the same prefix as the base weight. Experts live in the serving layout
(heads rank-major, channels in importance order), so they belong to the pack they were trained on.

k and v get no adapters: they are never pruned, so the capacity a shape loses is in the five sliced
linears, q and o already let the adapter reshape attention, and two fewer LoRA launches per layer
matter in launch-bound decode. The full shape gets no adapter: it stays the base model exactly
(the distillation teacher, and free of LoRA cost in the most common ste

The mixture lives with the model, not with training/: serving loads it from a pack directory and
collapses it (`effective_weights`) into the per-shape tables of lora.py; fine-tuning
(training/finetune.py) trains it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ModelConfig
from .lora import LINEARS, LoraWeights, Pair
from .shapes import ShapeSpec, format_width

TOP_K = 2
FULL_SHAPE_ID = 0  # the grid's widest, deepest shape: the base model, no adapter
WEIGHTS_FILE, CONFIG_FILE = "lora.safetensors", "lora.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LoraConfig:
    """Shape of the mixture: rank and count of experts, scale alpha/rank, gate MLP width."""

    rank: int = 8
    experts: int = 4
    alpha: float = 16.0
    gate_hidden: int = 16

    def __post_init__(self) -> None:
        if self.rank < 1 or self.experts < TOP_K:
            raise ValueError(f"need rank >= 1 and experts >= {TOP_K}, got {self}")


def linear_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted linear."""
    h, q, i = cfg.hidden_size, cfg.q_size, cfg.intermediate_size
    return {"q": (h, q), "o": (q, h), "gate": (h, i), "up": (h, i), "down": (i, h)}


def shape_encoding(spec: ShapeSpec, widths: list[float]) -> Tensor:
    """The gate's input: kept-layer mask ⊕ width one-hot, [num_layers + num_widths]."""
    one_hot = [float(w == spec.shape.width) for w in widths]
    return torch.tensor([float(k) for k in spec.kept] + one_hot)


class ShapeGate(nn.Module):
    """Shape encoding -> small MLP -> top-2 experts and their softmax weights."""

    def __init__(self, num_inputs: int, experts: int, hidden: int):
        super().__init__()
        first, last = nn.Linear(num_inputs, hidden), nn.Linear(hidden, experts)
        # Zero biases and wide first-layer weights: with default init a shared output bias
        # dominates and nearly every shape picks the same two experts (the others never train).
        nn.init.normal_(first.weight, std=0.3)
        nn.init.zeros_(first.bias)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(first, nn.SiLU(), last)

    @torch.no_grad()
    def center(self, encodings: Tensor) -> None:
        """Set the first layer's bias so the grid's mean encoding (of [N, D]) maps to zero."""
        # Shapes share most kept layers: the encodings' large common part would make every shape
        # pick the same two experts; centred, routing starts from how a shape differs from the grid.
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        first.bias.copy_(-first.weight @ encodings.mean(0))

    def forward(self, encoding: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [N, 2], expert ids [N, 2]) for encodings [N, D]; ties go to the lower id."""
        logits = self.mlp(encoding)  # [N, E]
        top, ids = logits.topk(TOP_K, dim=-1)  # no noise: serving must route like training
        return top.softmax(dim=-1), ids


class LoraExperts(nn.Module):
    """What fine-tuning trains: E experts per linear per layer, and the shape gate."""

    def __init__(
        self,
        cfg: ModelConfig,
        widths: list[float],
        config: LoraConfig,
        grid: list[ShapeSpec] | None = None,
    ):
        super().__init__()
        self.model_config, self.widths, self.config = cfg, list(widths), config
        self.gate = ShapeGate(cfg.num_layers + len(widths), config.experts, config.gate_hidden)
        if grid:  # a fresh gate for training (loaded ones get their trained weights)
            self.gate.center(torch.stack([shape_encoding(s, self.widths) for s in grid]))
        e, r = config.experts, config.rank
        self.a = nn.ParameterDict()  # "<layer>_<linear>" -> [E, in, r]
        self.b = nn.ParameterDict()  # "<layer>_<linear>" -> [E, r, out]; zero: training starts
        for layer in range(cfg.num_layers):  # from the calibrated pack exactly
            for name, (d_in, d_out) in linear_dims(cfg).items():
                bound = 1 / math.sqrt(d_in)  # peft's kaiming-uniform(a=sqrt 5) bound
                a = torch.empty(e, d_in, r).uniform_(-bound, bound)
                self.a[f"{layer}_{name}"] = nn.Parameter(a)
                self.b[f"{layer}_{name}"] = nn.Parameter(torch.zeros(e, r, d_out))

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    def route(self, specs: list[ShapeSpec]) -> tuple[Tensor, Tensor]:
        """Top-2 (weights [N, 2], expert ids [N, 2]) of each shape."""
        device = next(self.gate.parameters()).device
        enc = torch.stack([shape_encoding(s, self.widths) for s in specs]).to(device)
        return self.gate(enc)

    def mixture(self, spec: ShapeSpec) -> list[dict[str, Pair] | None]:
        """The rank-2r adapter of each layer the shape keeps (None elsewhere and for full)."""
        out: list[dict[str, Pair] | None] = [None] * self.model_config.num_layers
        if spec.id == FULL_SHAPE_ID:
            return out
        weights, ids = self.route([spec])
        for layer in spec.layers:
            out[layer] = {
                name: self.combine(f"{layer}_{name}", ids[0], weights[0]) for name in LINEARS
            }
        return out

    def combine(self, key: str, ids: Tensor, weights: Tensor) -> Pair:
        """One linear's rank-2r adapter for experts `ids` [2] with gate weights [2]."""
        # A = [A_e1 | A_e2] [in, 2r] ; B = [g1·B_e1 ; g2·B_e2]·scale [2r, out]
        a, b = self.a[key][ids], self.b[key][ids]  # [2, in, r], [2, r, out]
        a_cat = a.permute(1, 0, 2).reshape(a.shape[1], -1)
        b_cat = (b * (weights * self.scale)[:, None, None]).reshape(-1, b.shape[2])
        return a_cat, b_cat


@torch.no_grad()
def effective_weights(
    experts: LoraExperts,
    specs: list[ShapeSpec],
    dtype: torch.dtype,
    device: torch.device,
    torch_tables: bool = True,
) -> LoraWeights:
    """Collapse the mixture into one adapter per dense shape and layer it keeps (none for
    full), for the torch step; and each shape's route into the experts, for the native CPU step,
    which mixes the experts per row: there a quantized shape takes its dense sibling's adapter
    (the same layers and widths: the gate sees no precision; full's siblings take none).
    `torch_tables=False` skips the torch step's per-shape tables (shapes x layers adapters:
    ~240 MB for the default pack) where only the native step serves."""
    num_layers = experts.model_config.num_layers
    slots = [[-1] * len(specs) for _ in range(num_layers)]
    per_layer: list[dict[str, list[Pair]]] = [{n: [] for n in LINEARS} for _ in range(num_layers)]
    full = next(s.shape for s in specs if s.id == FULL_SHAPE_ID)
    routed = [s for s in specs if (s.shape.depth, s.shape.width) != (full.depth, full.width)]
    weights, ids = experts.route(routed) if routed else (None, None)
    routes = {}
    for i, spec in enumerate(routed):
        assert weights is not None and ids is not None
        routes[spec.id] = (tuple(ids[i].tolist()), tuple(weights[i].tolist()))
        if spec.shape.precision:
            continue  # the torch step cannot run a q8/q4 shape: no tables
        for layer in spec.layers:
            slots[layer][spec.id] = sum(1 for row in slots[layer] if row >= 0)
            if torch_tables:
                for name in LINEARS:
                    pair = experts.combine(f"{layer}_{name}", ids[i], weights[i])
                    per_layer[layer][name].append(pair)
    if not torch_tables:
        per_layer = []

    def stack(pairs: list[Pair], side: int) -> Tensor:
        return torch.stack([p[side] for p in pairs]).to(device, dtype).contiguous()

    tables = [
        {name: (stack(pairs, 0), stack(pairs, 1)) for name, pairs in layer.items() if pairs}
        for layer in per_layer
    ]
    raw = [
        {
            name: tuple(
                t[f"{layer}_{name}"].detach().float().cpu().contiguous()
                for t in (experts.a, experts.b)
            )
            for name in LINEARS
        }
        for layer in range(num_layers)
    ]
    return LoraWeights(slots, tables, routes, raw, experts.scale)


def has_adapters(pack_dir: str | os.PathLike[str]) -> bool:
    """Whether a pack directory holds fine-tuned adapters."""
    return (Path(pack_dir) / WEIGHTS_FILE).is_file()


def save_adapters(
    experts: LoraExperts,
    pack_dir: str | os.PathLike[str],
    meta: dict[str, object] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write the gate (fp32) and experts (`dtype`: bf16 halves the file; loading reads them
    back into fp32) and their config into a pack directory."""
    path = Path(pack_dir)
    tensors = {
        f"gate.{k}": v.detach().float().contiguous() for k, v in experts.gate.state_dict().items()
    }
    for key in experts.a:
        layer, name = key.split("_", 1)
        tensors[f"experts.{layer}.{name}.a"] = experts.a[key].detach().to(dtype).contiguous()
        tensors[f"experts.{layer}.{name}.b"] = experts.b[key].detach().to(dtype).contiguous()
    save_file(tensors, path / WEIGHTS_FILE)
    manifest = {
        "format_version": FORMAT_VERSION,
        **asdict(experts.config),
        "linears": list(LINEARS),
        "widths": [format_width(w) for w in experts.widths],
        "num_layers": experts.model_config.num_layers,
        "full_shape_adapter": False,
        "meta": meta or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(manifest, indent=1) + "\n")


def load_adapters(
    pack_dir: str | os.PathLike[str], cfg: ModelConfig, widths: list[float]
) -> tuple[LoraExperts, dict[str, object]]:
    """Read the experts of a pack directory; refuse ones trained for another grid or model."""
    path = Path(pack_dir)
    manifest = json.loads((path / CONFIG_FILE).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: unknown format {manifest.get('format_version')}")
    saved = [float(w) for w in manifest["widths"]]
    if saved != list(widths) or manifest["num_layers"] != cfg.num_layers:
        raise ValueError(
            f"adapters in {path} were trained for {manifest['num_layers']} layers and widths "
            f"{saved}, but the pack has {cfg.num_layers} layers and widths {list(widths)}"
        )
    config = LoraConfig(**{k: manifest[k] for k in ("rank", "experts", "alpha", "gate_hidden")})
    experts = LoraExperts(cfg, widths, config)
    tensors = load_file(path / WEIGHTS_FILE)
    gate = {k.removeprefix("gate."): v for k, v in tensors.items() if k.startswith("gate.")}
    experts.gate.load_state_dict(gate)
    with torch.no_grad():
        for key in experts.a:
            layer, name = key.split("_", 1)
            experts.a[key].copy_(tensors[f"experts.{layer}.{name}.a"])
            experts.b[key].copy_(tensors[f"experts.{layer}.{name}.b"])
    return experts, dict(manifest.get("meta", {}))
