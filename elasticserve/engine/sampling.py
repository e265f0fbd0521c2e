"""Sampling parameters (vLLM's subset) and the batched sampler that picks each row's next token."""

import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from .guided import Guide, GuidedDecodingParams, allocate_bitmask, bitmask_to_additive

_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a smaller temperature is greedy
_MAX_LOGPROBS = 20
_MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
# top-p first looks for its nucleus among this many best tokens (a cheap topk); it sorts the
# whole vocab only when they hold less than p of the mass (a 49k-token CPU sort costs ~3 ms).
_NUCLEUS_CANDIDATES = 256


@dataclass
class SamplingParams:
    """vLLM's SamplingParams subset (same names, same defaults)."""

    n: int = 1  # choices returned
    best_of: int | None = None  # sequences sampled, the n of highest cumulative log-prob returned
    max_tokens: int | None = 16  # None: up to the context length (the engine resolves it)
    min_tokens: int = 0
    temperature: float = 1.0  # below 1e-5: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables (stored as 0)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log-probs per token; 0 = only the chosen token's
    prompt_logprobs: int | None = None  # top-n per prompt token (+ the token itself); None: off
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_decoding: GuidedDecodingParams | None = None  # structured output (engine/guided.py)

    def __post_init__(self) -> None:
        if not isinstance(self.stop, str | list | tuple | None):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _validate(self)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def num_sequences(self) -> int:
        """Sequences sampled for the request: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax (vLLM treats tiny temperatures as 0)."""
        return self.temperature < _GREEDY_EPS


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _require(ok: bool, field: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {rule}, got {value!r}")


def _validate(p: SamplingParams) -> None:
    """Raise ValueError naming the first field outside vLLM's accepted range."""
    _require(_is_int(p.n) and p.n >= 1, "n", p.n, "an integer >= 1")
    if p.best_of is not None:
        rule = f"an integer >= n ({p.n})"
        _require(_is_int(p.best_of) and p.best_of >= p.n, "best_of", p.best_of, rule)
    max_ok = p.max_tokens is None or (_is_int(p.max_tokens) and p.max_tokens >= 1)
    _require(max_ok, "max_tokens", p.max_tokens, "an integer >= 1 or None")
    _require(_is_int(p.min_tokens) and p.min_tokens >= 0, "min_tokens", p.min_tokens, ">= 0")
    if p.max_tokens is not None:
        rule = f"<= max_tokens ({p.max_tokens})"
        _require(p.min_tokens <= p.max_tokens, "min_tokens", p.min_tokens, rule)
    _require(_is_real(p.temperature) and p.temperature >= 0, "temperature", p.temperature, ">= 0")
    _require(_is_real(p.top_p) and 0 < p.top_p <= 1, "top_p", p.top_p, "in (0, 1]")
    top_k_ok = _is_int(p.top_k) and p.top_k >= -1
    _require(top_k_ok, "top_k", p.top_k, "an integer >= 0 (or -1 to disable)")
    _require(_is_real(p.min_p) and 0 <= p.min_p <= 1, "min_p", p.min_p, "in [0, 1]")
    for field in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, field)
        _require(_is_real(value) and -2 <= value <= 2, field, value, "in [-2, 2]")
    rep = p.repetition_penalty
    _require(_is_real(rep) and rep > 0, "repetition_penalty", rep, "> 0")
    seed_ok = p.seed is None or (_is_int(p.seed) and -(2**63) <= p.seed < 2**64)
    _require(seed_ok, "seed", p.seed, "None or an integer in [-2**63, 2**64)")
    logprobs_ok = p.logprobs is None or (_is_int(p.logprobs) and 0 <= p.logprobs <= _MAX_LOGPROBS)
    _require(logprobs_ok, "logprobs", p.logprobs, f"None or an integer in [0, {_MAX_LOGPROBS}]")
    prompt_ok = p.prompt_logprobs is None or (
        _is_int(p.prompt_logprobs) and 0 <= p.prompt_logprobs <= _MAX_LOGPROBS
    )
    rule = f"None or an integer in [0, {_MAX_LOGPROBS}]"
    _require(prompt_ok, "prompt_logprobs", p.prompt_logprobs, rule)
    _require(isinstance(p.logit_bias, dict | None), "logit_bias", p.logit_bias, "a dict")
    for token, bias in (p.logit_bias or {}).items():
        _require(_is_int(token) and token >= 0, "logit_bias", token, "keyed by token ids >= 0")
        in_range = _is_real(bias) and abs(bias) <= _MAX_LOGIT_BIAS
        rule = f"valued in [-{_MAX_LOGIT_BIAS:g}, {_MAX_LOGIT_BIAS:g}] (token {token})"
        _require(in_range, "logit_bias", bias, rule)
    for s in p.stop or []:
        _require(isinstance(s, str) and s != "", "stop", s, "a non-empty string")
    for t in p.stop_token_ids or []:
        _require(_is_int(t) and t >= 0, "stop_token_ids", t, "a list of token ids >= 0")


