"""Shapes: a depth (which layers run), a width ratio (which heads and channels run) and a precision
(the model's own dtype, or weight-only q8 / q4 codes of the same stored weights)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5)  # a pack's width ratios unless told otherwise
_SHAPE_RE = re.compile(
    r"^(?:d(?P<depth>\d+))?-?(?:w(?P<width>\d*\.?\d+))?(?:-?(?P<precision>q4|q8))?$"
)
DENSE = ""  # the precision of the model's own dtype: no suffix in a shape name
PRECISIONS = ("q8", "q4")  # the quantized precisions a pack may offer, most bytes first
# bits a quantized shape reads per weight: the codes plus a float32 scale and minimum per 32
PRECISION_BITS = {"q8": 8 + 2, "q4": 4 + 2}
# a step's rows in this order of precision (each reads its own copy of the weights); a
# precision's index is also its code in the native kernels (es::Precision)
PRECISION_ORDER = (DENSE, *PRECISIONS)


def precision_bits(precision: str) -> int:
    """Bits read per weight at `precision`, against 16 for a dense weight of the model's dtype."""
    return PRECISION_BITS.get(precision, 16)


def parse_precisions(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`q8,q4` (or a list) -> ("q8", "q4") in the grid's order; "" or "none" -> ()."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    names = {item.strip().lower() for item in items} - {"", "none"}
    unknown = names - set(PRECISIONS)
    if unknown:
        raise ValueError(
            f"unknown precision(s) {sorted(unknown)}: choose from {', '.join(PRECISIONS)}"
        )
    return tuple(p for p in PRECISIONS if p in names)


def format_width(width: float) -> str:
    """0.75 -> '0.75', 1 -> '1.0': the shortest decimal with at least one fractional digit."""
    text = f"{width:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


@dataclass(frozen=True, order=True)
class Shape:
    """A sub-network shape, written `d<layers>-w<ratio>[-q8|-q4]` (e.g. `d24-w0.75-q4`)."""

    depth: int
    width: float
    precision: str = DENSE  # "", "q8" or "q4"

    def __str__(self) -> str:
        suffix = f"-{self.precision}" if self.precision else ""
        return f"d{self.depth}-w{format_width(self.width)}{suffix}"

    @property
    def bits(self) -> int:
        """Bits read per weight, relative to a 16-bit dense weight for the model's dtype."""
        return precision_bits(self.precision)

    @classmethod
    def parse(cls, text: str, num_layers: int) -> Shape:
        """Parse `full`, `d24-w0.75`, `d24` (full width), `w0.5` (full depth), each with an
        optional precision suffix (`d24-w0.75-q4`, `full-q8`, `q4` alone: the full shape)."""
        text = text.strip().lower()
        base, _, suffix = text.rpartition("-")
        if text in PRECISIONS or (base == "full" and suffix in PRECISIONS):
            return cls(num_layers, 1.0, suffix or text)
        if text == "full":
            return cls(num_layers, 1.0)
        match = _SHAPE_RE.match(text)
        if not text or match is None or not (match["depth"] or match["width"]):
            raise ValueError(
                f"invalid shape {text!r}: write d<layers>-w<ratio>[-q8|-q4] (e.g. d24-w0.75, "
                "d30-w1.0-q4) or 'full' / 'full-q4'"
            )
        depth = int(match["depth"]) if match["depth"] else num_layers
        width = float(match["width"]) if match["width"] else 1.0
        if not 1 <= depth <= num_layers:
            raise ValueError(f"invalid shape {text!r}: depth must be in 1..{num_layers}")
        if not 0.0 < width <= 1.0:
            raise ValueError(f"invalid shape {text!r}: width must be in (0, 1]")
        return cls(depth, round(width, 4), match["precision"] or DENSE)


@dataclass(frozen=True)
class ShapeSpec:
    """A shape resolved against a pack: its id, kept layers and per-layer widths."""

    id: int
    shape: Shape
    layers: tuple[int, ...]  # kept layer indices, ascending
    heads: tuple[int, ...]  # [num_layers] query heads kept per layer (multiples of the KV groups)
    mlp: tuple[int, ...]  # [num_layers] MLP channels kept per layer
    # share of the decoder layers' linear weight bytes this shape reads (a quantized shape's codes
    # and scales against the full shape in the model's dtype)
    weight_fraction: float
    ppl: float | None = None  # held-out perplexity recorded in the pack, if measured
    # {"kl": ..., "agree": ...} against the full shape on held-out chat answers, if measured
    chat: dict[str, float] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return str(self.shape)

    kept: tuple[bool, ...] = field(init=False, repr=False, compare=False)  # [num_layers]

    def __post_init__(self) -> None:
        kept = tuple(i in self.layers for i in range(len(self.heads)))
        object.__setattr__(self, "kept", kept)
