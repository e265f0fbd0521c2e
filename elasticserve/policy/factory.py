"""Build a policy by name: over a grid and a step-time model, or for a loaded bundle's profile."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..model.bundle import ModelBundle
from ..model.shapes import ShapeSpec
from .base import Policy
from .fixed import FixedPolicy
from .latency_profile import LatencyProfile, load_profile
from .load import LoadPolicy
from .slo import SloPolicy
from .step_time import StepTimeModel
from .types import POLICIES, SLO, PolicyConfig


def make_policy(
    name: str,
    specs: Sequence[ShapeSpec],
    model: StepTimeModel | None = None,
    slo: SLO | None = None,
    config: PolicyConfig | None = None,
) -> Policy:
    """Build `fixed`, `load` or `slo` over the grid; the elastic ones need a step-time model."""
    if name == "fixed":
        return FixedPolicy(specs, model=model)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use {', '.join(POLICIES)}")
    model = model or StepTimeModel.prior(specs)
    if name == "load":
        return LoadPolicy(specs, model, config)
    return SloPolicy(specs, model, slo or SLO(), config)


def policy_for(
    bundle: ModelBundle,
    name: str,
    slo: SLO | None = None,
    pack_dir: str | os.PathLike[str] | None = None,
    config: PolicyConfig | None = None,
) -> tuple[Policy, LatencyProfile | None]:
    """The named policy over the bundle's grid, predicting from its stored profile if any.

    Without a profile the elastic policies start from `StepTimeModel.prior` and rely on the
    online correction; the caller should warn and suggest `elasticserve profile`.
    """
    found = load_profile(bundle, pack_dir)
    model = found.model() if found else StepTimeModel.prior(bundle.specs)
    return make_policy(name, bundle.specs, model, slo, config), found