@dataclass
class SamplerOutput:
    """One token per row, with log-probs under the model's distribution plus the row's logit_bias
    (penalties, min_tokens, filters and grammars are not in them)."""

    token_ids: list[int]  # [B]
    logprobs: list[float]  # [B] log-prob of the chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # [B] best-first top-n, None if not asked


class Sampler:
    """Picks each row's next token: logit_bias, penalties, min_tokens, then greedy or filtered
    sampling."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_ids: AbstractSet[int],
        guides: Sequence[Guide | None] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of logits [B, V]; seeded rows draw only from their generator.

        A row with a guide samples only the tokens its grammar allows next; a row's logit_bias
        shifts its own logits only, before everything else (its log-probs included, as OpenAI).
        """
        batch = logits.shape[0]
        assert logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}"
        lengths = {len(params), len(generators), len(prompt_token_ids), len(output_token_ids)}
        assert lengths == {batch}, f"per-row lists must all have {batch} entries, got {lengths}"
        raw = _add_logit_bias(logits.float(), params)  # [B, V]; the input is never written
        processed = _penalise_and_mask(
            raw, params, prompt_token_ids, output_token_ids, eos_token_ids
        )
        if guides is not None and any(g is not None for g in guides):
            assert len(guides) == batch, f"guides must have {batch} entries, got {len(guides)}"
            processed = _apply_guides(raw, processed, guides, output_token_ids)
        tokens = _pick(processed, params, generators)  # [B]
        return _report(raw, tokens, params)


def _add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's logit_bias added to its logits; returns logits itself when no row has one."""
    # logits: [B, V]; fp32 logits may be the caller's own tensor, so a biased batch is a copy
    biased = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not biased:
        return logits
    vocab = logits.shape[1]
    out = logits.clone()
    for i, bias in biased:
        ids = [t for t in bias if t < vocab]  # the engine refuses the others at admission
        index = torch.tensor(ids, dtype=torch.long, device=logits.device)
        values = torch.tensor([bias[t] for t in ids], dtype=logits.dtype, device=logits.device)
        out[i].index_add_(0, index, values)
    return out


def _penalise_and_mask(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    eos_token_ids: AbstractSet[int],
) -> torch.Tensor:
    """Apply penalties and min_tokens bans; returns logits itself when no row needs either."""
    penalised = [i for i, p in enumerate(params) if _has_penalty(p)]
    banned = {
        i: _min_tokens_bans(p, eos_token_ids)
        for i, p in enumerate(params)
        if len(output_token_ids[i]) < p.min_tokens
    }
    if not penalised and not banned:
        return logits
    logits = logits.clone()  # [B, V]; the raw copy stays intact for the reported log-probs
    if penalised:
        rows = torch.tensor(penalised, device=logits.device)
        logits[rows] = _apply_penalties(
            logits[rows],
            [params[i] for i in penalised],
            [prompt_token_ids[i] for i in penalised],
            [output_token_ids[i] for i in penalised],
        )
    vocab = logits.shape[1]
    for i, ids in banned.items():
        logits[i, [t for t in ids if t < vocab]] = -math.inf
    return logits


