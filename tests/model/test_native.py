"""The native decoder step against the torch step: mixed shapes, prefill chunks, paged decode."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from elasticserve.engine import kv_cache
from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
from elasticserve.engine.sampling import SamplingParams
from elasticserve.kernels.cpu import build
from elasticserve.model.adapters import LoraConfig, LoraExperts, effective_weights
from elasticserve.model.bundle import load_bundle
from elasticserve.model.device import cpu_flags, cpu_has_native_bf16
from elasticserve.model.step_plan import BlockPool, SeqChunk, build_step

from ..helpers import random_pack

pytestmark = pytest.mark.skipif(
    build.load() is None, reason="the native CPU kernels do not build here"
)

BLOCK = 4
SHAPES = ["full", "d5-w0.75", "d6-w0.5", "d3-w0.625", "d4-w0.875"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bundle(request, tiny_llama_dir, tiny_qwen2_dir):
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_qwen2_dir
    base = load_bundle(model_dir, dtype="float32", cpu_kernels="torch")
    return load_bundle(model_dir, pack=random_pack(base.pack, seed=5), dtype="float32")


def torch_step(bundle, chunks, cache):
    cfg = bundle.config
    step = build_step(chunks, cfg.num_layers, cfg.head_dim, 2 * cfg.kv_size, BLOCK, bundle.biases)
    return bundle.model.forward(step, cache), step.logit_slices


@contextlib.contextmanager
def adapters(bundle, on: bool):
    """The bundle's model with random shape-aware LoRA experts (B random: fresh ones are 0)."""
    if not on:
        yield
        return
    torch.manual_seed(3)
    config = LoraConfig(rank=8, experts=4)
    experts = LoraExperts(bundle.config, bundle.pack.widths, config, bundle.specs)
    with torch.no_grad():
        for b in experts.b.values():
            b.normal_(0, 0.05)
    cpu = torch.device("cpu")
    bundle.model.lora = effective_weights(experts, bundle.specs, torch.float32, cpu)
    try:
        yield
    finally:
        bundle.model.lora = None


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_mixed_prefill_and_decode_match_torch(bundle, lora):
    cfg = bundle.config
    caches = [kv_cache.allocate(cfg, 512, BLOCK, torch.float32, torch.device("cpu")) for _ in "ab"]
    g = torch.Generator().manual_seed(0)
    lengths = [13, 1, 6, 9, 4]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    specs = [bundle.spec(s) for s in SHAPES]
    pool = BlockPool(BLOCK)
    tables = [pool.table(s, n + 8) for s, n in zip(specs, lengths, strict=True)]
    done = [0] * len(prompts)
    # step 0: whole prompts but one split in two chunks; then chunked rest + decodes, all "all"
    plans = [[(p[:7] if i == 0 else p) for i, p in enumerate(prompts)]]
    plans.append([prompts[0][7:]] + [[t] for t in range(4)])
    plans += [[[5 + s + i] for i in range(5)] for s in range(4)]
    for step, pieces in enumerate(plans):
        chunks = [
            SeqChunk(spec, ids, done[i], tables[i], "all" if step < 2 else "last")
            for i, (spec, ids) in enumerate(zip(specs, pieces, strict=True))
        ]
        with adapters(bundle, lora):
            assert bundle.native.supports(chunks)
            want, want_slices = torch_step(bundle, chunks, caches[0])
            got, got_slices = bundle.native.forward(chunks, caches[1], BLOCK)
        if lora and step == 0:  # the adapters change the adapted shapes' logits, not full's
            plain, _ = bundle.native.forward(chunks, caches[1].clone(), BLOCK)
            assert torch.equal(plain[got_slices[0]], got[got_slices[0]])
            assert (plain[got_slices[1]] - got[got_slices[1]]).abs().max() > 1e-3
        for a, b in zip(want_slices, got_slices, strict=True):
            ref, out = want[a], got[b]
            assert ref.shape == out.shape
            assert (ref - out).abs().max().item() <= 1e-4 * ref.abs().max().item()
        for i, ids in enumerate(pieces):
            done[i] += len(ids)
    # the caches hold the same K/V in every slot the tables use
    used = torch.tensor([b * BLOCK + o for t in tables for lt in t for b in lt for o in range(4)])
    assert torch.allclose(caches[0][used], caches[1][used], atol=1e-5)


