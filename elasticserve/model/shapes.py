"""Shapes: a depth (which layers run) and a width ratio (which heads and channels run)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5)  # a pack's width ratios unless told otherwise
_SHAPE_RE = re.compile(r"^(?:d(?P<depth>\d+))?-?(?:w(?P<width>\d*\.?\d+))?$")


def format_width(width: float) -> str:
    """0.75 -> '0.75', 1 -> '1.0': the shortest decimal with at least one fractional digit."""
    text = f"{width:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


@dataclass(frozen=True, order=True)
class Shape:
    """A sub-network shape, written `d<layers>-w<ratio>` (e.g. `d24-w0.75`)."""

    depth: int
    width: float

    def __str__(self) -> str:
        return f"d{self.depth}-w{format_width(self.width)}"

    @classmethod
    def parse(cls, text: str, num_layers: int) -> Shape:
        """Parse `full`, `d24-w0.75`, `d24` (full width) or `w0.5` (full depth)."""
        text = text.strip().lower()
        if text == "full":
            return cls(num_layers, 1.0)
        match = _SHAPE_RE.match(text)
        if not text or match is None or not (match["depth"] or match["width"]):
            raise ValueError(
                f"invalid shape {text!r}: write d<layers>-w<ratio> (e.g. d24-w0.75) or 'full'"
            )
        depth = int(match["depth"]) if match["depth"] else num_layers
        width = float(match["width"]) if match["width"] else 1.0
        if not 1 <= depth <= num_layers:
            raise ValueError(f"invalid shape {text!r}: depth must be in 1..{num_layers}")
        if not 0.0 < width <= 1.0:
            raise ValueError(f"invalid shape {text!r}: width must be in (0, 1]")
        return cls(depth, round(width, 4))


@dataclass(frozen=True)
class ShapeSpec:
    """A shape resolved against a pack: its id, kept layers and per-layer widths."""

    id: int
    shape: Shape
    layers: tuple[int, ...]  # kept layer indices, ascending
    heads: tuple[int, ...]  # [num_layers] query heads kept per layer (multiples of the KV groups)
    mlp: tuple[int, ...]  # [num_layers] MLP channels kept per layer
    weight_fraction: float  # share of the decoder layers' linear weight bytes this shape reads
    ppl: float | None = None  # held-out perplexity recorded in the pack, if measured

    @property
    def name(self) -> str:
        return str(self.shape)

    kept: tuple[bool, ...] = field(init=False, repr=False, compare=False)  # [num_layers]

    def __post_init__(self) -> None:
        kept = tuple(i in self.layers for i in range(len(self.heads)))
        object.__setattr__(self, "kept", kept)
