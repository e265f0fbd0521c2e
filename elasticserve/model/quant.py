"""Weight-only q8/q4 weights as nested nibble planes: one stored copy serves both precisions.

A weight [N, K] is quantized in groups of QGROUP consecutive input columns. Each weight has an
8-bit code u = 16 c + e: the high code c alone is the q4 weight (scale * c + minimum), and with
the residual code e it is the q8 weight (scale / 16 * u + minimum - scale / 2), so e == 8 adds
nothing. Both codes are stored as planes packed alike (see `QuantWeight`); the native kernels
(kernels/cpu/csrc/qlinear.h) read this layout as it is. A GGUF's Q4_0/Q4_1/Q8_0 blocks map onto
it exactly (`from_gguf`), so a model converted from one keeps its own blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from tqdm import tqdm

from .config import ModelConfig

log = logging.getLogger(__name__)

QGROUP = 32  # input columns per group (= ggml's block of 32)
PRECISIONS = ("q8", "q4")
METHODS = ("minmax", "mse")
SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # "mse": clipping factors tried per group
CHUNK_ROWS = 512
GGUF_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One [N, K] weight as nibble planes: row n, pair p = g // 2 of its groups, is the 32 bytes
    at columns [32p, 32p + 32), byte i = code(group 2p, col i) | code(group 2p + 1, col i) << 4
    (an odd last group leaves its pair's high nibbles 0)."""

    hi: torch.Tensor  # [N, ceil(G/2) * 32] uint8: high codes c, the q4 code
    lo: torch.Tensor | None  # as hi: residual codes e; None: q8 reads this weight as q4
    scale: torch.Tensor  # [N, G] float32: the q4 step d4
    minimum: torch.Tensor  # [N, G] float32: the q4 offset m4

    def __post_init__(self) -> None:
        n, g = self.scale.shape
        plane = (n, _plane_width(g))
        for name, t, dtype, shape in (
            ("hi", self.hi, torch.uint8, plane),
            ("lo", self.lo, torch.uint8, plane),
            ("scale", self.scale, torch.float32, (n, g)),
            ("minimum", self.minimum, torch.float32, (n, g)),
        ):
            if t is None:
                continue
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(
                    f"QuantWeight.{name}: expected a contiguous {dtype} tensor {list(shape)}, "
                    f"got {t.dtype} {list(t.shape)} (contiguous: {t.is_contiguous()})"
                )

    @property
    def rows(self) -> int:
        return self.scale.shape[0]

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    @property
    def cols(self) -> int:
        return self.groups * QGROUP

    def nbytes(self, precision: str) -> int:
        """Bytes a read of the weight at `precision` touches."""
        _check_precision(precision)
        planes = [self.hi] + ([self.lo] if precision == "q8" and self.lo is not None else [])
        return sum(t.numel() * t.element_size() for t in [*planes, self.scale, self.minimum])


def _plane_width(groups: int) -> int:
    return (groups + 1) // 2 * QGROUP


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """[N, G, 32] uint8 codes in [0, 15] -> one plane [N, ceil(G/2) * 32]."""
    n, g, _ = codes.shape
    if g % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1, QGROUP)], dim=1)
    pairs = codes.view(n, -1, 2, QGROUP)  # [N, P, 2, 32]
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, -1).contiguous()


def _unpack(plane: torch.Tensor, groups: int) -> torch.Tensor:
    """One plane [N, P * 32] -> its codes [N, G, 32] uint8."""
    pairs = plane.view(plane.shape[0], -1, 1, QGROUP)  # [N, P, 1, 32]
    codes = torch.cat([pairs & 15, pairs >> 4], dim=2)  # [N, P, 2, 32]
    return codes.view(plane.shape[0], -1, QGROUP)[:, :groups]


def _weight(
    hi: torch.Tensor, lo: torch.Tensor | None, scale: torch.Tensor, minimum: torch.Tensor
) -> QuantWeight:
    """A QuantWeight from codes [N, G, 32] and per-group [N, G] step and offset."""
    lo_plane = None if lo is None else _pack(lo)
    return QuantWeight(
        _pack(hi), lo_plane, scale.float().contiguous(), minimum.float().contiguous()
    )


