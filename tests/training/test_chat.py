"""Chat distillation data (written by the full shape), chat KL / agreement, chat fine-tuning."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from elasticserve.cli.main import main
from elasticserve.model.adapters import LoraConfig, effective_weights
from elasticserve.model.bundle import load_bundle
from elasticserve.model.pack import Pack
from elasticserve.training.chat import (
    build_distill_set,
    chat_ids,
    chat_stream,
    conversation_ids,
    read_chat,
    split_of,
    write_jsonl,
)
from elasticserve.training.evaluate import chat_report
from elasticserve.training.finetune import FinetuneConfig, finetune

from ..helpers import random_pack

TEXT = (
    "Anne had been used to the quiet of the house, and the arrival of her sister brought a "
    "great deal of noise and talk about the neighbours, the weather and the coming ball. "
) * 40


@pytest.fixture(scope="module")
def pack_dir(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-pack") / "tiny"
    random_pack(load_bundle(tiny_llama_dir, dtype="float32").pack, seed=7).save(path)
    return path


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir, pack_dir):
    return load_bundle(tiny_llama_dir, pack=pack_dir, dtype="float32")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-text") / "novel.txt"
    path.write_text(TEXT)
    return path


def _smallest(bundle):
    return min(bundle.specs, key=lambda s: s.weight_fraction)


def test_distill_set_has_every_source_and_is_reproducible(bundle, text_file):
    kwargs = dict(
        data=[text_file], seed_prompts=5, self_count=4, passage_count=3, max_tokens=12, seed=1
    )
    records = build_distill_set(bundle, **kwargs)
    again = build_distill_set(bundle, **kwargs)
    assert records == again, "seeded prompts and answers: the same set twice"
    sources = [r["source"] for r in records]
    assert sources.count("seed") == 5 and sources.count("passage") == 3
    assert sources.count("self") <= 4
    for r in records:
        user, answer = r["messages"]
        assert user["role"] == "user" and user["content"]
        assert answer["role"] == "assistant"
        assert r["finish_reason"] in ("stop", "length")
        assert r["split"] == split_of(user["content"], 0.15)
    passages = [r["messages"][0]["content"] for r in records if r["source"] == "passage"]
    assert all("Anne had been used" in p or "neighbours" in p for p in passages)


def test_split_is_a_stable_share_of_the_prompts():
    texts = [f"question number {i}?" for i in range(4000)]
    held = [t for t in texts if split_of(t, 0.2) == "heldout"]
    assert 0.17 < len(held) / len(texts) < 0.23
    assert held == [t for t in texts if split_of(t, 0.2) == "heldout"]
    assert all(split_of(t, 0.0) == "train" for t in texts)


def test_jsonl_round_trip_split_filter_and_bad_lines(tmp_path):
    records = [
        {
            "split": s,
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": "a"},
            ],
        }
        for i, s in enumerate(["train", "heldout", "train"])
    ]
    path = tmp_path / "set.jsonl"
    assert write_jsonl(records, path) == 3
    assert read_chat(path) == records
    assert [r["messages"][0]["content"] for r in read_chat(path, "train")] == ["q0", "q2"]
    assert len(read_chat(path, "heldout")) == 1
    with pytest.raises(ValueError, match="split"):
        read_chat(path, "test")
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"set.jsonl:2"):
        read_chat(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match="assistant"):
        read_chat(path)


def test_conversation_ids_end_the_answer_on_eos_only_when_it_stopped(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi, how can I help?"},
        ],
        "finish_reason": "stop",
    }
    prompt, answer = conversation_ids(tokenizer, record)
    assert prompt == chat_ids(tokenizer, "Hello there")
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "Hi, how can I help?"
    _, cut = conversation_ids(tokenizer, {**record, "finish_reason": "length"})
    assert cut == answer[:-1]
    assert chat_stream(tokenizer, [record, record]) == (prompt + answer) * 2


def _conversations(bundle, text_file, count: int = 6):
    records = build_distill_set(
        bundle, data=[text_file], seed_prompts=count, self_count=0, passage_count=2, max_tokens=24
    )
    return records, [conversation_ids(bundle.tokenizer, r) for r in records]


def test_chat_report_full_agrees_with_itself_and_small_shapes_do_not(bundle, text_file):
    _, convs = _conversations(bundle, text_file)
    small = _smallest(bundle)
    full_row, small_row = chat_report(bundle, [bundle.full, small], convs)
    assert full_row["shape"] == bundle.full.name
    assert full_row["chat_kl"] < 1e-6 and full_row["chat_agree"] == 1.0
    assert small_row["chat_kl"] > 1e-3 and small_row["chat_agree"] < 1.0
    with pytest.raises(ValueError, match="at least one"):
        chat_report(bundle, [small], [(p, []) for p, _ in convs])


def test_finetune_on_chat_lowers_the_small_shapes_chat_kl(peaked_bundle, text_file, tmp_path):
    bundle = peaked_bundle
    records, convs = _conversations(bundle, text_file, count=8)
    small = _smallest(bundle)
    (before,) = chat_report(bundle, [small], convs)
    text = bundle.tokenizer(TEXT)["input_ids"]
    config = FinetuneConfig(
        steps=12,
        lr=1e-2,
        lora=LoraConfig(rank=4, experts=4, alpha=8.0),
        seq_len=32,
        batch=4,
        random_shapes=1,
        eval_every=0,
        chat_share=0.75,
    )
    result = finetune(
        bundle,
        text,
        [],
        tmp_path / "out",
        config,
        progress=False,
        chat_ids=chat_stream(bundle.tokenizer, records),
    )
    bundle.model.lora = effective_weights(
        result.experts, bundle.specs, torch.float32, torch.device("cpu")
    )
    try:
        (after,) = chat_report(bundle, [small], convs)
    finally:
        bundle.model.lora = None
    assert after["chat_kl"] < 0.7 * before["chat_kl"], (before, after)
    with pytest.raises(ValueError, match="chat data"):
        finetune(bundle, text, [], tmp_path / "x", config, progress=False, chat_ids=[1, 2, 3])


def test_cli_distill_data_then_eval_chat(tiny_llama_dir, pack_dir, tmp_path, capsys, bundle):
    out = tmp_path / "set.jsonl"
    common = ["--model", str(tiny_llama_dir), "--pack", str(pack_dir), "--dtype", "float32"]
    sizes = ["--seed-prompts", "3", "--self-prompts", "0", "--max-tokens", "8", "--heldout", "0"]
    main(["distill-data", *common, "--out", str(out), *sizes])
    assert "3 conversations" in capsys.readouterr().out
    assert len(read_chat(out, "train")) == 3
    small = _smallest(bundle).name
    args = ["eval", *common, "--chat", str(out), "--chat-split", "all", "--shapes"]
    main([*args, f"full,{small}", "--json"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["shape"] for r in rows] == [bundle.full.name, small]
    assert rows[0]["chat_agree"] == 1.0 and rows[1]["chat_kl"] > 0
    with pytest.raises(SystemExit):
        main(["eval", *common, "--chat", str(out), "--shapes", "full"])  # no heldout records


def test_eval_record_writes_the_measures_into_the_pack(
    tiny_llama_dir, pack_dir, text_file, tmp_path, capsys
):
    pack = tmp_path / "pack"
    shutil.copytree(pack_dir, pack)
    (pack / "README.md").write_text("kept")
    chat = tmp_path / "set.jsonl"
    records = [
        {
            "split": "heldout",
            "finish_reason": "stop",
            "messages": [
                {"role": "user", "content": f"Tell me about the ball, part {i}."},
                {"role": "assistant", "content": "It was a grand evening with music and dancing."},
            ],
        }
        for i in range(3)
    ]
    write_jsonl(records, chat)
    bundle = load_bundle(tiny_llama_dir, pack=pack, dtype="float32")
    small = _smallest(bundle).name
    argv = ["eval", "--model", str(tiny_llama_dir), "--pack", str(pack), "--dtype", "float32"]
    argv += ["--data", str(text_file), "--chat", str(chat), "--shapes", f"full,{small}"]
    main([*argv, "--json", "--record"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reloaded = Pack.load(pack)
    assert (pack / "README.md").read_text() == "kept", "only the manifest is rewritten"
    for row in rows:
        assert reloaded.quality[row["shape"]] == round(row["ppl"], 3)
        assert reloaded.chat_quality[row["shape"]]["agree"] == round(row["chat_agree"], 4)
    spec = load_bundle(tiny_llama_dir, pack=pack, dtype="float32").spec(small)
    assert spec.chat is not None and spec.chat["kl"] > 0
    assert "--record" in reloaded.meta["quality_record"]["command"]
    with pytest.raises(SystemExit):  # --record needs a pack directory to write
        main(["eval", "--model", str(tiny_llama_dir), "--data", str(text_file), "--record"])
