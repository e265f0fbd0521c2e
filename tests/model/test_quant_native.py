"""q8 / q4 shapes in the native decoder: the grid, mixed-precision batches, the engine, options."""

from __future__ import annotations

import pytest
import torch

from elasticserve.engine import kv_cache
from elasticserve.engine.llm import LLM
from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
from elasticserve.engine.sampling import SamplingParams
from elasticserve.kernels.cpu import build
from elasticserve.model.adapters import LoraConfig, LoraExperts, effective_weights
from elasticserve.model.bundle import load_bundle
from elasticserve.model.quant import dequantize
from elasticserve.model.step_plan import BlockPool, SeqChunk

from ..conftest import requires_default_model

pytestmark = pytest.mark.skipif(
    build.load() is None, reason="the native CPU kernels do not build here"
)
BLOCK = 4
MIXED = ["full", "full-q8", "d3-w0.75-q4", "w0.5-q4", "d4-w0.5-q8", "d5-w0.75"]


@pytest.fixture(scope="module")
def qbundle(tiny_quant_dir):
    return load_bundle(tiny_quant_dir, dtype="float32", precisions="q8,q4")


def test_grid_has_every_precision_after_the_dense_shapes(qbundle):
    specs = qbundle.specs
    dense = [s for s in specs if not s.shape.precision]
    assert specs[: len(dense)] == dense  # the dense shapes keep their ids
    assert qbundle.quant.bits_per_weight("q8") == 10  # codes + fp32 scale and minimum per 32
    assert 6 < qbundle.quant.bits_per_weight("q4") < 10  # down read at q8
    for precision in ("q8", "q4"):
        bits = qbundle.quant.bits_per_weight(precision)
        quantized = [s for s in specs if s.shape.precision == precision]
        assert [(s.shape.depth, s.shape.width, s.layers) for s in quantized] == [
            (s.shape.depth, s.shape.width, s.layers) for s in dense
        ]
        for q, d in zip(quantized, dense, strict=True):
            assert q.weight_fraction == pytest.approx(d.weight_fraction * bits / 32)  # fp32 model
    assert qbundle.spec("full-q4").name == f"d{qbundle.config.num_layers}-w1.0-q4"
    assert qbundle.spec("full-q8").shape.precision == "q8"
    only_q8 = load_bundle(qbundle.model_dir, dtype="float32", precisions="q8")
    with pytest.raises(ValueError, match="precisions the model's dtype"):
        only_q8.spec("full-q4")


def _run(bundle, names, prompts, cache_rows=600):
    """Prefill then three decode steps of `prompts` at shapes `names`, in one batch."""
    cfg = bundle.config
    cache = kv_cache.allocate(cfg, cache_rows, BLOCK, torch.float32, torch.device("cpu"))
    specs = [bundle.spec(n) for n in names]
    pool = BlockPool(BLOCK)
    tables = [pool.table(s, len(p) + 4) for s, p in zip(specs, prompts, strict=True)]
    out = []
    steps = [prompts] + [[[7 + len(p) + k] for p in prompts] for k in range(3)]
    done = [0] * len(prompts)
    for pieces in steps:
        chunks = [
            SeqChunk(spec, ids, done[i], tables[i], "last")
            for i, (spec, ids) in enumerate(zip(specs, pieces, strict=True))
        ]
        logits, slices = bundle.native.forward(chunks, cache, BLOCK)
        out.append([logits[sl] for sl in slices])
        for i, ids in enumerate(pieces):
            done[i] += len(ids)
    return out


def _prompts(bundle, n):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, bundle.config.vocab_size, (3 + 2 * i,), generator=g).tolist()
        for i in range(n)
    ]


def test_mixed_precision_batch_equals_each_request_alone(qbundle):
    """Same greedy tokens, logits within fp32 rounding: on CPUs with AMX int8 a run of several
    rows of one precision (the extension's qamx_min_rows) sums its groups on tiles, fewer rows
    on VNNI, in another order."""
    prompts = _prompts(qbundle, len(MIXED))
    together = _run(qbundle, MIXED, prompts)
    for i, name in enumerate(MIXED):
        alone = _run(qbundle, [name], [prompts[i]])
        for step_all, step_one in zip(together, alone, strict=True):
            torch.testing.assert_close(step_all[i], step_one[0], rtol=1e-5, atol=3e-4)
            assert torch.equal(step_all[i].argmax(-1), step_one[0].argmax(-1))


