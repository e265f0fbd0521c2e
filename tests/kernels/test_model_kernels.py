"""The model with the Triton kernels switched on equals the torch path (CPU: interpreter)."""

from __future__ import annotations

import os

import pytest

from elasticserve.model.bundle import load_bundle

from ..helpers import prefill_logits, random_pack

pytestmark = pytest.mark.skipif(
    not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)


def test_mixed_shape_step_with_kernels_equals_torch_path(tiny_llama_dir, tokenizer):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    bundle = load_bundle(tiny_llama_dir, pack=random_pack(base.pack, seed=2), dtype="float32")
    prompts = [
        tokenizer(t)["input_ids"] for t in ["Persuasion, by Jane Austen", "Chapter 1", "Sir"]
    ]
    specs = [bundle.spec(s) for s in ["full", "d5-w0.75", "d3-w0.5"]]
    torch_path = prefill_logits(bundle, prompts, specs)
    kernel_path = prefill_logits(bundle, prompts, specs, kernels=True)
    for a, b in zip(torch_path, kernel_path, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