@contextlib.contextmanager
def switched(switch: str, allow: bool):
    """The extension's `switch` (use_onednn, use_avx512_attention, ...) set, then restored."""
    setter = getattr(build.load(), switch)
    before = setter(allow)
    try:
        yield
    finally:
        setter(before)


def onednn(allow: bool):
    """The native step with (or without) oneDNN for the dense linears of prefill-sized steps."""
    return switched("use_onednn", allow)


def avx512_attention(allow: bool):
    """The tiled attention at 16 lanes (where the CPU has AVX-512), or the AVX2 tile."""
    return switched("use_avx512_attention", allow)


@pytest.mark.parametrize(
    "dnn, wide", [(True, True), (False, True), (False, False)], ids=["onednn", "kernels", "avx2"]
)
def test_long_contexts_match_torch(bundle, dnn, wide):
    """Contexts past one 64-key pass of the tiled attention (its online softmax rescales), a
    prefill chunk over a long cached prefix, and decodes over it, at two shapes in one step; the
    prefill steps' 100+ rows run their linears on oneDNN (both widths' bands) or the kernels; the
    attention at 16 lanes where the CPU has AVX-512 (the qwen2 model's head_dim 32), and on AVX2."""
    if wide:  # the dispatch follows the CPU's flags
        wanted = {"avx512f", "avx512dq", "avx512vl"} <= cpu_flags()
        assert build.load().avx512_attention_active() == wanted
    with onednn(dnn), avx512_attention(wide):
        _long_contexts(bundle)


def _long_contexts(bundle):
    cfg = bundle.config
    caches = [kv_cache.allocate(cfg, 1024, BLOCK, torch.float32, torch.device("cpu")) for _ in "ab"]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (150, 77)]
    specs = [bundle.spec("full"), bundle.spec("d5-w0.75")]
    pool = BlockPool(BLOCK)
    tables = [pool.table(s, len(p) + 3) for s, p in zip(specs, prompts, strict=True)]
    plans = [[prompts[0][:100], prompts[1][:3]], [prompts[0][100:], prompts[1][3:]]]
    plans += [[[7 + k], [9 + k]] for k in range(3)]
    done = [0, 0]
    for pieces in plans:
        chunks = [
            SeqChunk(spec, ids, done[i], tables[i], "all")
            for i, (spec, ids) in enumerate(zip(specs, pieces, strict=True))
        ]
        want, want_slices = torch_step(bundle, chunks, caches[0])
        got, got_slices = bundle.native.forward(chunks, caches[1], BLOCK)
        for a, b in zip(want_slices, got_slices, strict=True):
            assert (want[a] - got[b]).abs().max().item() <= 1e-4 * want[a].abs().max().item()
        for i, ids in enumerate(pieces):
            done[i] += len(ids)


def test_bad_indices_are_refused(bundle):
    cfg = bundle.config
    cache = kv_cache.allocate(cfg, 16, BLOCK, torch.float32, torch.device("cpu"))
    spec = bundle.full
    table = [[0, 1] for _ in spec.layers]
    with pytest.raises(ValueError, match="too few blocks"):
        bundle.native.forward([SeqChunk(spec, [1] * 9, 0, table)], cache, BLOCK)
    table[2] = [0, 99]
    with pytest.raises(ValueError, match="block 99 of sequence 0 in layer 2"):
        bundle.native.forward([SeqChunk(spec, [1] * 6, 0, table)], cache, BLOCK)
    with pytest.raises(ValueError, match="out of vocab"):
        bundle.native.forward([SeqChunk(spec, [cfg.vocab_size], 0, table)], cache, BLOCK)


