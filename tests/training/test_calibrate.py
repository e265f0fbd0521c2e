"""Calibration on the tiny random model: packs that load, keep the full model exact, and refuse
the wrong model; monotone rounded widths; DP layer tables; the calibrate and eval commands."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
import torch

from elasticserve.cli.calibrate import register
from elasticserve.model.bundle import load_bundle
from elasticserve.model.config import ModelConfig
from elasticserve.model.pack import Pack, PackMismatchError, channel_multiple, uniform_widths
from elasticserve.training.calibrate.depth import (
    LayerRunner,
    best_addition,
    best_removal,
    dp_tables,
    greedy_tables,
    refine_tables,
)
from elasticserve.training.calibrate.importance import (
    activation_stats,
    load_dense,
    orders,
    wifv_scores,
)
from elasticserve.training.calibrate.run import calibrate
from elasticserve.training.calibrate.sensitivity import LayerCosts, knapsack_widths, layer_costs
from elasticserve.training.calibrate.widths import check_widths

from ..helpers import prefill_logits

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
) * 12
WIDTHS = (1.0, 0.75, 0.5)
DEPTHS = (6, 5, 4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def pack_dir(tiny_llama_dir: Path, text_file: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "tiny"
    calibrate(
        tiny_llama_dir, [text_file], out, WIDTHS, DEPTHS, tokens=512, seq_len=64, dp_tokens=128
    )
    return out


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="elasticserve")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_pack_round_trip(pack_dir: Path, tmp_path: Path):
    pack = Pack.load(pack_dir)
    pack.save(tmp_path / "again")
    again = Pack.load(tmp_path / "again")
    assert again.layer_widths == pack.layer_widths and again.layer_tables == pack.layer_tables
    assert again.fingerprint == pack.fingerprint and again.config == pack.config
    for a, b in zip(
        pack.head_order + pack.mlp_order, again.head_order + again.mlp_order, strict=True
    ):
        assert torch.equal(a, b)
    assert pack.bias.keys() == again.bias.keys() and pack.bias
    for key, (o, d) in pack.bias.items():
        assert torch.equal(o, again.bias[key][0]) and torch.equal(d, again.bias[key][1])


def test_full_shape_of_calibrated_pack_equals_unpermuted(pack_dir, tiny_llama_dir, tokenizer):
    ids = tokenizer(TEXT[:300])["input_ids"]
    plain = load_bundle(tiny_llama_dir, dtype="float32")
    packed = load_bundle(tiny_llama_dir, pack=pack_dir, dtype="float32")
    assert any(not torch.equal(o, torch.arange(len(o))) for o in packed.pack.mlp_order)
    a = prefill_logits(plain, [ids], [plain.full])[0]
    b = prefill_logits(packed, [ids], [packed.full])[0]
    assert (a - b).abs().max().item() <= 1e-4


def test_pack_for_another_model_is_refused(pack_dir, tiny_qwen2_dir):
    with pytest.raises(PackMismatchError, match="calibrated for model"):
        load_bundle(tiny_qwen2_dir, pack=pack_dir, dtype="float32")


def test_widths_are_monotone_rounded_and_within_budget(pack_dir):
    pack = Pack.load(pack_dir)
    cfg = pack.config
    check_widths(pack.layer_widths, cfg)  # raises if any layer grows as the ratio shrinks
    heads, mlp = pack.layer_widths[1.0]
    assert set(heads) == {cfg.num_heads} and set(mlp) == {cfg.intermediate_size}
    for w in WIDTHS:
        heads, mlp = pack.layer_widths[w]
        assert all(m % channel_multiple(cfg) == 0 and m > 0 for m in mlp)
        assert all(h % cfg.num_groups == 0 and h > 0 for h in heads)
    for w in WIDTHS:  # the knapsack moves bytes between layers and parts, never adds any
        spent = sum(cfg.layer_params(h, m) for h, m in zip(*pack.layer_widths[w], strict=True))
        budget = sum(cfg.layer_params(h, m) for h, m in zip(*uniform_widths(cfg, w), strict=True))
        assert spent <= budget
        assert spent > budget - cfg.layer_params(cfg.num_groups, channel_multiple(cfg))


def test_check_widths_rejects_growing_layer(pack_dir):
    pack = Pack.load(pack_dir)
    heads, mlp = pack.layer_widths[0.5]
    bad = dict(pack.layer_widths)
    bad[0.5] = (heads, (pack.config.intermediate_size, *mlp[1:]))
    bad[0.75] = (pack.layer_widths[0.75][0], (channel_multiple(pack.config), *mlp[1:]))
    with pytest.raises(ValueError, match="must not grow"):
        check_widths(bad, pack.config)


def test_dp_tables_keep_last_layer_and_sizes(tiny_llama_dir, tokenizer):
    hf = load_dense(tiny_llama_dir)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]] * 2)
    tables = dp_tables(LayerRunner(hf, ids, 32), [6, 4, 2], progress=False)
    assert sorted(tables) == [2, 4, 6]
    for depth, layers in tables.items():
        assert len(layers) == depth and layers[-1] == 5 and list(layers) == sorted(set(layers))


def test_calibrate_cli_writes_loadable_pack(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pack"
    args = _cli(
        "calibrate", "--model", str(tiny_llama_dir), "--data", str(text_file), "--out", str(out),
        "--widths", "1,0.5", "--depths", "6,3", "--tokens", "256", "--seq-len", "64",
        "--dp-tokens", "64",
    )  # fmt: skip
    assert args.func(args) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]  # no temp dir left behind
    bundle = load_bundle(tiny_llama_dir, pack=out, dtype="float32")
    assert [s.name for s in bundle.specs] == ["d6-w1.0", "d6-w0.5", "d3-w1.0", "d3-w0.5"]
    assert "wrote" in capsys.readouterr().out


def test_eval_json_prints_documented_fields(pack_dir, tiny_llama_dir, text_file, capsys):
    args = _cli(
        "eval", "--model", str(tiny_llama_dir), "--pack", str(pack_dir), "--data", str(text_file),
        "--shapes", "full,d4-w0.5", "--max-tokens", "200", "--json", "--dtype", "float32",
    )  # fmt: skip
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["shape"] for r in rows] == ["d6-w1.0", "d4-w0.5"]
    assert set(rows[0]) == {"shape", "weight_fraction", "ppl"}
    assert rows[0]["weight_fraction"] == 1.0 and rows[1]["weight_fraction"] < 0.6
    assert all(r["ppl"] > 1.0 for r in rows) and rows[0]["ppl"] != rows[1]["ppl"]


def _kl_of(runner: LayerRunner, kept: tuple[int, ...]) -> float:
    return runner.score(list(kept), 0)


def test_wide_beam_dp_finds_the_exhaustive_optimum(tiny_llama_dir, tokenizer):
    hf = load_dense(tiny_llama_dir)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]] * 2)
    runner = LayerRunner(hf, ids, 32)
    # every way of keeping 3 of the 5 prunable layers, plus the final one
    subsets = [(*c, 5) for c in itertools.combinations(range(5), 3)]
    best = min(subsets, key=lambda kept: _kl_of(runner, kept))
    wide = dp_tables(runner, [4], beam=len(subsets), progress=False)[4]
    assert wide == best
    narrow = dp_tables(runner, [4], beam=1, progress=False)[4]
    assert _kl_of(runner, wide) <= _kl_of(runner, narrow)


def test_moves_score_from_cached_states_like_a_fresh_run(tiny_llama_dir, tokenizer):
    hf = load_dense(tiny_llama_dir)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]] * 2)
    runner = LayerRunner(hf, ids, 32)
    kept = (0, 2, 5)
    added = [tuple(sorted((*kept, i))) for i in (1, 3, 4)]
    kl, best = best_addition(runner, kept)
    assert best == min(added, key=lambda k: _kl_of(runner, k))
    assert kl == pytest.approx(_kl_of(runner, best), rel=1e-5)
    removed = [(0, 5), (2, 5)]
    kl, best = best_removal(runner, kept)
    assert best == min(removed, key=lambda k: _kl_of(runner, k))
    assert kl == pytest.approx(_kl_of(runner, best), rel=1e-5)


def test_refined_tables_are_no_worse_than_dp_or_greedy(tiny_llama_dir, tokenizer):
    hf = load_dense(tiny_llama_dir)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]] * 2)
    runner = LayerRunner(hf, ids, 32)
    depths = [6, 5, 4, 3, 2]
    dp = dp_tables(runner, depths, progress=False)
    greedy = greedy_tables(runner, depths, progress=False)
    refined = refine_tables(runner, dp, progress=False)
    assert refined[6] == tuple(range(6))
    for d in depths[1:]:
        assert len(refined[d]) == d and refined[d][-1] == 5
        kl = _kl_of(runner, refined[d])
        assert kl <= min(_kl_of(runner, dp[d]), _kl_of(runner, greedy[d])) + 1e-6


def test_knapsack_widths_are_optimal_within_uniform_bytes_and_nested():
    config = ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=3,
        num_heads=3, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=True, qkv_bias=False, bos_token_id=None, eos_token_ids=(0,),
    )  # fmt: skip
    mlp_counts = list(range(16, 65, channel_multiple(config)))  # every count is measured
    g = torch.Generator().manual_seed(0)

    def decreasing(n: int) -> torch.Tensor:  # random costs, falling to 0 at full width
        values = torch.rand(config.num_layers, n - 1, generator=g).sort(1, descending=True)[0]
        return torch.cat([values, torch.zeros(config.num_layers, 1)], 1)

    costs = LayerCosts([1, 2, 3], mlp_counts, decreasing(3), decreasing(len(mlp_counts)))
    widths = knapsack_widths(costs, config, [1.0, 0.75, 0.5])
    check_widths(widths, config)  # on the grid and nested
    assert widths[1.0] == ((3,) * 3, (64,) * 3)

    def cost(choice) -> float:
        return sum(
            float(costs.heads[i, h - 1] + costs.mlp[i, mlp_counts.index(m)])
            for i, (h, m) in enumerate(choice)
        )

    def size(choice) -> int:
        return sum(config.layer_params(h, m) for h, m in choice)

    options = list(itertools.product([1, 2, 3], mlp_counts))
    for wide, width in ((1.0, 0.75), (0.75, 0.5)):
        chosen = list(zip(*widths[width], strict=True))
        caps = list(zip(*widths[wide], strict=True))
        budget = size(list(zip(*uniform_widths(config, width), strict=True)))
        assert size(chosen) <= budget
        brute = min(
            cost(combo)
            for combo in itertools.product(options, repeat=config.num_layers)
            if size(combo) <= budget
            and all(h <= ch and m <= cm for (h, m), (ch, cm) in zip(combo, caps, strict=True))
        )
        assert cost(chosen) == pytest.approx(brute)


def test_width_costs_are_zero_only_at_full_width(tiny_llama_dir, tokenizer):
    hf = load_dense(tiny_llama_dir)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]] * 2)
    config = ModelConfig.from_hf(hf.config)
    stats = activation_stats(hf, ids)
    head_scores, mlp_scores = wifv_scores(hf, stats, config)
    head_order, mlp_order = orders(head_scores, mlp_scores, config)
    costs = layer_costs(
        hf, LayerRunner(hf, ids, 32), stats, head_order, mlp_order, config, progress=False
    )
    assert costs.head_counts[-1] == config.num_heads
    assert costs.mlp_counts[-1] == config.intermediate_size
    assert (costs.heads[:, -1] == 0).all() and (costs.mlp[:, -1] == 0).all()
    assert (costs.heads[:, :-1] > 0).all() and (costs.mlp[:, :-1] > 0).all()
    layer_widths = knapsack_widths(costs, config, [1.0, 0.75, 0.5])
    check_widths(layer_widths, config)
