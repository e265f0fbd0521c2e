"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from elasticserve.model.bundle import load_bundle

from ..helpers import random_pack


@pytest.fixture(scope="session")
def peaked_bundle(tiny_llama_dir, tmp_path_factory):
    """The tiny model with 20x embeddings, so that its outputs are peaked (a random model's
    near-uniform outputs leave distillation almost nothing to fix), with a random pack."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(20)
    path = tmp_path_factory.mktemp("peaked")
    hf.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    base = load_bundle(path, dtype="float32")
    return load_bundle(path, pack=random_pack(base.pack, seed=7), dtype="float32")
