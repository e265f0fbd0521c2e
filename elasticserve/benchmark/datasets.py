"""Benchmark prompts: random common words, passages cut from the user's text (`austen`), or the
prompts of a ShareGPT-like JSON / JSONL file (`sharegpt`)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np

DEFAULT_AUSTEN_DIR = Path("..") / "shared" / "corpus" / "austen"
# Measured with the SmolLM2 tokenizer: Austen's prose is ~1.25 tokens per word.
AUSTEN_WORDS_PER_TOKEN = 0.8
# Each of these is a single token (with its leading space) in common BPE vocabularies.
_COMMON_WORDS = (
    "the of and to in is was for on that with as by at from his her it be are this had not but "
    "one all which have were they when there an their been has more if will would who so about "
    "into out up time some what only other new can could them than then now like over such make "
    "well year back where just most any very after way also made many before see first may these "
    "our good long still own two"
)
COMMON_WORDS = _COMMON_WORDS.split()
DATASETS = ("random", "austen", "sharegpt")


def text_files(data: str | Path | None) -> list[Path]:
    """The text files of `--data` (a file or a directory of .txt files), or the default corpus."""
    if data is None:
        if not DEFAULT_AUSTEN_DIR.is_dir():
            raise FileNotFoundError(
                f"--dataset austen needs text: pass --data FILE_OR_DIR "
                f"(no {DEFAULT_AUSTEN_DIR} relative to {Path.cwd()})"
            )
        data = DEFAULT_AUSTEN_DIR
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--data {str(data)!r}: no such file or directory")
    files = sorted(path.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"--data {str(data)!r}: the directory holds no .txt files")
    return files


def austen_prompts(files: list[Path], num: int, input_len: int, seed: int) -> list[str]:
    """`num` passages of about `input_len` tokens, cut at seeded random places from `files`."""
    words = " ".join(f.read_text(encoding="utf-8") for f in files).split()
    length = max(1, round(input_len * AUSTEN_WORDS_PER_TOKEN))
    if len(words) < length:
        raise ValueError(f"--data holds {len(words)} words, fewer than one prompt needs ({length})")
    starts = np.random.default_rng(seed).integers(0, len(words) - length + 1, size=num)
    return [" ".join(words[s : s + length]) for s in starts]


def random_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """`num` prompts of `input_len` seeded random common words (about one token each)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(COMMON_WORDS), size=(num, input_len))
    return [" ".join(COMMON_WORDS[i] for i in row) for row in picks]


def _record_prompt(record: object) -> str | None:
    # ShareGPT: the first human turn of `conversations`; OpenAI: the first user message;
    # else a plain `prompt` or `text` field.
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            return str(turn.get("value", ""))
    for message in record.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    for key in ("prompt", "text"):
        if isinstance(record.get(key), str):
            return str(record[key])
    return None


def file_prompts(data: str | Path | None, num: int, seed: int) -> list[str]:
    """`num` prompts drawn (seeded, with replacement past the file's count) from a JSON/JSONL file.

    A record is a ShareGPT conversation (`conversations`, first human turn), an OpenAI chat
    (`messages`, first user message), an object with `prompt` or `text`, or a string.
    """
    if data is None:
        raise FileNotFoundError("--dataset sharegpt needs --data FILE (.json or .jsonl)")
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(data)!r}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"--data {str(data)!r}: not JSON or JSONL ({exc})") from None
    prompts = [p for p in map(_record_prompt, records) if p and p.strip()]
    if not prompts:
        raise ValueError(
            f"--data {str(data)!r}: no record has a prompt (conversations, messages, prompt, text)"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(prompts))
    picks = order[:num] if num <= len(prompts) else rng.integers(0, len(prompts), size=num)
    return [prompts[i] for i in picks]


def with_unique_prefixes(prompts: list[str], nonce: str | None = None) -> list[str]:
    """Prefix each prompt with `[<nonce>-<index>]` so no two share a cacheable prefix."""
    # The nonce is fresh per run by default: a sweep re-sends the same bodies to the same server,
    # and a prefix cache warmed by the previous rate would otherwise report fake TTFTs.
    nonce = secrets.token_hex(4) if nonce is None else nonce
    return [f"[{nonce}-{i}] {p}" for i, p in enumerate(prompts)]


def prompt_bodies(
    dataset: str, data: str | Path | None, num: int, input_len: int, seed: int
) -> list[str]:
    """Seeded prompt bodies of `dataset`; give each run fresh prefixes with_unique_prefixes."""
    if input_len < 1 or num < 1:
        raise ValueError(f"--input-len ({input_len}) and --num-prompts ({num}) must be >= 1")
    if dataset == "austen":
        return austen_prompts(text_files(data), num, input_len, seed)
    if dataset == "random":
        return random_prompts(num, input_len, seed)
    if dataset == "sharegpt":
        return file_prompts(data, num, seed)  # the file's own lengths: --input-len is not used
    raise ValueError(f"--dataset {dataset!r}: choose {', '.join(DATASETS)}")
