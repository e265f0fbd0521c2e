"""Structured output on a tiny random model: every output parses and matches its grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from elasticserve.engine.guided import (
    GuidedDecodingParams,
    allocate_bitmask,
    bitmask_to_additive,
    bitmask_to_bool,
)
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.sampling import Sampler, SamplingParams
from elasticserve.model.bundle import load_bundle

from .test_sampling import sample

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "member", "colour"],
    "additionalProperties": False,
}
SHAPES = ["full", "d3-w0.5", "d5-w0.75", "d6-w0.625"]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(load_bundle(tiny_llama_dir, dtype="float32"))


def _run(engine: LLMEngine, guided: GuidedDecodingParams, n: int, **kw) -> list[tuple[str, str]]:
    """(text, finish reason) of n seeded samples under `guided`, over four shapes in one batch."""
    ids = []
    for i in range(n):
        params = SamplingParams(max_tokens=120, seed=i, guided_decoding=guided, **kw)
        ids.append(engine.add_request(f"Record {i}:", params, SHAPES[i % len(SHAPES)]))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].text, out.outputs[0].finish_reason)
    return [done[i] for i in ids]


def _generate(engine: LLMEngine, guided: GuidedDecodingParams, n: int, **kw) -> list[str]:
    """Texts of samples that must all end by reaching the grammar's end."""
    results = _run(engine, guided, n, **kw)
    assert all(reason == "stop" for _, reason in results), results
    return [text for text, _ in results]


def test_json_schema_outputs_validate(engine):
    for text in _generate(engine, GuidedDecodingParams(json=SCHEMA), 8):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_outputs_are_objects(engine):
    """A random model writes unbounded keys; what ends parses, the rest is an object's start."""
    results = _run(engine, GuidedDecodingParams(json_object=True), 4, temperature=0.7)
    for text, reason in results:
        assert text.startswith("{"), text
        if reason == "stop":
            assert isinstance(json.loads(text), dict)


def test_regex_outputs_match(engine):
    pattern = r"[a-z]{2,5}-\d{3}"
    for text in _generate(engine, GuidedDecodingParams(regex=pattern), 6):
        assert re.fullmatch(pattern, text), text


def test_choice_outputs_are_a_choice(engine):
    choices = ("positive", "negative", "ça dépend")  # a non-ASCII literal in the grammar too
    texts = _generate(engine, GuidedDecodingParams(choice=choices), 6)
    assert set(texts) <= set(choices)


def test_ebnf_grammar(engine):
    grammar = 'root ::= "(" [0-9]+ (" + " [0-9]+)* ")"'
    for text in _generate(engine, GuidedDecodingParams(grammar=grammar), 4, temperature=0.5):
        assert re.fullmatch(r"\(\d+( \+ \d+)*\)", text), text


def test_min_tokens_yields_to_the_grammar_end(engine):
    """min_tokens bans the end the grammar requires: the grammar wins, not a random token."""
    texts = _generate(engine, GuidedDecodingParams(choice=("yes",)), 2, min_tokens=10)
    assert texts == ["yes", "yes"]


def test_bad_grammars_are_value_errors_and_queue_nothing(engine):
    for guided in (
        GuidedDecodingParams(json='{"type": "object", "properties": '),
        GuidedDecodingParams(regex="(unclosed"),
        GuidedDecodingParams(grammar="root ::= undefined_rule"),
    ):
        with pytest.raises(ValueError, match=f"guided {guided.kind}"):
            engine.add_request("x", SamplingParams(guided_decoding=guided))
    assert not engine.has_unfinished_requests()


def test_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams(regex="a", choice=("a",))
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="choice"):
        GuidedDecodingParams(choice=())


def test_bitmask_round_trip():
    bitmask = allocate_bitmask(2, 70)
    bitmask[0] = 0
    bitmask[0, 0] = -(2**31)  # bit 31: token 31
    bitmask[0, 2] = 0b10  # token 65
    allowed = bitmask_to_bool(bitmask, 70)
    assert allowed[0].nonzero().flatten().tolist() == [31, 65]
    assert bool(allowed[1].all())


@pytest.mark.parametrize("vocab", [70, 96, 1000])
def test_additive_mask_matches_the_reference(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), generator=gen)
    bitmask = words.to(torch.int32)
    bitmask[1] = 0
    bitmask[1, -1] = -(2**31)  # bit 31 of the last word only
    allowed = bitmask_to_bool(bitmask, vocab)  # [3, V], the pure-torch reference
    additive = bitmask_to_additive(bitmask, vocab)
    assert additive.shape == (3, vocab) and additive.dtype == torch.float32
    assert torch.equal(additive == 0, allowed)
    assert bool((additive[~allowed] == -torch.inf).all())


class _OnlyToken:
    """A stand-in guide that allows one token."""

    def __init__(self, token: int):
        self.token = token

    def fill_mask(self, output_token_ids, bitmask, row):
        bitmask[row] = 0
        bitmask[row, self.token // 32] = 1 << (self.token % 32)


def test_sampler_masks_only_the_guided_rows():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(), SamplingParams(temperature=0)]
    free = sample(logits, params).token_ids
    batch = len(params)
    guided = Sampler()(
        logits,
        params,
        [None] * batch,
        [[] for _ in range(batch)],
        [[] for _ in range(batch)],
        {7},
        [None, _OnlyToken(42), None],  # type: ignore[list-item]
    )
    assert guided.token_ids[1] == 42
    assert [guided.token_ids[0], guided.token_ids[2]] == [free[0], free[2]]
    # log-probs stay the model's: the mask shapes the draw, not the reported distribution
    expected = logits[1].log_softmax(-1)[42].item()
    assert guided.logprobs[1] == pytest.approx(expected, abs=1e-5)


class _Bits:
    """A stand-in guide that writes a given bitmask row."""

    def __init__(self, bits: torch.Tensor):
        self.bits = bits

    def fill_mask(self, output_token_ids, bitmask, row):
        bitmask[row] = self.bits


def test_sampler_mask_matches_the_reference_unpacking():
    # sparse, half-full and single-word masks over a vocab that is not a multiple of 32
    vocab, batch = 1000, 6
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (batch, (vocab + 31) // 32), generator=gen)
    words = words.to(torch.int32)
    words[0] &= torch.randint(0, 2, words[0].shape, generator=gen, dtype=torch.int32) << 5
    words[3] = 0
    words[3, 31] = 1 << 7  # token 999 only
    guides = [_Bits(words[i]) if i in (0, 1, 3, 4) else None for i in range(batch)]
    params = [SamplingParams(temperature=0) for _ in range(batch)]
    out = Sampler()(
        logits,
        params,
        [None] * batch,
        [[]] * batch,
        [[]] * batch,
        set(),
        guides,  # type: ignore[arg-type]
    )
    allowed = bitmask_to_bool(words, vocab)  # [B, V], the pure-torch reference
    expected = logits.masked_fill(~allowed, -torch.inf).argmax(-1)
    for i in range(batch):
        want = expected[i] if guides[i] is not None else logits[i].argmax()
        assert out.token_ids[i] == int(want), i
    assert out.token_ids[3] == 999
