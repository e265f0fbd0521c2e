"""The latency profile: measured step times of every shape on one machine, and where they live.

A profile (measured by engine/profiler.py) is keyed by device (CPU model and threads, or GPU
name) and dtype, and stored beside the pack (`<pack>/latency-<device>-<dtype>.json`) or in the
user cache. The step-time model (step_time.py) is fitted on its samples. Unlike the rest of the
policy this module imports torch: it matches a profile to a loaded bundle's device and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model.bundle import ModelBundle, default_pack_path
from ..model.device import cpu_model
from ..model.shapes import ShapeSpec
from ..paths import cache_root
from .step_time import Sample, StepTimeModel, error_summary, predicted_latency

FORMAT_VERSION = 1


@dataclass
class LatencyProfile:
    """Step-time measurements of one model + pack on one device and dtype."""

    device: str
    dtype: str
    fingerprint: str  # the model's
    grid: str  # grid_key() of the pack's shapes
    samples: list[Sample]  # what the model is fitted on
    holdout: list[Sample]  # what it is checked against
    meta: dict[str, Any] = field(default_factory=dict)

    def model(self, alpha: float = 0.1) -> StepTimeModel:
        """The step-time model fitted on the samples."""
        return StepTimeModel.fit(self.samples, alpha)

    def errors(self) -> dict[str, dict[str, float]]:
        """Relative error of the fitted model on the held-out steps, uniform and mixed shapes."""
        model = self.model()
        return {
            kind: error_summary(model.relative_errors(s for s in self.holdout if s.kind == kind))
            for kind in ("uniform", "mixed")
        }

    def shape_latency(self, specs: Sequence[ShapeSpec]) -> dict[str, dict[str, float]]:
        """Each shape's predicted TTFT and TPOT alone on this machine (`/v1/shapes`), in ms."""
        return predicted_latency(self.model(), specs)

    def matches(self, bundle: ModelBundle) -> bool:
        """Measured for this model, pack grid, device and dtype."""
        return (
            self.fingerprint == bundle.pack.fingerprint
            and self.grid == grid_key(bundle.specs)
            and self.device == device_name(bundle.model.device)
            and self.dtype == dtype_name(bundle.model.dtype)
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format_version": FORMAT_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "grid": self.grid,
            "model": self.model().to_dict(),
            "errors": self.errors(),
            "meta": self.meta,
            "samples": [s.to_dict() for s in self.samples],
            "holdout": [s.to_dict() for s in self.holdout],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyProfile:
        """Read a profile written by `save`."""
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"latency profile {path} has format version {data.get('format_version')}, "
                f"this elasticserve reads version {FORMAT_VERSION}"
            )
        return cls(
            device=data["device"],
            dtype=data["dtype"],
            fingerprint=data["fingerprint"],
            grid=data["grid"],
            samples=[Sample.from_dict(s) for s in data["samples"]],
            holdout=[Sample.from_dict(s) for s in data["holdout"]],
            meta=dict(data.get("meta", {})),
        )


# -- keys and locations ---------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """What the timings depend on: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grid_key(specs: Sequence[ShapeSpec]) -> str:
    """A short hash of the shape grid (names, layers, per-layer widths): timings depend on it."""
    rows = [[s.name, list(s.layers), list(s.heads), list(s.mlp)] for s in specs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def profile_filename(bundle: ModelBundle) -> str:
    """`latency-<device>-<dtype>.json`, the device slugged."""
    device = re.sub(r"[^a-z0-9]+", "-", device_name(bundle.model.device).lower()).strip("-")
    return f"latency-{device}-{dtype_name(bundle.model.dtype)}.json"


def profile_path(bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `elasticserve profile` writes: beside a pack directory, else in the user cache.

    Never into the package's own packs/ (package data: a machine's timings must not ship).
    """
    if pack_dir is not None:
        return Path(pack_dir) / profile_filename(bundle)
    cache = cache_root() / "latency"
    key = f"{bundle.pack.fingerprint}-{grid_key(bundle.specs)}"
    return cache / key / profile_filename(bundle)


def profile_locations(
    bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Where a profile is searched: the pack dir, the built-in pack's, the user cache."""
    paths = [profile_path(bundle, pack_dir)] if pack_dir is not None else []
    if (default := default_pack_path(bundle.name)) is not None:
        paths.append(default / profile_filename(bundle))
    return [*paths, profile_path(bundle)]


def load_profile(
    bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None
) -> LatencyProfile | None:
    """The stored profile for this model, grid, device and dtype, if one was measured."""
    for path in profile_locations(bundle, pack_dir):
        if path.is_file():
            found = LatencyProfile.load(path)
            if found.matches(bundle):
                return found
    return None
