"""From a sampled token to a RequestOutput: log-probs, shape counts, text, stop strings.

Runs after `Scheduler.postprocess` has appended the token and ended the sequence at a stop token
or its length; the text delta the detokenizer emits goes into the output as it is.
"""

from __future__ import annotations

import dataclasses

from .outputs import CompletionOutput, RequestOutput, RequestSnapshot
from .request import Request, RequestGroup
from .sequence import SequenceStatus


def process_token(
    req: Request, token: int, logprob: float, top: list[tuple[int, float]] | None
) -> tuple[str, bool]:
    """Record one sampled token of `req`: (its text delta, whether it completed a stop string)."""
    req.cumulative_logprob += logprob
    if req.logprobs is not None:
        entry = {token: logprob}
        entry.update(dict(top or []))
        req.logprobs.append(entry)
    name = req.spec.name
    req.shape_tokens[name] = req.shape_tokens.get(name, 0) + 1
    if req.narrowest is None or req.spec.weight_fraction < req.narrowest.weight_fraction:
        req.narrowest = req.spec
    seq, delta, stop_string = req.seq, "", False
    if seq.status is SequenceStatus.FINISHED_STOPPED:  # a stop token never reaches the text
        req.finish_reason = "stop"
        req.stop_reason = token if token in (req.params.stop_token_ids or ()) else None
    else:
        delta, stop = req.detokenizer.add(token)
        if stop is not None:  # the detokenizer has already cut the text at the stop string
            # it outranks the length limit the same token may have reached
            req.finish_reason, req.stop_reason, stop_string = "stop", stop, True
        elif seq.status is SequenceStatus.FINISHED_LENGTH:
            req.finish_reason = "length"
    if req.finish_reason is not None:
        delta += req.detokenizer.flush()
    return delta, stop_string


def completion_output(req: Request, text_delta: str) -> CompletionOutput:
    """One sequence's choice after its latest token; its token and log-prob lists not copied."""
    seq = req.seq
    return CompletionOutput(
        index=req.index,
        text=req.detokenizer.text,
        token_ids=seq.output_token_ids,
        cumulative_logprob=req.cumulative_logprob,
        logprobs=req.logprobs,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        text_delta=text_delta,
        num_tokens=seq.num_output_tokens,
    )


def request_output(req: Request, text_delta: str) -> RequestOutput:
    """The request's output after its latest token; its token and log-prob lists are not copied."""
    seq = req.seq
    narrowest = req.narrowest or req.spec
    return RequestOutput(
        request_id=seq.seq_id,
        prompt=req.prompt,
        prompt_token_ids=seq.prompt_token_ids,
        outputs=[completion_output(req, text_delta)],
        finished=req.finish_reason is not None,
        shape=req.spec.name,
        narrowest_shape=narrowest.name,
        shape_tokens=dict(req.shape_tokens),
        num_cached_tokens=seq.num_cached_tokens,
        prompt_logprobs=req.prompt_logprobs,
    )


def group_output(group: RequestGroup) -> RequestOutput:
    """A parallel-sampling request's output: a choice per member, each with its own text delta.

    Once every member finished, best_of > n keeps the n of highest cumulative log-prob,
    re-indexed in that order (vLLM's ranking).
    """
    members = group.members
    finished = group.finished
    deltas, group.deltas = group.deltas, {}
    choices = [completion_output(m, deltas.get(m.index, "")) for m in members]
    if finished and group.size > group.n:
        best = sorted(choices, key=lambda c: -(c.cumulative_logprob or 0.0))[: group.n]
        choices = [dataclasses.replace(c, index=i) for i, c in enumerate(best)]
    parent = members[0]
    narrowest = min((m.narrowest or m.spec for m in members), key=lambda spec: spec.weight_fraction)
    shape_tokens: dict[str, int] = {}
    for m in members:
        for name, count in m.shape_tokens.items():
            shape_tokens[name] = shape_tokens.get(name, 0) + count
    return RequestOutput(
        request_id=group.request_id,
        prompt=parent.prompt,
        prompt_token_ids=parent.seq.prompt_token_ids,
        outputs=choices,
        finished=finished,
        shape=max(members, key=lambda m: m.seq.num_output_tokens).spec.name,
        narrowest_shape=narrowest.name,
        shape_tokens=shape_tokens,
        num_cached_tokens=parent.seq.num_cached_tokens,
        prompt_logprobs=parent.prompt_logprobs,
    )


def snapshot(req: Request) -> RequestSnapshot:
    """The caller-facing view of an unfinished request."""
    running = req.seq.status is SequenceStatus.RUNNING
    return RequestSnapshot(req.prompt, req.seq.prompt_token_ids, req.spec, running)
