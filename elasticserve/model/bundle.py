"""A servable model: serving-layout weights, pack, shape grid and tokenizer, loaded once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from transformers import PreTrainedTokenizerBase

from .adapters import effective_weights, has_adapters, load_adapters
from .config import ModelConfig
from .decoder import ElasticModel, rope_tables
from .device import resolve_device, resolve_dtype
from .loader import load_config, load_state_dict, load_tokenizer, resolve_model_dir, served_name
from .native import NativeDecoder
from .pack import Pack, identity_pack, model_fingerprint
from .quant import QuantWeight, gguf_linears
from .shapes import Shape, ShapeSpec, parse_precisions
from .step_plan import BiasTable
from .weights import QuantWeights, quantized_weights, serving_weights

PACKS_DIR = Path(__file__).parents[1] / "packs"


def default_pack_path(name: str) -> Path | None:
    """The pack committed with the package for a known model, if any."""
    path = PACKS_DIR / name
    return path if (path / "manifest.json").is_file() else None


@dataclass
class ModelBundle:
    """Everything loaded for one base model."""

    name: str
    model_dir: Path
    config: ModelConfig
    pack: Pack
    model: ElasticModel
    tokenizer: PreTrainedTokenizerBase
    specs: list[ShapeSpec]  # the grid, widest/deepest first; index = shape id
    max_model_len: int
    biases: BiasTable  # bias compensation on the model's device and dtype
    native: NativeDecoder | None = None  # the native CPU decoder step, where it serves
    quant: QuantWeights | None = None  # the q8/q4 planes of the grid's quantized shapes

    @property
    def full(self) -> ShapeSpec:
        return self.specs[0]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end a generation: the config's EOS ids and the tokenizer's."""
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        return frozenset(eos)

    def weight_bytes(self, spec: ShapeSpec) -> int:
        """Weight bytes one decode step of `spec` reads: its decoder linears and the LM head
        (q8 planes for a quantized shape)."""
        cfg = self.config
        dense = self.model.dtype.itemsize
        if spec.shape.precision and self.quant is not None:
            decoder = cfg.layer_params() * cfg.num_layers * dense * spec.weight_fraction
            return int(decoder) + self.quant.head.nbytes("q8")
        params = sum(cfg.layer_params(spec.heads[i], spec.mlp[i]) for i in spec.layers)
        return (params + cfg.vocab_size * cfg.hidden_size) * dense

    def spec(self, shape: str | Shape | ShapeSpec | None) -> ShapeSpec:
        """Resolve a shape name (or None = full) against the grid, with a clear error."""
        if shape is None:
            return self.full
        if isinstance(shape, ShapeSpec):
            return shape
        parsed = shape if isinstance(shape, Shape) else Shape.parse(shape, self.config.num_layers)
        for spec in self.specs:
            if spec.shape == parsed:
                return spec
        depths = ", ".join(map(str, self.pack.depths))
        widths = ", ".join(f"{w:g}" for w in self.pack.widths)
        served = sorted({s.shape.precision for s in self.specs} - {""})
        precisions = ", ".join(["the model's dtype (no suffix)", *served])
        raise ValueError(
            f"shape {parsed} is not in the grid of this pack (depths {depths}; widths {widths}; "
            f"precisions {precisions})"
        )


