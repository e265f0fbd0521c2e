"""Text for calibration and evaluation: read files or directories of .txt, tokenize, cut windows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

PathLike = str | os.PathLike[str]


def text_files(paths: Sequence[PathLike]) -> list[Path]:
    """Expand files and directories (their .txt files, sorted) into a list of files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"no .txt files in directory {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data path does not exist: {path}")
    if not files:
        raise ValueError("no data given: pass text files or a directory of .txt files")
    return files


def load_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    paths: Sequence[PathLike],
    max_tokens: int | None = None,
    exclude: Sequence[str] = (),
) -> list[int]:
    """Token ids of the files' texts, concatenated in order (files named in `exclude` skipped)."""
    ids: list[int] = []
    for file in text_files(paths):
        if file.name in exclude:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        # encode paragraph blocks: one giant string makes some tokenizers slow and noisy
        for start in range(0, len(text), 100_000):
            ids += tokenizer.encode(text[start : start + 100_000], add_special_tokens=False)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def sample_windows(ids: list[int], count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens spread evenly over `ids`: [count, length]."""
    if len(ids) < length:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, fewer than one window ({length})"
        )
    count = min(count, len(ids) // length)
    stride = (len(ids) - length) // max(1, count - 1) if count > 1 else 0
    rows = [ids[i * stride : i * stride + length] for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)
