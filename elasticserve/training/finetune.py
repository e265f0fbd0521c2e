"""One fine-tuning run that lifts every shape: SMoL experts trained by in-place distillation.

Each step is AmoebaLLM's sandwich: the full shape (the frozen base model; no adapter) gives the
language-model loss and the teacher logits; the smallest shape and a few random ones are distilled
from them with soft cross-entropy. Each student's loss is rescaled to the full shape's magnitude
(`loss · loss_ref / loss.detach()`) so no shape's gradient dominates; gradients are clipped, the
learning rate follows warmup + cosine. Checkpoints (every `checkpoint_every` steps, and on Ctrl-C)
resume bit-for-bit: batches and shape draws are seeded by the step number.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..model.adapters import LoraConfig, LoraExperts, save_adapters
from ..model.bundle import ModelBundle
from ..model.shape_forward import shape_logits, window_nll
from ..model.shapes import ShapeSpec


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one run."""

    steps: int = 200
    lr: float = 1e-3
    gate_lr_ratio: float = (
        0.1  # the gate learns slower: at full lr routing collapses onto 2 experts
    )
    warmup: int | None = None  # default: 5% of the steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    lora: LoraConfig = field(default_factory=LoraConfig)
    seq_len: int = 256
    batch: int = 4
    random_shapes: int = 2  # besides the smallest shape, per step
    clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 2048
    checkpoint_every: int = 25
    seed: int = 0
    chat_share: float = 0.0  # share of each batch's windows drawn from the chat stream
    adapter_dtype: str = "float32"  # how the experts are stored in the pack (bfloat16: half)


@dataclass
class FinetuneResult:
    experts: LoraExperts
    start_step: int  # 0, or the step a resumed run started from
    steps: int  # steps done in all, counting resumed ones
    history: list[dict[str, object]]  # one entry per evaluation


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_batch(ids: Tensor, batch: int, seq_len: int, seed: int) -> Tensor:
    """`batch` random windows [batch, seq_len] of the token stream `ids`, fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (batch,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def sandwich(specs: list[ShapeSpec], random_shapes: int, seed: int) -> list[ShapeSpec]:
    """The students of one step: the smallest shape, then `random_shapes` others (not full)."""
    smallest = min(specs, key=lambda s: s.weight_fraction)
    middle = [s for s in specs[1:] if s.id != smallest.id]
    picked = random.Random(seed).sample(middle, min(random_shapes, len(middle)))
    return [smallest, *picked]


def soft_cross_entropy(student: Tensor, teacher_probs: Tensor) -> Tensor:
    """Mean over tokens of -Σ p_teacher · log p_student: the distillation loss."""
    # student [B, S, V] logits ; teacher_probs [B, S, V]
    return -(teacher_probs * F.log_softmax(student, dim=-1)).sum(-1).mean()


def train_step(
    bundle: ModelBundle, experts: LoraExperts, ids: Tensor, students: list[ShapeSpec]
) -> dict[str, float]:
    """Forward and backward one sandwich; returns each loss (gradients left in `experts`)."""
    model, biases = bundle.model, bundle.biases
    with torch.no_grad(), _autocast(model.dtype, ids.device):
        teacher = shape_logits(model, bundle.full, ids, biases)  # [B, S, V]
        lm = F.cross_entropy(teacher[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        probs = teacher.softmax(-1)
    del teacher
    losses = {"lm": lm.item()}
    for spec in students:
        with _autocast(model.dtype, ids.device):
            logits = shape_logits(model, spec, ids, biases, experts.mixture(spec))
            loss = soft_cross_entropy(logits, probs)
        (loss * lm / loss.detach()).backward()  # loss-magnitude balancing
        losses[spec.name] = loss.item()
    return losses


def evaluate(
    bundle: ModelBundle, experts: LoraExperts, ids: Tensor, specs: list[ShapeSpec], seq_len: int
) -> dict[str, float]:
    """Held-out perplexity of each shape (with its adapter) on windows of `ids`."""
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # [N, S]
    out = {}
    for spec in specs:
        nll, count = 0.0, 0
        with torch.no_grad():
            adapters = experts.mixture(spec)
        for chunk in windows.split(4):
            with _autocast(bundle.model.dtype, ids.device):
                n, c = window_nll(bundle.model, spec, chunk, bundle.biases, adapters)
            nll, count = nll + n, count + c
        out[spec.name] = math.exp(nll / count)
    return out


def _autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on CPU only over 16-bit weights (fp32 experts meet them)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


def finetune(
    bundle: ModelBundle,
    train_ids: list[int],
    eval_ids: list[int],
    out: str | os.PathLike[str],
    config: FinetuneConfig,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    meta: dict[str, object] | None = None,
    progress: bool = True,
    chat_ids: list[int] | None = None,
) -> FinetuneResult:
    """Train the shape-aware LoRA mixture of `bundle`'s pack and write pack + adapters to `out`.

    `chat_ids` (the conversations of a distillation set, `training.chat.chat_stream`) supply
    `config.chat_share` of every batch's windows; `train_ids` the rest.
    """
    device = bundle.model.device
    if len(train_ids) < config.seq_len + 1:
        raise ValueError(f"training text has {len(train_ids)} tokens, fewer than one window")
    chat_rows = round(config.batch * config.chat_share) if chat_ids else 0
    if chat_rows and len(chat_ids or []) < config.seq_len + 1:
        raise ValueError(f"the chat data has {len(chat_ids or [])} tokens, fewer than one window")
    ids = torch.tensor(train_ids, dtype=torch.long, device=device)
    chat = torch.tensor(chat_ids or [], dtype=torch.long, device=device)
    held_out = torch.tensor(eval_ids[: config.eval_tokens], dtype=torch.long, device=device)
    torch.manual_seed(config.seed)
    # the dense shapes are the students: a q8/q4 shape takes its dense sibling's adapter (the gate
    # sees layers and widths only) and the torch forward of training has no quantized weights
    dense = [s for s in bundle.specs if not s.shape.precision]
    experts = LoraExperts(bundle.config, bundle.pack.widths, config.lora, dense).to(device)
    opt, sched = _optimizer(experts, config)
    ckpt = Path(checkpoint) if checkpoint else Path(f"{out}.ckpt.pt")
    state = _load_checkpoint(ckpt, experts, opt, sched, config) if resume else None
    start, history = (state["step"], state["history"]) if state else (0, [])
    done = start

    def log_eval() -> None:
        if len(held_out) > config.seq_len:  # at least one full window of held-out text
            ppl = evaluate(bundle, experts, held_out, _eval_specs(dense), config.seq_len)
            history.append({"step": done, **ppl})
            text = ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
            tqdm.write(f"step {done}: held-out ppl {text}")

    if not history:
        log_eval()  # the baseline: calibration only
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress)
    try:
        for step in bar:
            batch_seed = config.seed * 1_000_003 + step
            rows = []
            if config.batch > chat_rows:
                rows.append(sample_batch(ids, config.batch - chat_rows, config.seq_len, batch_seed))
            if chat_rows:
                rows.append(sample_batch(chat, chat_rows, config.seq_len, batch_seed + 1))
            batch = torch.cat(rows)
            students = sandwich(dense, config.random_shapes, config.seed + step)
            losses = train_step(bundle, experts, batch, students)
            torch.nn.utils.clip_grad_norm_(experts.parameters(), config.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
            if config.eval_every and done % config.eval_every == 0:
                log_eval()
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save_checkpoint(ckpt, experts, opt, sched, config, done, history)
    except KeyboardInterrupt:
        _save_checkpoint(ckpt, experts, opt, sched, config, done, history)
        raise
    run_meta = {**(meta or {}), "steps": done, "config": asdict(config), "history": history}
    write_pack(bundle, experts, out, run_meta, getattr(torch, config.adapter_dtype))
    return FinetuneResult(experts, start, done, history)


def _optimizer(
    experts: LoraExperts, config: FinetuneConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (the gate at a fraction of the experts' lr) under warmup + cosine."""
    groups = [
        {"params": [*experts.a.values(), *experts.b.values()], "lr": config.lr},
        {"params": list(experts.gate.parameters()), "lr": config.lr * config.gate_lr_ratio},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = config.warmup if config.warmup is not None else max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, config.steps, warmup, config.min_lr_ratio)
    )
    return opt, sched