def test_quantized_shapes_take_their_dense_siblings_adapter(qbundle):
    """In the native step a q8/q4 shape adds the adapter of the dense shape with its layers and
    widths; the full shape's siblings add none, as full."""
    torch.manual_seed(4)
    experts = LoraExperts(qbundle.config, qbundle.pack.widths, LoraConfig(rank=8), qbundle.specs)
    with torch.no_grad():
        for b in experts.b.values():
            b.normal_(0, 0.05)
    lora = effective_weights(experts, qbundle.specs, torch.float32, torch.device("cpu"))
    names = ["full-q4", "d3-w0.75", "d3-w0.75-q4", "d3-w0.75-q8"]
    ids = [qbundle.spec(n).id for n in names]
    assert ids[0] not in lora.routes
    assert lora.routes[ids[1]] == lora.routes[ids[2]] == lora.routes[ids[3]]
    assert all(slots[ids[2]] == -1 for slots in lora.slots), "no torch tables for q4"
    prompts = _prompts(qbundle, 1) * len(names)
    plain = _run(qbundle, names, prompts)
    qbundle.model.lora = lora
    try:
        adapted = _run(qbundle, names, prompts)
    finally:
        qbundle.model.lora = None
    for before, after in zip(plain, adapted, strict=True):
        assert torch.equal(before[0], after[0]), "full-q4 has no adapter"
        shifts = [(after[i] - before[i]).norm() / before[i].norm() for i in (1, 2, 3)]
        assert all(s > 1e-3 for s in shifts)
        # the same correction on the same layers: the q8 shift tracks the dense one closely
        dense_shift = after[1] - before[1]
        assert (after[3] - before[3] - dense_shift).norm() < 0.2 * dense_shift.norm()


def test_quantized_logits_track_the_dense_ones(qbundle):
    prompts = _prompts(qbundle, 1) * 3
    steps = _run(qbundle, ["full", "full-q8", "full-q4"], prompts)

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    for dense, q8, q4 in steps:  # random Gaussian weights: the worst case for a group's range
        assert error(q8, dense) < 0.05
        assert 4 * error(q8, dense) < error(q4, dense) < 0.3


def test_engine_greedy_tokens_of_a_mixed_batch_equal_each_alone(tiny_quant_dir):
    llm = LLM(tiny_quant_dir, dtype="float32", precisions="q8,q4")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = ["Hello there", "Once upon a time", "The cat", "A B C"]
    shapes = ["full-q4", "d5-w0.75-q8", "full", "w0.5-q4"]
    together = llm.generate(prompts, params, shape=shapes)
    for prompt, shape, out in zip(prompts, shapes, together, strict=True):
        alone = llm.generate(prompt, params, shape=shape)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_bad_precision_options_are_refused(tiny_quant_dir, tiny_llama_dir):
    with pytest.raises(ValueError, match="unknown precision"):
        load_bundle(tiny_quant_dir, dtype="float32", precisions="q3")
    with pytest.raises(ValueError, match="native CPU kernels"):
        load_bundle(tiny_quant_dir, dtype="float32", precisions="q4", cpu_kernels="torch")
    with pytest.raises(ValueError, match="whole groups of 32"):  # 8-wide heads
        load_bundle(tiny_llama_dir, dtype="float32", precisions="q4")


@requires_default_model
def test_default_model_q4_shape_reads_the_files_own_blocks():
    bundle = load_bundle(None, precisions="q4")
    quant, weights = bundle.quant, bundle.model.weights
    assert quant is not None and quant.source == "gguf"
    for layer in (0, len(weights.layers) - 1):
        q, w = quant.layers[layer], weights.layers[layer]
        for planes, dense in ((q.qkv, w.qkv), (q.gate, w.gate), (q.o, w.o_t.t())):
            assert planes.lo is None  # Q4_1: no residual plane
            assert torch.equal(dequantize(planes, "q4").to(dense.dtype), dense)
        assert q.down_requantized  # the pack's channel order splits Q4_1 blocks
    head = dequantize(quant.head, "q8").to(weights.lm_head.dtype)
    assert torch.equal(head, weights.lm_head)  # the file's Q8_0 embedding, exactly


def test_precision_sharing_lets_dense_and_quantized_siblings_share_a_prefix(qbundle):
    """Default "exact": a q4 shape never reads the dense shape's prefix. "precision": the same
    layers and widths at another precision reuse it; other widths still do not."""
    prompt = list(range(3, 40))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def cached(engine, shape):
        request_id = engine.add_request(prompt, greedy, shape)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id == request_id:
                    last = out
        return last.num_cached_tokens

    full_blocks = (len(prompt) - 1) // BLOCK * BLOCK
    exact = LLMEngine(qbundle, EngineConfig(block_size=BLOCK))
    shared = LLMEngine(qbundle, EngineConfig(block_size=BLOCK, prefix_cache_sharing="precision"))
    for engine in (exact, shared):
        assert cached(engine, "full") == 0
    assert cached(exact, "full-q4") == 0
    assert cached(shared, "full-q4") == full_blocks
    assert cached(shared, "full-q8") == full_blocks
    assert cached(shared, "w0.75-q4") == 0  # other widths: other K/V
    assert cached(shared, "w0.75") == full_blocks  # ... computed just before, at q4
    for engine in (exact, shared):
        assert engine.stats().kv_usage == 0.0
    with pytest.raises(ValueError, match="prefix_cache_sharing"):
        LLMEngine(qbundle, EngineConfig(prefix_cache_sharing="width"))
