"""Prompt log-probs (vLLM's `prompt_logprobs`): each prompt token's log-prob given the tokens
before it, its rank, and the top-k alternatives, gathered chunk by chunk over a chunked prefill.

The logits at position p predict token p + 1, so a chunk over positions [start, start + n) gives
the entries of prompt tokens start + 1 .. start + n; the first prompt token has none (None). They
are the model's own distribution: no logit_bias, penalties or temperature (as vLLM). A request
that wants them never reads the prefix cache: a cached token has no logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .outputs import Logprob
from .request import Request


def wanted(req: Request, start: int, num_new_tokens: int) -> range:
    """The prompt tokens whose entries this chunk's logits give and `req` does not have yet."""
    got = req.prompt_logprobs
    if got is None:
        return range(0)
    last = min(start + num_new_tokens, req.seq.num_prompt_tokens - 1)
    return range(max(start + 1, len(got)), last + 1)


def record(
    requests: Sequence[tuple[Request, int, range]],
    logits: torch.Tensor,
    logit_slices: Sequence[slice],
) -> None:
    """Append to each (request, its chunk's start, wanted tokens) the entries of those tokens.

    `logit_slices[i]` are the rows of logits [N, V] of the i-th request's chunk, one per position.
    """
    for (req, start, tokens), rows in zip(requests, logit_slices, strict=True):
        if not tokens:
            continue
        got, k = req.prompt_logprobs, req.params.prompt_logprobs
        assert got is not None and k is not None and len(got) == tokens.start
        first = rows.start + tokens.start - 1 - start  # the row of position tokens.start - 1
        targets = req.seq.prompt_token_ids[tokens.start : tokens.stop]
        got += entries(logits[first : first + len(tokens)], targets, k)


def entries(logits: torch.Tensor, targets: list[int], k: int) -> list[dict[int, Logprob] | None]:
    """Per row of logits [M, V]: {token: Logprob} of its target token and of the k best."""
    logprobs = logits.float().log_softmax(dim=-1)  # [M, V]
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)  # [M]
    chosen = logprobs.gather(1, target[:, None])  # [M, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()  # [M]; 1 = the most likely
    out: list[dict[int, Logprob] | None] = []
    top_values: list[list[float]] = [[] for _ in targets]
    top_ids: list[list[int]] = [[] for _ in targets]
    if k > 0:
        top = logprobs.topk(k, dim=-1)  # [M, k], best first
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    for i, (token, logprob) in enumerate(zip(targets, chosen.squeeze(1).tolist(), strict=True)):
        entry = {token: Logprob(logprob, ranks[i])}  # the prompt's token first, as vLLM
        for rank, (t, value) in enumerate(zip(top_ids[i], top_values[i], strict=True), 1):
            entry.setdefault(t, Logprob(value, rank))
        out.append(entry)
    return out