def _eval_specs(specs: list[ShapeSpec]) -> list[ShapeSpec]:
    """The middle of the grid and the smallest shape (full has no adapter: it never changes)."""
    smallest = min(specs, key=lambda s: s.weight_fraction)
    middle = specs[len(specs) // 2]
    return list({s.id: s for s in (middle, smallest)}.values())


def write_pack(
    bundle: ModelBundle,
    experts: LoraExperts,
    out: str | os.PathLike[str],
    meta: dict[str, object],
    dtype: torch.dtype = torch.float32,
) -> None:
    """The input pack plus the adapters, written to a temp dir and renamed over `out`."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    bundle.pack.save(tmp)
    save_adapters(experts, tmp, meta, dtype)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _save_checkpoint(
    path: Path,
    experts: LoraExperts,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    config: FinetuneConfig,
    step: int,
    history: list[dict[str, object]],
) -> None:
    """Everything a resumed run needs; written to a temp file and renamed (atomic)."""
    state = {
        "step": step,
        "experts": experts.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "lora": asdict(config.lora),
        "history": history,
        "saved_at": time.time(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path,
    experts: LoraExperts,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    config: FinetuneConfig,
) -> dict | None:
    """Restore a checkpoint into the run's objects; None (start afresh) if there is none."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=next(experts.parameters()).device, weights_only=True)
    if state["lora"] != asdict(config.lora):
        raise ValueError(
            f"checkpoint {path} has adapters {state['lora']}, this run asks for "
            f"{asdict(config.lora)}: pass the same --rank/--experts or start without --resume"
        )
    experts.load_state_dict(state["experts"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state