def load_bundle(
    model: str | os.PathLike[str] | None = None,
    pack: str | os.PathLike[str] | Pack | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    max_model_len: int | None = None,
    name: str | None = None,
    lora: bool = True,
    cpu_kernels: str = "auto",
    precisions: str | tuple[str, ...] | None = None,
    quant_method: str = "mse",
    down_q8: bool = True,
) -> ModelBundle:
    """Load a base model (default: the embedded SmolLM2-135M) and serve it through `pack`.

    pack=None uses the pack committed for the default model, else the identity pack (original
    order, uniform widths, evenly spaced layers). `lora` applies the pack directory's fine-tuned
    adapters, if it has any (lora=False: the calibrated shapes alone, e.g. `eval --no-lora`).
    `cpu_kernels` on a CPU: "auto" runs steps in the native kernels when they build here, "native"
    requires them, "torch" keeps torch ops. `precisions` ("q8,q4"; None: the pack's) adds the
    grid's quantized shapes, served by the native kernels from planes quantized at load: a GGUF
    source's own Q4_0/Q4_1/Q8_0 blocks where they survive the pack's order, else `quant_method`
    ("minmax" or "mse" clipping); `down_q8`: q4 rows read `down` at q8 (its input, after the
    SiLU gate, is the one q4 hurts most: 13 % perplexity on the default model, 0.03 % at q8).
    """
    dev = resolve_device(device)
    ext = native_extension(cpu_kernels, dev)
    torch_dtype = resolve_dtype(dtype, dev, native=ext is not None)
    model_dir = resolve_model_dir(model, cache_dir)
    config, hf_config = load_config(model_dir)
    state = load_state_dict(model_dir)
    fingerprint = model_fingerprint(config, state)
    own_name = served_name(model)
    name = name or own_name
    pack_dir: Path | None = None
    if pack is None:  # the default model's own pack, whatever name it is served under
        pack_dir = default_pack_path(own_name) if model is None else None
        pack = Pack.load(pack_dir) if pack_dir else identity_pack(config, fingerprint)
    elif not isinstance(pack, Pack):
        pack_dir = Path(pack)
        pack = Pack.load(pack_dir)
    pack.check_model(config, fingerprint)
    chosen = pack.precisions if precisions is None else parse_precisions(precisions)
    if chosen and ext is None:
        raise ValueError(
            f"q8/q4 shapes ({', '.join(chosen)}) run in the native CPU kernels, which do not run "
            f"here ({dev.type}, --cpu-kernels {cpu_kernels}): pass --precisions none"
        )
    quant = None
    if chosen:  # from the fp32 weights, before serving_weights frees them
        quant = quantized_weights(
            state, config, pack, _gguf_source(model_dir, state, config), quant_method
        )
    max_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    cos, sin = rope_tables(hf_config, max_len)
    weights = serving_weights(state, config, pack, torch_dtype, dev)
    elastic = ElasticModel(config, weights, (cos.to(dev, torch_dtype), sin.to(dev, torch_dtype)))
    bits = {p: quant.bits_per_weight(p, down_q8) for p in chosen} if quant is not None else None
    specs = pack.specs(chosen, dense_bits=torch_dtype.itemsize * 8, precision_bits=bits)
    if lora and pack_dir is not None and has_adapters(pack_dir):
        experts, _ = load_adapters(pack_dir, config, pack.widths)
        # the native CPU step mixes the experts itself: no per-shape tables for the torch step
        elastic.lora = effective_weights(experts, specs, torch_dtype, dev, ext is None)
    biases = {
        k: (o.to(dev, torch_dtype), d.to(dev, torch_dtype)) for k, (o, d) in pack.bias.items()
    }
    native = None
    if ext is not None:
        native = NativeDecoder(ext, elastic, specs, biases, (cos, sin), quant, down_q8)
    return ModelBundle(
        name=name,
        model_dir=model_dir,
        config=config,
        pack=pack,
        model=elastic,
        tokenizer=load_tokenizer(model_dir),
        specs=specs,
        max_model_len=max_len,
        biases=biases,
        native=native,
        quant=quant,
    )


def _gguf_source(
    model_dir: Path, state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, QuantWeight] | None:
    """The quantized blocks of the GGUF file `model_dir` was converted from, if it was."""
    marker = model_dir / "elasticserve_source.json"
    if not marker.is_file():
        return None
    gguf = Path(json.loads(marker.read_text())["gguf"])
    return gguf_linears(gguf, state, config) if gguf.is_file() else None


CPU_KERNELS = ("auto", "native", "torch")


def native_extension(cpu_kernels: str, device: torch.device) -> ModuleType | None:
    """The native CPU extension when `cpu_kernels` and the device call for it, else None."""
    if cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"unknown cpu_kernels {cpu_kernels!r}: use {', '.join(CPU_KERNELS)}")
    if device.type != "cpu" or cpu_kernels == "torch":
        return None
    from ..kernels.cpu import load

    ext = load()
    if ext is None and cpu_kernels == "native":
        raise RuntimeError("--cpu-kernels native: the native CPU kernels do not build here")
    return ext