def quantize(w: torch.Tensor, method: str = "minmax") -> QuantWeight:
    """Quantize a [N, K] float weight group-wise: "minmax" (8-bit range) or "mse" (q4 clipping)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantize method {method!r}: use one of {', '.join(METHODS)}")
    if w.dim() != 2 or w.shape[1] % QGROUP:
        raise ValueError(
            f"cannot quantize a weight of shape {list(w.shape)}: expected [N, K] with K a "
            f"multiple of {QGROUP}"
        )
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with non-finite values (inf or nan)")
    n, k = w.shape
    if n > CHUNK_ROWS:  # chunks stay in cache through the passes over them
        return cat_rows([quantize(part, method) for part in w.split(CHUNK_ROWS)])
    g = w.detach().float().reshape(n, k // QGROUP, QGROUP)  # [N, G, 32]
    mn, mx = g.amin(-1), g.amax(-1)  # [N, G]
    if method == "minmax":
        # A constant group gets step 0 (codes 0), the one choice exact at q4 and q8 alike.
        d8 = (mx - mn) / 255
        u = _codes(g, mn, d8, 255)
        return _weight(u >> 4, u & 15, 16 * d8, mn + 8 * d8)
    d4, m4 = _mse_view(g, mn, mx)
    c = _codes(g, m4, d4, 15)
    d8 = (d4 / 16)[..., None]
    rest = g - (d4[..., None] * c + m4[..., None])  # [N, G, 32]: what q4 leaves
    e = (rest / torch.where(d8 > 0, d8, torch.ones_like(d8))).round_().add_(8).clamp_(0, 15)
    return _weight(c, e.masked_fill_(d8 == 0, 8).to(torch.uint8), d4, m4)


def _codes(g: torch.Tensor, m: torch.Tensor, d: torch.Tensor, top: int) -> torch.Tensor:
    """clamp(round((g - m) / d), 0, top) as uint8 [N, G, 32]; 0 where d == 0 (a constant group)."""
    safe = torch.where(d > 0, d, torch.ones_like(d))[..., None]
    u = (g - m[..., None]).div_(safe).round_().clamp_(0, top)
    return u.masked_fill_((d == 0)[..., None], 0).to(torch.uint8)


def _mse_view(g: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per group the q4 (step, offset) of the [min, max] range shrunk toward 0 by the SHRINK
    factor of least q4 squared error (GPTQ's clipping search), then refit by least squares."""
    # At factor s the grid is s * (mn + d1 * c), d1 = (mx - mn) / 15: in units of d1 the weights
    # sit at a / s - b, so every factor reuses a and b.
    d1 = (mx - mn) / 15  # [N, G]
    unit = torch.where(d1 > 0, d1, torch.ones_like(d1))
    a, b = g / unit[..., None], (mn / unit)[..., None]  # [N, G, 32], [N, G, 1]
    best, shrink = torch.full_like(mn, float("inf")), torch.ones_like(mn)
    for s in SHRINK:
        x = (a / s).sub_(b)
        err = x.clamp(0, 15).round_().sub_(x).square_().sum(-1).mul_(s * s)
        better = err < best
        best, shrink = torch.where(better, err, best), torch.where(better, s, shrink)
    d4, m4 = shrink * d1, shrink * mn
    # Least squares (d, m) for the chosen codes, kept where it lowers the error.
    c = _codes(g, m4, d4, 15).float()
    sc, sw = c.sum(-1), g.sum(-1)
    det = QGROUP * c.square().sum(-1) - sc.square()
    d = (QGROUP * (c * g).sum(-1) - sc * sw) / torch.where(det > 0, det, torch.ones_like(det))
    m = (sw - d * sc) / QGROUP
    better = (det > 0) & (d > 0) & (_q4_error(g, m, d) < _q4_error(g, m4, d4))
    return torch.where(better, d, d4), torch.where(better, m, m4)