def _apply_guides(
    raw: torch.Tensor,
    logits: torch.Tensor,
    guides: Sequence[Guide | None],
    output_token_ids: list[list[int]],
) -> torch.Tensor:
    """Mask out of each guided row the tokens its grammar forbids next."""
    # raw, logits: [B, V]; logits may be raw itself, which must stay intact for the log-probs
    rows = [i for i, g in enumerate(guides) if g is not None]
    vocab = logits.shape[1]
    bitmask = allocate_bitmask(logits.shape[0], vocab)  # [B, ceil(V / 32)]; unguided rows allow all
    for i in rows:
        guide = guides[i]
        assert guide is not None
        guide.fill_mask(output_token_ids[i], bitmask, i)
    additive = bitmask_to_additive(bitmask.to(logits.device), vocab)  # [B, V]: 0 or -inf
    out = logits + additive  # a new tensor: an unguided row gains exact zeros
    # min_tokens may ban the only tokens the grammar allows (its end): the grammar wins
    dead = [i for i in (out.amax(dim=-1) == -math.inf).nonzero().flatten().tolist() if i in rows]
    if dead:
        out[dead] = raw[dead] + additive[dead]
    return out


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _min_tokens_bans(p: SamplingParams, eos_token_ids: AbstractSet[int]) -> list[int]:
    """Tokens that would end the request: stop_token_ids, and eos unless it cannot stop it."""
    return sorted(set(p.stop_token_ids or []) | (set() if p.ignore_eos else eos_token_ids))


def _apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
) -> torch.Tensor:
    """HF/vLLM repetition penalty over prompt+output, OpenAI presence/frequency over output."""
    # logits: [R, V]
    vocab, device = logits.shape[1], logits.device
    counts = _token_counts(output_token_ids, vocab, device)  # [R, V]
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # [R, 1]
    if bool((rep != 1.0).any()):
        seen = (counts > 0) | (_token_counts(prompt_token_ids, vocab, device) > 0)  # [R, V]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]  # [R, 1]
    pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]  # [R, 1]
    return logits - freq * counts - pres * (counts > 0)


