"""Held-out perplexity of any shape of a loaded model, through the elastic forward pass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.bundle import ModelBundle
from ..model.shapes import ShapeSpec
from ..model.step_plan import BlockPool, SeqChunk, build_step

MAX_WINDOW = 512
BATCH_TOKENS = 2048  # tokens per forward step: bounds the [T, vocab] fp32 logits to ~400 MB


def default_window(bundle: ModelBundle) -> int:
    """The context length or 512, whichever is smaller."""
    return min(bundle.max_model_len, MAX_WINDOW)


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows; a tail shorter than two tokens predicts nothing and is dropped."""
    out = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    return [w for w in out if len(w) >= 2]


BLOCK = 16  # cache block size of the native path's scratch cache


def _native_logits(
    bundle: ModelBundle, spec: ShapeSpec, batch: list[list[int]]
) -> tuple[torch.Tensor, list[slice]] | None:
    """The windows' logits through the native step (what serving runs: quantized shapes only
    run there), on a scratch paged cache; None where the native step does not serve `spec`."""
    native = bundle.native
    if native is None:
        return None
    cfg = bundle.config
    pool = BlockPool(BLOCK)
    chunks = [SeqChunk(spec, w, block_table=pool.table(spec, len(w)), logits="all") for w in batch]
    if not native.supports(chunks):
        return None
    cache = torch.zeros(pool.blocks * BLOCK, 2, cfg.num_kv_heads, cfg.head_dim)
    return native.forward(chunks, cache, BLOCK)


@torch.inference_mode()
def window_logits(
    bundle: ModelBundle, spec: ShapeSpec, batch: list[list[int]]
) -> tuple[torch.Tensor, list[slice]]:
    """Every position's logits [tokens, V] (fp32) of a batch of sequences at `spec`, and each
    sequence's rows: through the native step where it serves `spec`, else the torch step."""
    cfg = bundle.config
    native = _native_logits(bundle, spec, batch)
    if native is not None:
        return native
    if spec.shape.precision:
        raise ValueError(f"{spec.name}: q8/q4 shapes are evaluated in the native CPU kernels")
    chunks = [SeqChunk(spec, w, logits="all") for w in batch]
    step = build_step(
        chunks,
        cfg.num_layers,
        cfg.head_dim,
        2 * cfg.kv_size,
        16,
        bundle.biases,
        bundle.model.device,
    )
    return bundle.model.forward(step).float(), step.logit_slices


@torch.inference_mode()
def _window_nll(bundle: ModelBundle, spec: ShapeSpec, batch: list[list[int]]) -> float:
    """Summed next-token negative log-likelihood of a batch of windows."""
    logits, slices = window_logits(bundle, spec, batch)
    total = 0.0
    for w, rows in zip(batch, slices, strict=True):
        target = torch.tensor(w[1:], device=logits.device)
        total += F.cross_entropy(logits[rows][:-1], target, reduction="sum").item()
    return total


def perplexity(
    bundle: ModelBundle,
    spec: ShapeSpec | str,
    token_ids: list[int],
    window: int | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of `spec` over non-overlapping windows of `token_ids`."""
    spec = bundle.spec(spec) if isinstance(spec, str) else spec
    window = window or default_window(bundle)
    wins = windows(token_ids, window)
    if not wins:
        raise ValueError("need at least two tokens of evaluation text")
    per_step = max(1, BATCH_TOKENS // window)
    batches = [wins[i : i + per_step] for i in range(0, len(wins), per_step)]
    nll = 0.0
    for batch in tqdm(batches, desc=f"eval {spec.name}", disable=not progress, leave=False):
        nll += _window_nll(bundle, spec, batch)
    return math.exp(nll / sum(len(w) - 1 for w in wins))


def shape_report(
    bundle: ModelBundle,
    specs: list[ShapeSpec],
    token_ids: list[int],
    window: int | None = None,
) -> list[dict[str, object]]:
    """Perplexity and weight fraction of each shape: the rows `elasticserve eval --json` prints."""
    rows: list[dict[str, object]] = []
    for spec in tqdm(specs, desc="perplexity per shape", unit="shape"):
        ppl = perplexity(bundle, spec, token_ids, window)
        rows.append(
            {"shape": spec.name, "weight_fraction": round(spec.weight_fraction, 4), "ppl": ppl}
        )
    return rows


def _answer_logprobs(
    batch: list[tuple[list[int], list[int]]], logits: torch.Tensor, slices: list[slice]
) -> torch.Tensor:
    """Log-probs at the positions that predict each answer token: [answer tokens, V]."""
    rows = [
        logits[r][len(p) - 1 : len(p) + len(a) - 1] for (p, a), r in zip(batch, slices, strict=True)
    ]
    return torch.cat(rows).log_softmax(-1)


@torch.inference_mode()
def chat_report(
    bundle: ModelBundle,
    specs: list[ShapeSpec],
    conversations: list[tuple[list[int], list[int]]],
    progress: bool = False,
) -> list[dict[str, object]]:
    """Each shape against the full shape over the full shape's answers (teacher-forced): the
    mean KL(full || shape) per answer token and the share of answer positions where the two
    shapes' greedy tokens agree. `conversations` are (prompt ids, answer ids) pairs."""
    limit = bundle.max_model_len
    convs = [(p, a) for p, a in conversations if a and len(p) + len(a) <= limit]
    if not convs:
        raise ValueError(f"need at least one conversation with an answer, within {limit} tokens")
    batches: list[list[tuple[list[int], list[int]]]] = []
    batch: list[tuple[list[int], list[int]]] = []
    size = 0
    for p, a in convs:
        if batch and size + len(p) + len(a) > BATCH_TOKENS:
            batches.append(batch)
            batch, size = [], 0
        batch.append((p, a))
        size += len(p) + len(a)
    batches.append(batch)
    kl = {s.id: 0.0 for s in specs}
    agree = {s.id: 0 for s in specs}
    count = 0
    for batch in tqdm(batches, desc="chat eval", disable=not progress, leave=False):
        seqs = [p + a for p, a in batch]
        teacher = _answer_logprobs(batch, *window_logits(bundle, bundle.full, seqs))
        greedy = teacher.argmax(-1)
        count += len(teacher)
        for spec in specs:
            student = _answer_logprobs(batch, *window_logits(bundle, spec, seqs))
            kl[spec.id] += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
            agree[spec.id] += int((student.argmax(-1) == greedy).sum())
    return [
        {
            "shape": s.name,
            "weight_fraction": round(s.weight_fraction, 4),
            "chat_kl": kl[s.id] / count,
            "chat_agree": agree[s.id] / count,
        }
        for s in specs
    ]