def bf16_prefill_step(model_dir, seed: int):
    """A bf16 bundle with a random pack and one 70-row step of the five shapes' prompts (more
    rows than an x tile and than oneDNN's threshold, fewer, a decode; every band non-empty)."""
    base = load_bundle(model_dir, dtype="float32", cpu_kernels="torch")
    bundle = load_bundle(model_dir, pack=random_pack(base.pack, seed=5), dtype="bfloat16")
    g = torch.Generator().manual_seed(seed)
    lengths = [40, 1, 17, 9, 3]
    vocab = bundle.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    specs = [bundle.spec(s) for s in SHAPES]
    pool = BlockPool(BLOCK)
    tables = [pool.table(s, n) for s, n in zip(specs, lengths, strict=True)]
    chunks = [SeqChunk(s, p, 0, t, "all") for s, p, t in zip(specs, prompts, tables, strict=True)]
    return bundle, chunks


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_amx_tiles_match_the_avx2_step_in_bf16(tiny_llama_dir, lora):
    """bf16 weights on AMX tiles (x as two bf16 halves) against the AVX2 kernels (fp32 x)."""
    ext = build.load()
    if not ext.amx_supported():
        pytest.skip("this CPU has no AMX-BF16")
    bundle, chunks = bf16_prefill_step(tiny_llama_dir, seed=1)
    cfg = bundle.config
    logits = {}
    for amx in (True, False):
        cache = kv_cache.allocate(cfg, 512, BLOCK, torch.float32, torch.device("cpu"))
        before = ext.use_amx(amx)
        try:
            with adapters(bundle, lora), onednn(False):  # 70 rows: a prefill-sized step
                logits[amx], _ = bundle.native.forward(chunks, cache, BLOCK)
        finally:
            ext.use_amx(before)
    scale = logits[False].abs().max().item()
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_onednn_prefill_matches_the_kernels_in_bf16(tiny_llama_dir, lora):
    """A prefill-sized bf16 step of five shapes: oneDNN's linears (bf16 activations, as the torch
    path) against the native kernels (fp32 activations), within bf16 rounding."""
    if not cpu_has_native_bf16():
        pytest.skip("bf16 weights stay on the native kernels without native bf16")
    bundle, chunks = bf16_prefill_step(tiny_llama_dir, seed=2)
    cfg = bundle.config
    logits = {}
    for dnn in (True, False):
        cache = kv_cache.allocate(cfg, 512, BLOCK, torch.float32, torch.device("cpu"))
        with adapters(bundle, lora), onednn(dnn):
            logits[dnn], _ = bundle.native.forward(chunks, cache, BLOCK)
    scale = logits[False].abs().max().item()
    err = (logits[True] - logits[False]).abs().max().item()
    assert 0 < err <= 1e-2 * scale  # 0 would mean oneDNN never ran (seen: 4e-3)
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean().item()
    assert agree >= 0.9  # a random tiny model has near ties (seen: 97-99 %)


def test_engine_greedy_tokens_equal_torch_path(tiny_llama_dir, tokenizer):
    base = load_bundle(tiny_llama_dir, dtype="float32", cpu_kernels="torch")
    pack = random_pack(base.pack, seed=2)
    outputs = {}
    for kernels in ("torch", "native"):
        bundle = load_bundle(tiny_llama_dir, pack=pack, dtype="float32", cpu_kernels=kernels)
        assert (bundle.native is None) == (kernels == "torch")
        engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=16))
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        for i, shape in enumerate(SHAPES):
            prompt = tokenizer(f"Chapter {i}: it was a dark night and")["input_ids"]
            engine.add_request(prompt, params, shape=shape, request_id=f"r{i}")
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
        outputs[kernels] = done
    assert outputs["native"] == outputs["torch"]


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, caplog, tiny_llama_dir):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise OSError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(build, "_state", {})
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        bundle = load_bundle(tiny_llama_dir, dtype="auto")
        again = load_bundle(tiny_llama_dir, dtype="auto", cpu_kernels="auto")
    assert bundle.native is None and again.native is None
    warnings = [r for r in caplog.records if "torch ops serve" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()
    with pytest.raises(RuntimeError, match="do not build here"):
        load_bundle(tiny_llama_dir, cpu_kernels="native")