def _token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] occurrences of each token id in each row's list."""
    width = max((len(ids) for ids in token_ids), default=0)
    # Padding and out-of-vocab ids land in an extra column that is dropped.
    rows = [ids + [vocab] * (width - len(ids)) for ids in token_ids]
    padded = torch.tensor(rows, dtype=torch.long, device=device).clamp_(0, vocab)  # [R, L]
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _pick(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[B] argmax for greedy rows, a filtered random draw for the others."""
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled:
        return logits.argmax(dim=-1)
    if len(sampled) == len(params):
        return _sample(logits, params, generators)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)  # [B]
    rows = torch.tensor(greedy, device=logits.device)
    tokens[rows] = logits[rows].argmax(dim=-1)
    rows = torch.tensor(sampled, device=logits.device)
    tokens[rows] = _sample(
        logits[rows], [params[i] for i in sampled], [generators[i] for i in sampled]
    )
    return tokens


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """[S] draws after temperature, top-k, top-p and min-p (Gumbel-max, one race per row)."""
    # logits: [S, V]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    x = logits / temperature[:, None]  # [S, V], a fresh tensor
    threshold = _keep_threshold(x, params)  # [S] or None
    if threshold is not None:
        x.masked_fill_(x < threshold[:, None], -math.inf)
    return (x + _gumbel_noise(x, generators)).argmax(dim=-1)


def _keep_threshold(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor | None:
    """[S] lowest logit each row keeps under top-k, top-p and min-p; None if no row filters."""
    # x: [S, V]
    device = x.device
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    threshold = None
    if bool((top_k > 0).any() or (top_p < 1).any()):
        threshold = _top_k_top_p_threshold(x, top_k, top_p)
    if any(p.min_p > 0 for p in params):
        # min-p keeps p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p): no softmax
        # needed, and the same whether applied before or after top-k/top-p (the max stays).
        min_p = torch.tensor([p.min_p for p in params], device=device)
        min_p_threshold = x.amax(dim=-1) + min_p.log()  # log(0) = -inf keeps everything
        threshold = min_p_threshold if threshold is None else threshold.maximum(min_p_threshold)
    return threshold


def _top_k_top_p_threshold(
    x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[S] logit threshold of top-k, then top-p over what top-k kept (ties kept, as vLLM)."""
    # x: [S, V]; top_k: [S] (0 = off); top_p: [S] (1 = off)
    vocab = x.shape[1]
    has_k = (top_k > 0) & (top_k < vocab)
    k = torch.where(has_k, top_k, vocab)  # [S]
    # A top-k row's nucleus lies inside its k best; a top-p-only row tries the candidates first.
    need = torch.where(has_k, k, torch.where(top_p < 1, _NUCLEUS_CANDIDATES, 1))
    width = min(vocab, int(need.max()))
    full_total = x.logsumexp(dim=-1)  # [S]
    while True:
        values = x.topk(width, dim=-1).values  # [S, W], best first
        kth = values.gather(1, (k.clamp(max=width) - 1)[:, None]).squeeze(1)  # [S]
        k_threshold = torch.where(has_k, kth, -math.inf)
        values = values.masked_fill(values < k_threshold[:, None], -math.inf)
        # top-p measures mass within what top-k kept (vLLM, HF), else within the whole vocab
        total = torch.where(has_k, values.logsumexp(dim=-1), full_total)  # [S]
        probs = (values - total[:, None]).exp()  # [S, W]
        cumulative = probs.cumsum(dim=-1)
        covered = has_k | (top_p >= 1) | (cumulative[:, -1] >= top_p)
        if width == vocab or bool(covered.all()):
            break
        width = vocab
    # A token is in the nucleus when the mass before it is still below p (so the best always is).
    n_keep = ((cumulative - probs) < top_p[:, None]).sum(dim=-1).clamp(min=1)  # [S]
    p_threshold = values.gather(1, (n_keep - 1)[:, None]).squeeze(1)
    p_threshold = torch.where(top_p < 1, p_threshold, -math.inf)
    return k_threshold.maximum(p_threshold)


def _gumbel_noise(x: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """[S, V] Gumbel(0, 1) noise; argmax(logits + noise) samples softmax(logits)."""
    uniform = torch.empty_like(x)  # [S, V]
    if any(g is None for g in generators):
        uniform.uniform_()  # unseeded rows share one draw
    for i, g in enumerate(generators):
        if g is not None:
            # A seeded row draws V numbers from its own stream whatever else is in the batch.
            uniform[i].uniform_(generator=g)
    # -log(-log u): u = 0 gives -inf noise (the token just loses this race), never NaN.
    return uniform.log_().neg_().log_().neg_()


def _report(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> SamplerOutput:
    """Chosen-token and top-n log-probs from the raw logits [B, V]."""
    normaliser = raw.logsumexp(dim=-1)  # [B]
    chosen = raw.gather(1, tokens[:, None]).squeeze(1) - normaliser  # [B]
    n_top = max((p.logprobs or 0 for p in params), default=0)
    top: list[list[tuple[int, float]] | None] = [None if p.logprobs is None else [] for p in params]
    if n_top > 0:
        values, ids = raw.topk(n_top, dim=-1)  # [B, N], best first
        values_list = (values - normaliser[:, None]).tolist()
        ids_list = ids.tolist()
        for i, p in enumerate(params):
            if p.logprobs:
                top[i] = list(zip(ids_list[i], values_list[i], strict=True))[: p.logprobs]
    return SamplerOutput(token_ids=tokens.tolist(), logprobs=chosen.tolist(), top_logprobs=top)
