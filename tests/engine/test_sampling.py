"""SamplingParams validation; the batched Sampler: greedy, filters, penalties, seeds, logprobs."""

import math

import pytest
import torch

from elasticserve.engine.sampling import Sampler, SamplerOutput, SamplingParams, _penalise_and_mask

EOS = 7


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos: frozenset[int] = frozenset({EOS}),
) -> SamplerOutput:
    batch = logits.shape[0]
    return Sampler()(
        logits,
        params,
        generators or [None] * batch,
        prompts or [[] for _ in range(batch)],
        outputs or [[] for _ in range(batch)],
        set(eos),
    )


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Reference top-p set: best tokens until the mass before the next one reaches p."""
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for token in order:
        if mass >= top_p:
            break
        kept.add(token)
        mass += float(probs[token])
    return kept


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("n", 0, "0"),
        ("max_tokens", 0, "0"),
        ("min_tokens", -1, "-1"),
        ("temperature", -0.1, "-0.1"),
        ("temperature", math.nan, "nan"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.5, "1.5"),
        ("top_k", -2, "-2"),
        ("min_p", 1.5, "1.5"),
        ("presence_penalty", 2.5, "2.5"),
        ("frequency_penalty", -3.0, "-3.0"),
        ("repetition_penalty", 0.0, "0.0"),
        ("logprobs", 21, "21"),
        ("logprobs", -1, "-1"),
        ("seed", 2**64, str(2**64)),
        ("stop", ["ok", ""], "''"),
        ("stop", 3, "3"),
        ("stop_token_ids", [-1], "-1"),
        ("prompt_logprobs", 21, "21"),
        ("prompt_logprobs", -1, "-1"),
        ("logit_bias", {5: 100.5}, "100.5"),
        ("logit_bias", {5: -101}, "-101"),
        ("logit_bias", {5: math.nan}, "nan"),
        ("logit_bias", {-1: 1.0}, "-1"),
        ("logit_bias", {"5": 1.0}, "'5'"),
    ],
)
def test_params_reject_invalid_value_naming_field(field: str, value: object, shown: str) -> None:
    with pytest.raises(ValueError, match=field) as error:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert str(error.value).endswith(f"got {shown}")


def test_params_reject_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_params_reject_unsupported_features_clearly() -> None:
    with pytest.raises(ValueError, match=r"best_of must be an integer >= n \(3\), got 2"):
        SamplingParams(n=3, best_of=2)


def test_params_normalise_like_vllm() -> None:
    params = SamplingParams(stop="###", top_k=-1, temperature=1e-6, max_tokens=None)
    assert params.stop == ["###"]
    assert params.stop_token_ids == []
    assert params.top_k == 0
    assert params.is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy


# ---------------------------------------------------------------- greedy and filters


def test_greedy_is_argmax_for_any_dtype() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    expected = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1e-6)] * 3
    assert sample(logits, params).token_ids == expected
    half = logits.bfloat16()
    assert sample(half, params).token_ids == half.float().argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 2
    tokens = sample(logits, params).token_ids
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 10.0])
def test_top_k_1_and_tiny_top_p_are_greedy(temperature: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(64, 500)
    expected = logits.argmax(-1).tolist()
    top_k = [SamplingParams(temperature=temperature, top_k=1)] * 64
    top_p = [SamplingParams(temperature=temperature, top_p=1e-6)] * 64
    assert sample(logits, top_k).token_ids == expected
    assert sample(logits, top_p).token_ids == expected


def test_frequencies_match_filtered_softmax() -> None:
    torch.manual_seed(3)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()
    configs = {
        "plain": (SamplingParams(), probs),
        "hot": (SamplingParams(temperature=2.0), (logits / 2).softmax(-1)),
        "top_k=2": (SamplingParams(top_k=2), torch.tensor([4 / 7, 3 / 7, 0, 0])),
        # mass before token 2 is 0.7 >= 0.6, so the nucleus is {0, 1}
        "top_p=0.6": (SamplingParams(top_p=0.6), torch.tensor([4 / 7, 3 / 7, 0, 0])),
        # keeps p >= 0.3 * 0.4 = 0.12
        "min_p=0.3": (SamplingParams(min_p=0.3), torch.tensor([4 / 9, 3 / 9, 2 / 9, 0])),
    }
    draws = 4000
    params = [p for p, _ in configs.values() for _ in range(draws)]
    tokens = torch.tensor(sample(logits.repeat(len(params), 1), params).token_ids)
    for i, (name, (_, expected)) in enumerate(configs.items()):
        rows = tokens[i * draws : (i + 1) * draws]
        freq = torch.bincount(rows, minlength=4).float() / draws
        # 4000 draws: one standard deviation of a frequency is at most 0.008
        assert torch.allclose(freq, expected, atol=0.035), (name, freq, expected)


@pytest.mark.parametrize("top_k", [0, 300])
def test_wide_nucleus_is_exact_beyond_the_candidates(top_k: int) -> None:
    # A near-flat distribution whose p=0.5 nucleus holds hundreds of tokens, more than the
    # sampler's first candidate set: the fallback must find the whole nucleus and nothing more.
    torch.manual_seed(4)
    logits = -torch.arange(1000.0) * 2e-3  # token i is the (i+1)-th best
    restricted = logits.clone()
    if top_k:
        restricted[top_k:] = -math.inf
    kept = nucleus(restricted.softmax(-1), 0.5)
    draws = 20000
    params = [SamplingParams(top_p=0.5, top_k=top_k)] * draws
    tokens = set(sample(logits.repeat(draws, 1), params).token_ids)
    assert tokens <= kept
    assert max(tokens) >= max(kept) - 5  # the far end of the nucleus is reached
    assert len(kept) > 256 if not top_k else len(kept) < top_k


def test_top_p_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, -5.0]])
    kept = {
        sample(logits, [SamplingParams(top_p=0.8)], [torch.Generator().manual_seed(s)]).token_ids[0]
        for s in range(200)
    }
    assert kept == {0, 1, 2}


# ---------------------------------------------------------------- penalties and min_tokens


def test_penalties_follow_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)]
    out = _penalise_and_mask(logits, params, [[0]], [[1, 1, 3]], {EOS})
    # token 0 (prompt): 2 / 2; token 1 (output twice): -1 * 2 - 2 * 0.25 - 0.5;
    # token 2: untouched; token 3 (output once): 3 / 2 - 0.25 - 0.5; token 4: untouched
    assert out.tolist() == [[1.0, -3.0, 0.5, 0.75, -2.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0]]  # the caller's tensor is not written


def test_frequency_penalty_moves_greedy_off_a_repeated_token() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    outputs = [[0, 0, 0]]
    plain = sample(logits, [SamplingParams(temperature=0)], outputs=outputs)
    penalised = [SamplingParams(temperature=0, frequency_penalty=0.2)]
    assert plain.token_ids == [0]
    assert sample(logits, penalised, outputs=outputs).token_ids == [1]


def test_min_tokens_forbids_eos_and_stop_token_ids() -> None:
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 5], logits[0, 3] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5])
    assert sample(logits, [params], outputs=[[1]]).token_ids == [3]
    assert sample(logits, [params], outputs=[[1, 2, 4]]).token_ids == [EOS]
    # eos cannot end an ignore_eos request, so min_tokens has no reason to ban it (vLLM)
    ignore = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sample(logits, [ignore], outputs=[[1]]).token_ids == [EOS]
    hot = [SamplingParams(temperature=5.0, min_tokens=3, stop_token_ids=[5])] * 500
    drawn = set(sample(logits.repeat(500, 1), hot, outputs=[[1]] * 500).token_ids)
    assert EOS not in drawn and 5 not in drawn and len(drawn) > 3


# ---------------------------------------------------------------- logprobs and seeds


def test_logprobs_come_from_the_raw_distribution() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 100) * 3
    raw = torch.log_softmax(logits, -1)
    params = [
        SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3),
        SamplingParams(logprobs=0, temperature=0),
        SamplingParams(top_k=3),
    ]
    out = sample(logits, params, outputs=[[int(logits[0].argmax())], [], []])
    assert torch.allclose(raw.exp().sum(-1), torch.ones(3))
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(float(raw[row, token]), abs=1e-5)
    top = out.top_logprobs[0]
    assert top is not None and len(top) == 5
    values = [lp for _, lp in top]
    assert values == sorted(values, reverse=True)
    best = raw[0].topk(5)
    assert [t for t, _ in top] == best.indices.tolist()
    assert values == pytest.approx(best.values.tolist(), abs=1e-5)
    assert out.top_logprobs[1] == []
    assert out.top_logprobs[2] is None


def test_logit_bias_shifts_only_its_own_row() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, 50)
    before = logits.clone()
    worst = int(logits[1].argmin())
    params = [
        SamplingParams(temperature=0, logprobs=1),
        SamplingParams(temperature=0, logprobs=1, logit_bias={worst: 100.0}),
        SamplingParams(temperature=0, logit_bias={int(logits[2].argmax()): -100}),
        SamplingParams(temperature=0, logprobs=1),
    ]
    out = sample(logits, params)
    assert torch.equal(logits, before)  # the caller's logits are never written
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[3] == int(logits[3].argmax())
    assert out.token_ids[1] == worst
    assert out.token_ids[2] == int(logits[2].topk(2).indices[1])
    # the biased row's log-probs are those of its biased logits; the others' are untouched
    biased = logits[1].clone()
    biased[worst] += 100
    assert out.logprobs[1] == pytest.approx(float(biased.log_softmax(-1)[worst]), abs=1e-5)
    for row in (0, 3):
        expected = float(logits[row].log_softmax(-1).max())
        assert out.logprobs[row] == pytest.approx(expected, abs=1e-5)


def test_logit_bias_moves_sampled_frequencies() -> None:
    logits = torch.zeros(1, 4).repeat(2000, 1)
    bias = {2: math.log(3.0), 3: -100.0}  # token 2 three times as likely as 0 or 1, 3 never
    out = sample(logits, [SamplingParams(seed=None, logit_bias=bias)] * 2000)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).tolist()
    assert counts[3] == 0
    assert counts[2] / 2000 == pytest.approx(0.6, abs=0.05)
    assert counts[0] / 2000 == pytest.approx(0.2, abs=0.04)


def _seeded_run(seed: int, others: int, steps: int = 12) -> list[int]:
    """Tokens of one seeded request, alone (others=0) or in the middle of a mixed batch."""
    torch.manual_seed(100 + others)
    params = SamplingParams(seed=seed, temperature=0.9, top_p=0.95, top_k=40)
    generator = torch.Generator().manual_seed(seed)
    neighbours = [SamplingParams(temperature=1.3), SamplingParams(seed=seed + 1, min_p=0.05)]
    batch = [neighbours[i % 2] for i in range(others)]
    row = others // 2
    batch.insert(row, params)
    generators: list[torch.Generator | None] = [
        torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in batch
    ]
    generators[row] = generator
    tokens = []
    for step in range(steps):
        step_logits = torch.Generator().manual_seed(step)
        logits = torch.randn(1, 500, generator=step_logits).repeat(len(batch), 1)
        logits[torch.arange(len(batch)) != row] += torch.randn(len(batch) - 1, 500)
        tokens.append(sample(logits, batch, generators).token_ids[row])
    return tokens


def test_seeded_row_is_independent_of_the_batch() -> None:
    alone = _seeded_run(seed=1234, others=0)
    assert _seeded_run(seed=1234, others=5) == alone
    assert _seeded_run(seed=1234, others=2) == alone
    assert _seeded_run(seed=4321, others=0) != alone
