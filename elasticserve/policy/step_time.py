"""The step-time model: seconds of one engine step, from its widest, deepest row and its size.

A step costs what its widest, deepest row costs (DESIGN.md "What a mixed step costs"), so a step is
described by its *envelope* shape (deepest depth, widest width of its rows), its rows, its tokens
and its attention work. Per envelope shape `s` the model is linear:

    t = a_s + b_s * rows + c_s * tokens + d_s * attn      (attn: thousands of query-key pairs)

fitted on a measured latency profile (latency_profile.py) and scaled online by an EWMA of the ratio
observed / predicted, so a loaded or noisy machine does not break the predictions. Pure Python:
the policy uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any

from ..model.shapes import Shape, ShapeSpec, precision_bits

Coefficients = tuple[float, float, float, float]  # a (s), b (s/row), c (s/token), d (s/k pairs)
RATIO_CLAMP = (0.1, 10.0)  # one observation moves the ratio at most this far: outliers are noise


@dataclass(frozen=True)
class StepLoad:
    """What one step runs: its envelope shape, rows, tokens and attention work."""

    shape: str  # envelope shape name, e.g. "d24-w0.75"
    rows: int  # sequences in the step
    tokens: int  # tokens fed: one per decode plus every prefill chunk's tokens
    attn: float  # sum over rows of new tokens x context length, in thousands

    def features(self) -> Coefficients:
        return (1.0, float(self.rows), float(self.tokens), self.attn)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "rows": self.rows, "tokens": self.tokens, "attn": self.attn}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepLoad:
        return cls(str(d["shape"]), int(d["rows"]), int(d["tokens"]), float(d["attn"]))


def envelope(shapes: Iterable[Shape]) -> Shape:
    """The deepest depth, widest width and most bytes per weight among `shapes`: about what a
    step of them costs (a step of two precisions reads both copies: a little more)."""
    shapes = list(shapes)
    precision = max((s.precision for s in shapes), key=precision_bits)
    return Shape(max(s.depth for s in shapes), max(s.width for s in shapes), precision)


def attn_pairs(new_tokens: int, cached: int) -> float:
    """Thousands of query-key pairs of a chunk of `new_tokens` after `cached` tokens (causal)."""
    return new_tokens * (cached + (new_tokens + 1) / 2) / 1000


def step_load(rows: Iterable[tuple[Shape, int, int]]) -> StepLoad:
    """The load of a step of rows (shape, new tokens, tokens already cached)."""
    rows = list(rows)
    return StepLoad(
        shape=str(envelope(shape for shape, _, _ in rows)),
        rows=len(rows),
        tokens=sum(n for _, n, _ in rows),
        attn=sum(attn_pairs(n, start) for _, n, start in rows),
    )


def predicted_latency(
    model: StepTimeModel, specs: Sequence[ShapeSpec], prompt_tokens: int = 128
) -> dict[str, dict[str, float]]:
    """Each shape alone, per the model: its prefill of `prompt_tokens` and a decode step, ms."""
    return {
        spec.name: {
            "ttft_ms": round(1000 * model.predict(step_load([(spec.shape, prompt_tokens, 0)])), 3),
            "tpot_ms": round(1000 * model.predict(step_load([(spec.shape, 1, prompt_tokens)])), 3),
        }
        for spec in specs
    }


@dataclass(frozen=True)
class Sample:
    """One measured step."""

    load: StepLoad
    seconds: float
    kind: str = "step"  # how it was made: decode, prefill, mixed, ...

    def to_dict(self) -> dict[str, Any]:
        return {**self.load.to_dict(), "seconds": self.seconds, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sample:
        return cls(StepLoad.from_dict(d), float(d["seconds"]), str(d.get("kind", "step")))


class StepTimeModel:
    """Per-shape linear step time, times an online EWMA correction ratio."""

    def __init__(self, coefficients: Mapping[str, Sequence[float]], alpha: float = 0.1) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        bad = [name for name, c in coefficients.items() if len(c) != 4]
        if bad:
            raise ValueError(f"shapes {bad} need 4 coefficients (a, b, c, d)")
        self.coefficients: dict[str, Coefficients] = {
            name: (float(c[0]), float(c[1]), float(c[2]), float(c[3]))
            for name, c in coefficients.items()
        }
        self.alpha = alpha
        self._log_ratio = 0.0
        self.observations = 0
        self.last: tuple[float, float] | None = None  # (predicted, observed) seconds of a step

    @property
    def ratio(self) -> float:
        """Observed / fitted step time, smoothed: how much slower this machine runs right now."""
        return math.exp(self._log_ratio)

    def raw(self, load: StepLoad) -> float:
        """The fitted step time, without the online correction."""
        if load.shape not in self.coefficients:
            raise KeyError(f"the step-time model has no coefficients for shape {load.shape}")
        c = self.coefficients[load.shape]
        return sum(ci * xi for ci, xi in zip(c, load.features(), strict=True))

    def predict(self, load: StepLoad) -> float:
        """Predicted seconds of a step with this load on this machine now."""
        return self.raw(load) * self.ratio

    def observe(self, load: StepLoad, seconds: float) -> None:
        """Fold one observed step time into the correction ratio."""
        predicted = self.predict(load)
        self.last = (predicted, seconds)
        self.observations += 1
        fitted = self.raw(load)
        if fitted <= 0 or seconds <= 0:
            return
        lo, hi = RATIO_CLAMP
        sample = math.log(min(hi, max(lo, seconds / fitted)))
        # EWMA in log space: a 2x slow step and a 2x fast one cancel out
        self._log_ratio += self.alpha * (sample - self._log_ratio)

    def covers(self, specs: Iterable[ShapeSpec]) -> list[str]:
        """Names of the shapes among `specs` the model has no coefficients for."""
        return [s.name for s in specs if s.name not in self.coefficients]

    # -- fitting and persistence -----------------------------------------------------------------

    @classmethod
    def fit(cls, samples: Iterable[Sample], alpha: float = 0.1) -> StepTimeModel:
        """Least squares on relative error per shape, coefficients kept non-negative."""
        by_shape: dict[str, list[Sample]] = {}
        for s in samples:
            by_shape.setdefault(s.load.shape, []).append(s)
        return cls({name: _fit_shape(group) for name, group in by_shape.items()}, alpha)

    @classmethod
    def prior(cls, specs: Iterable[ShapeSpec], alpha: float = 0.2) -> StepTimeModel:
        """A guess from weight fractions alone (a 135M model on 2 CPU cores); the ratio fixes it."""
        return cls(
            {
                s.name: (0.004 + 0.03 * s.weight_fraction, 0.002, 0.001 * s.weight_fraction, 1e-4)
                for s in specs
            },
            alpha,
        )

    def relative_errors(self, samples: Iterable[Sample]) -> list[float]:
        """|fitted - measured| / measured for each sample (no online correction)."""
        return [abs(self.raw(s.load) - s.seconds) / s.seconds for s in samples]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "coefficients": {k: list(v) for k, v in self.coefficients.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepTimeModel:
        return cls(d["coefficients"], float(d.get("alpha", 0.1)))


def error_summary(errors: Sequence[float]) -> dict[str, float]:
    """Median, 90th percentile and max of relative errors."""
    if not errors:
        return {"n": 0, "median": 0.0, "p90": 0.0, "max": 0.0}
    ordered = sorted(errors)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"n": len(ordered), "median": median(ordered), "p90": p90, "max": ordered[-1]}


def _fit_shape(samples: Sequence[Sample]) -> Coefficients:
    """Non-negative weighted least squares: drop the most negative feature until none is."""
    xs = [s.load.features() for s in samples]
    ys = [s.seconds for s in samples]
    active = [0, 1, 2, 3]
    while active:
        coef = _weighted_lstsq(xs, ys, active)
        negative = [j for j in active if coef[j] < 0]
        if not negative:
            return (coef[0], coef[1], coef[2], coef[3])
        active.remove(min(negative, key=lambda j: coef[j]))
    return (median(ys), 0.0, 0.0, 0.0)


def _weighted_lstsq(
    xs: Sequence[Coefficients], ys: Sequence[float], active: list[int]
) -> list[float]:
    """Minimise sum(((x . c - y) / y)^2) over the active features (normal equations)."""
    k = len(active)
    a = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for x, y in zip(xs, ys, strict=True):
        w = 1.0 / (y * y)  # relative error: a 2 ms step counts as much as a 200 ms one
        for i, fi in enumerate(active):
            b[i] += w * x[fi] * y
            for j, fj in enumerate(active):
                a[i][j] += w * x[fi] * x[fj]
    for i in range(k):
        a[i][i] += 1e-9 * a[i][i] + 1e-300  # keeps a collinear feature from blowing up
    solution = _solve(a, b)
    coef = [0.0] * 4
    for i, fi in enumerate(active):
        coef[fi] = solution[i]
    return coef


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting on a small dense system."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if m[col][col] == 0.0:
            continue
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        if m[r][r] == 0.0:
            continue
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