def _q4_error(g: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Squared error [N, G] of the q4 grid m + d * c (c in [0, 15]) on groups g [N, G, 32]."""
    c = _codes(g, m, d, 15).float()
    return c.mul_(d[..., None]).add_(m[..., None]).sub_(g).square_().sum(-1)


def dequantize(q: QuantWeight, precision: str) -> torch.Tensor:
    """The float32 [N, K] weight `q` reads as at "q4" or "q8" (the kernels' reference)."""
    _check_precision(precision)
    scale, minimum = q.scale[..., None], q.minimum[..., None]  # [N, G, 1]
    c = _unpack(q.hi, q.groups).float()  # [N, G, 32]
    if precision == "q4" or q.lo is None:
        w = scale * c + minimum
    else:
        u = c * 16 + _unpack(q.lo, q.groups).float()
        w = (scale / 16) * u + (minimum - scale / 2)
    return w.reshape(q.rows, q.cols)


def take_rows(q: QuantWeight, index: torch.Tensor) -> QuantWeight:
    """Rows `index` of `q` (a gather or permutation of output features)."""
    index = _index(index, "row")
    lo = None if q.lo is None else q.lo[index].contiguous()
    return QuantWeight(
        q.hi[index].contiguous(), lo, q.scale[index].contiguous(), q.minimum[index].contiguous()
    )


def _index(index: torch.Tensor, what: str) -> torch.Tensor:
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(
            f"expected a 1-D integer {what} index, got {index.dtype} {list(index.shape)}"
        )
    return index.long()


def cat_rows(weights: list[QuantWeight]) -> QuantWeight:
    """The rows of `weights` one after another; a weight without a residual plane gets one of
    8s (no residual) when the others have one."""
    if not weights:
        raise ValueError("cat_rows needs at least one weight")
    cols = {w.cols for w in weights}
    if len(cols) > 1:
        raise ValueError(f"cat_rows: the weights have different widths K {sorted(cols)}")
    lo = None
    if any(w.lo is not None for w in weights):
        lo = torch.cat([w.lo if w.lo is not None else _no_residual(w) for w in weights])
    hi, scale = torch.cat([w.hi for w in weights]), torch.cat([w.scale for w in weights])
    return QuantWeight(hi, lo, scale, torch.cat([w.minimum for w in weights]))


def _no_residual(q: QuantWeight) -> torch.Tensor:
    return _pack(torch.full((q.rows, q.groups, QGROUP), 8, dtype=torch.uint8))


def take_groups(q: QuantWeight, group_index: torch.Tensor) -> QuantWeight:
    """Whole groups `group_index` of `q`'s input columns, in that order (planes repacked)."""
    gi = _index(group_index, "group")
    lo = None if q.lo is None else _unpack(q.lo, q.groups)[:, gi]
    return _weight(_unpack(q.hi, q.groups)[:, gi], lo, q.scale[:, gi], q.minimum[:, gi])


def from_gguf(raw: np.ndarray, qtype: GGMLQuantizationType) -> QuantWeight:
    """A GGUF Q4_0/Q4_1/Q8_0 tensor's blocks (uint8 [N, bytes per row]) as they are."""
    if qtype not in GGUF_TYPES:
        supported = ", ".join(t.name for t in GGUF_TYPES)
        raise ValueError(f"cannot import GGUF type {qtype.name}: supported are {supported}")
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % type_size:
        raise ValueError(
            f"expected {qtype.name} blocks as uint8 [N, G * {type_size}], "
            f"got {raw.dtype} {list(raw.shape)}"
        )
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, type_size)  # [N, G, type_size]
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if qtype == GGMLQuantizationType.Q8_0:
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))  # [N, G, 32]
        u = (q.to(torch.int16) + 128).to(torch.uint8)
        return _weight(u >> 4, u & 15, 16 * d, -120 * d)  # q8 = d * (u - 128) exactly
    if qtype == GGMLQuantizationType.Q4_0:
        qs, m = blocks[..., 2:], -8 * d
    else:
        qs = blocks[..., 4:]
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs_t = torch.from_numpy(qs.copy())  # [N, G, 16]: byte j = weight j | weight j + 16 << 4
    c = torch.cat([qs_t & 15, qs_t >> 4], dim=-1)  # [N, G, 32]
    return _weight(c, None, d, m)


GGUF_LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_linears(
    gguf_path: str | Path, state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, QuantWeight]:
    """The Q4_0/Q4_1/Q8_0 linears and embedding of a GGUF file, by HF name in `state`'s row order
    (`state`: the fp32 weights transformers dequantized from this file)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
    for i in range(config.num_layers):
        for hf, gg in GGUF_LINEARS.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    found = {hf: tensors[gg] for hf, gg in names.items() if hf in state and gg in tensors}
    out: dict[str, QuantWeight] = {}
    for hf, tensor in tqdm(found.items(), desc="GGUF blocks", leave=False):
        if tensor.tensor_type not in GGUF_TYPES:
            log.info("%s: GGUF type %s is not imported", tensor.name, tensor.tensor_type.name)
            continue
        raw = np.asarray(tensor.data)
        try:
            rows = _match_rows(gguf.quants.dequantize(raw, tensor.tensor_type), state[hf])
        except ValueError as exc:
            log.warning("%s: the GGUF blocks of %s are not used: %s", hf, tensor.name, exc)
            continue
        q = from_gguf(raw, tensor.tensor_type)
        out[hf] = q if rows is None else take_rows(q, rows)
    return out


def _match_rows(rows: np.ndarray, dense: torch.Tensor) -> torch.Tensor | None:
    """For each row of `dense` [N, K] the index of the equal row of `rows` [N, K] (None: the
    identity), matched by the rows' bytes: llama.cpp permutes llama's q/k rows for rotary."""
    target = dense.detach().cpu().numpy()
    if target.shape != rows.shape or target.dtype != rows.dtype:
        raise ValueError(
            f"the dense weight is {target.dtype} {list(target.shape)}, the GGUF tensor "
            f"dequantizes to {rows.dtype} {list(rows.shape)}"
        )
    if np.array_equal(rows, target):
        return None
    where = {row.tobytes(): i for i, row in enumerate(rows)}
    index = [where.get(row.tobytes(), -1) for row in target]
    missing = index.count(-1)
    if missing:
        raise ValueError(
            f"{missing} of {len(index)} dense rows equal no dequantized GGUF row "
            "(the weights were not converted from this file, or changed since)"
        )
    return torch.tensor(index)
