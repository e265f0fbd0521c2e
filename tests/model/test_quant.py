"""The q8/q4 nibble-plane format: its bytes, quantize's error, row and group moves, GGUF blocks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from elasticserve.model.quant import (
    QuantWeight,
    cat_rows,
    dequantize,
    from_gguf,
    gguf_linears,
    quantize,
    take_groups,
    take_rows,
)

from ..conftest import requires_default_model

METHODS = ["minmax", "mse"]


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of varied magnitude with a few outliers, as trained linears have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen))
    w[torch.rand(n, k, generator=gen) < 0.01] *= 8
    return w


def gguf_blocks(qtype: T, n: int, k: int, seed: int = 0) -> np.ndarray:
    return gguf.quants.quantize(weight(n, k, seed).numpy(), qtype)


def rel_error(q: QuantWeight, w: torch.Tensor, precision: str) -> float:
    return ((dequantize(q, precision) - w).norm() / w.norm()).item()


def test_planes_pair_groups_byte_by_byte():
    # Q4_1 blocks with known codes: byte j of a block = weight j | weight j + 16 << 4.
    n, groups = 3, 3
    codes = torch.arange(n)[:, None, None] + 3 * torch.arange(groups)[:, None] + torch.arange(32)
    codes = (codes % 16).to(torch.uint8)  # [N, G, 32]
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).numpy()
    d = np.full((n, groups, 1), 0.5, np.float16).view(np.uint8)
    m = np.full((n, groups, 1), -1.0, np.float16).view(np.uint8)
    raw = np.concatenate([d, m, qs], axis=-1).reshape(n, -1)
    q = from_gguf(raw, T.Q4_1)
    assert (q.rows, q.cols, q.groups) == (n, 96, 3)
    assert q.hi.shape == (n, 64) and q.lo is None
    assert torch.equal(q.hi[:, :32], codes[:, 0] | (codes[:, 1] << 4))
    assert torch.equal(q.hi[:, 32:], codes[:, 2])  # an odd last group: high nibbles 0
    assert torch.equal(dequantize(q, "q4"), (0.5 * codes.float() - 1.0).reshape(n, 96))


def test_quantize_splits_the_8bit_code_into_high_and_residual_planes():
    # min 0, max 255: the minmax step d8 is 1, so the 8-bit code u is the weight itself.
    u = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    u[:, 0], u[:, 1], u[:, 32], u[:, 33] = 0, 255, 0, 255
    q = quantize(u.float())
    c, e = (u >> 4).to(torch.uint8), (u & 15).to(torch.uint8)
    assert torch.equal(q.hi, c[:, :32] | (c[:, 32:] << 4))
    assert q.lo is not None and torch.equal(q.lo, e[:, :32] | (e[:, 32:] << 4))
    assert torch.equal(q.scale, torch.full((2, 2), 16.0))  # d4 = 16 d8
    assert torch.equal(q.minimum, torch.full((2, 2), 8.0))  # m4 = min + 8 d8
    assert torch.equal(dequantize(q, "q8"), u.float())
    assert torch.equal(dequantize(q, "q4"), 16 * (u >> 4).float() + 8)


@pytest.mark.parametrize("method", METHODS)
def test_quantize_error(method):
    w = weight(64, 256)
    q = quantize(w, method)
    # measured: q8 0.55 % (minmax) / 0.70 % (mse), q4 9.8 % / 9.5 %
    assert rel_error(q, w, "q8") < 0.01
    assert rel_error(q, w, "q4") < 0.11
    if method == "minmax":  # q8 within half its step; q4 reads u as 16 c + 8, at most 8.5 off
        d8 = (q.scale / 16).repeat_interleave(32, dim=1)
        assert ((dequantize(q, "q8") - w).abs() <= d8 / 2 * 1.0001).all()
        assert ((dequantize(q, "q4") - w).abs() <= 8.5 * d8 * 1.0001).all()


def test_mse_clipping_lowers_the_q4_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))  # measured: 8 % lower
    assert rel_error(quantize(w, "mse"), w, "q4") < 0.95 * rel_error(quantize(w), w, "q4")


def test_mse_keeps_a_q4_1_weight_as_it_is():
    raw = gguf_blocks(T.Q4_1, 32, 128)
    w = torch.from_numpy(gguf.quants.dequantize(raw, T.Q4_1))
    assert rel_error(quantize(w, "mse"), w, "q4") < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_constant_groups_read_back_exactly(method):
    w = weight(4, 128)
    w[0, :32] = 0.0
    w[1, 32:64] = 1.7
    w[2, 64:96] = -3e-5
    q = quantize(w, method)
    for precision in ("q4", "q8"):
        got = dequantize(q, precision)
        assert torch.equal(got[0, :32], w[0, :32])
        assert torch.equal(got[1, 32:64], w[1, 32:64])
        assert torch.equal(got[2, 64:96], w[2, 64:96])


def test_bad_inputs_name_the_bad_value():
    with pytest.raises(ValueError, match=r"\[8, 48\].*multiple of 32"):
        quantize(torch.randn(8, 48))
    with pytest.raises(ValueError, match="'gptq'"):
        quantize(torch.randn(8, 64), "gptq")
    w = torch.randn(8, 64)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w)
    with pytest.raises(ValueError, match="'q2'"):
        dequantize(quantize(torch.randn(8, 64)), "q2")
    q = quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="scale"):
        QuantWeight(q.hi, q.lo, q.scale.double(), q.minimum)
    with pytest.raises(ValueError, match="Q4_K"):
        from_gguf(np.zeros((2, 144), np.uint8), T.Q4_K)
    with pytest.raises(ValueError, match=r"\[2, 30\]"):
        from_gguf(np.zeros((2, 30), np.uint8), T.Q8_0)
    with pytest.raises(ValueError, match="1-D integer row index"):
        take_rows(q, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"widths K \[64, 96\]"):
        cat_rows([q, quantize(torch.randn(2, 96))])


def test_nbytes_counts_what_each_precision_reads():
    q = quantize(torch.randn(10, 160))  # G = 5: planes of 3 pairs
    plane, per_group = 10 * 96, 10 * 5 * 4 * 2
    assert q.nbytes("q4") == plane + per_group
    assert q.nbytes("q8") == 2 * plane + per_group
    no_lo = from_gguf(gguf_blocks(T.Q4_0, 10, 160), T.Q4_0)
    assert no_lo.nbytes("q8") == no_lo.nbytes("q4") == plane + per_group


@pytest.mark.parametrize("precision", ["q4", "q8"])
def test_row_and_group_moves_match_the_dense_ones(precision):
    w = weight(12, 160)  # G = 5 (odd)
    q = quantize(w, "mse")
    dense = dequantize(q, precision)
    rows = torch.tensor([11, 0, 5, 5, 3])
    assert torch.equal(dequantize(take_rows(q, rows), precision), dense[rows])
    groups = torch.tensor([4, 0, 2])  # a subset in a new order (an even count: pairs repack)
    moved = take_groups(q, groups)
    assert moved.groups == 3 and moved.hi.shape == (12, 64)
    cols = (groups[:, None] * 32 + torch.arange(32)).flatten()
    assert torch.equal(dequantize(moved, precision), dense[:, cols])
    back = take_groups(moved, torch.tensor([1, 2, 0]))
    assert torch.equal(dequantize(back, precision), dense[:, cols.view(3, 32)[[1, 2, 0]].flatten()])
    both = cat_rows([q, take_rows(q, rows)])
    assert torch.equal(dequantize(both, precision), torch.cat([dense, dense[rows]]))


def test_cat_rows_gives_a_weight_without_residual_one_of_no_residual():
    q8 = from_gguf(gguf_blocks(T.Q8_0, 4, 96, seed=1), T.Q8_0)
    q4 = from_gguf(gguf_blocks(T.Q4_1, 6, 96, seed=2), T.Q4_1)
    both = cat_rows([q8, q4])
    assert both.lo is not None
    assert torch.equal(
        dequantize(both, "q4"), torch.cat([dequantize(q8, "q4"), dequantize(q4, "q4")])
    )
    torch.testing.assert_close(
        dequantize(both, "q8"), torch.cat([dequantize(q8, "q8"), dequantize(q4, "q8")]),
        rtol=1e-6, atol=1e-6,
    )  # fmt: skip
    assert cat_rows([q4, q4]).lo is None


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0])
@pytest.mark.parametrize("k", [96, 576])
def test_gguf_blocks_read_exactly_as_ggml_dequantizes_them(qtype, k):
    raw = gguf_blocks(qtype, 16, k, seed=k)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    q = from_gguf(raw, qtype)
    assert torch.equal(dequantize(q, "q8"), ref)
    if qtype == T.Q8_0:  # q4 is its high 4 bits: within half a q4 step
        d4 = q.scale.repeat_interleave(32, dim=1)
        assert ((dequantize(q, "q4") - ref).abs() <= d4 / 2).all()
    else:
        assert q.lo is None
        assert torch.equal(dequantize(q, "q4"), ref)


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, T]]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_linears_match_rows_and_skip_what_does_not_match(tmp_path, caplog):
    blocks = {
        "blk.0.attn_q.weight": (gguf_blocks(T.Q4_0, 64, 64, seed=1), T.Q4_0),
        "blk.0.attn_k.weight": (gguf_blocks(T.Q8_0, 32, 64, seed=2), T.Q8_0),
        "blk.0.ffn_down.weight": (gguf_blocks(T.Q4_1, 64, 96, seed=3), T.Q4_1),
        "blk.0.ffn_up.weight": (weight(96, 64, seed=4).numpy(), T.F32),
    }
    write_gguf(tmp_path / "m.gguf", blocks)
    dense = {n: torch.from_numpy(gguf.quants.dequantize(*b)) for n, b in blocks.items()}
    rows = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    down = dense["blk.0.ffn_down.weight"].clone()
    down[7] += 1e-3  # no longer the file's row
    state = {
        "model.layers.0.self_attn.q_proj.weight": dense["blk.0.attn_q.weight"][rows],
        "model.layers.0.self_attn.k_proj.weight": dense["blk.0.attn_k.weight"],
        "model.layers.0.mlp.down_proj.weight": down,
        "model.layers.0.mlp.up_proj.weight": dense["blk.0.ffn_up.weight"],
    }
    with caplog.at_level(logging.WARNING):
        got = gguf_linears(tmp_path / "m.gguf", state, SimpleNamespace(num_layers=1))
    assert sorted(got) == sorted(list(state)[:2])
    for name, q in got.items():
        assert torch.equal(dequantize(q, "q8"), state[name])
    assert "1 of 64 dense rows" in caplog.text and "ffn_down" in caplog.text


@pytest.mark.slow
@requires_default_model
def test_default_model_keeps_its_gguf_blocks():
    from elasticserve.model.loader import (
        default_gguf,
        load_config,
        load_state_dict,
        resolve_model_dir,
    )

    model_dir = resolve_model_dir(None)
    state, (config, _) = load_state_dict(model_dir), load_config(model_dir)
    got = gguf_linears(default_gguf(), state, config)
    linears = [n for n in state if n.endswith("proj.weight")]
    assert len(linears) == 7 * config.num_layers
    assert set(got) == {*linears, "model.embed_tokens.weight"}
    for name, q in got.items():
        assert torch.equal(dequantize(q, "q8"), state[name]), name
        if q.lo is None:  # Q4_0 / Q4_1 blocks: q4 reads them exactly too
            assert torch.equal(dequantize(q, "q4"), state[name]), name
    assert all(got[n].lo is None for n in linears)  # this file's linears are all Q4_1
