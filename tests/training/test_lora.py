"""Shape-aware LoRA: routing, per-shape adapters in the serving path, fine-tuning, export, I/O."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve import EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.model.adapters import (
    LoraConfig,
    LoraExperts,
    effective_weights,
    load_adapters,
    save_adapters,
    shape_encoding,
)
from elasticserve.model.bundle import load_bundle
from elasticserve.model.lora import LINEARS, OUTPUT_PREFIX, LayerLora, bind_step
from elasticserve.model.shape_forward import shape_logits
from elasticserve.model.step_plan import SeqChunk, build_step
from elasticserve.training.export import ADAPTER_DIR, export_shape
from elasticserve.training.finetune import (
    FinetuneConfig,
    finetune,
    sample_batch,
    soft_cross_entropy,
)

from ..helpers import prefill_logits, random_pack

SHAPES = ["full", "d5-w0.75", "d3-w0.5", "d6-w0.625"]
CONFIG = LoraConfig(rank=4, experts=4, alpha=8.0)


def _experts(bundle, seed: int = 0) -> LoraExperts:
    """Experts with random B (fresh ones start at zero and would change nothing)."""
    torch.manual_seed(seed)
    experts = LoraExperts(bundle.config, bundle.pack.widths, CONFIG, bundle.specs)
    with torch.no_grad():
        for b in experts.b.values():
            b.normal_(0, 0.05)
    return experts


def _with_lora(bundle, experts: LoraExperts):
    bundle.model.lora = effective_weights(experts, bundle.specs, torch.float32, torch.device("cpu"))
    return bundle


@pytest.fixture(scope="module")
def pack_dir(tiny_llama_dir, tmp_path_factory):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    path = tmp_path_factory.mktemp("pack") / "tiny"
    random_pack(base.pack, seed=7).save(path)
    return path


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir, pack_dir):
    plain = load_bundle(tiny_llama_dir, pack=pack_dir, dtype="float32")
    return _with_lora(plain, _experts(plain))


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def test_gate_maps_each_shape_to_fixed_top2_experts(bundle):
    experts = _experts(bundle)
    weights, ids = experts.route(bundle.specs)
    again_w, again_ids = _experts(bundle).route(bundle.specs)  # same seed, fresh gate
    assert torch.equal(ids, again_ids) and torch.equal(weights, again_w)
    logits = experts.gate.mlp(
        torch.stack([shape_encoding(s, experts.widths) for s in bundle.specs])
    )
    assert torch.equal(ids, logits.topk(2, dim=-1).indices), "the two highest gate logits"
    assert torch.allclose(weights.sum(-1), torch.ones(len(bundle.specs)))
    assert len({tuple(r) for r in ids.tolist()}) > 2, "shapes do not all share one pair"
    routes = bundle.model.lora.routes
    assert 0 not in routes, "the full shape has no adapter"
    for spec in bundle.specs[1:]:
        assert routes[spec.id][0] == tuple(ids[spec.id].tolist())


def test_effective_adapter_equals_per_token_mixture(bundle):
    experts = _experts(bundle)
    specs = [bundle.spec(s) for s in ["d6-w0.875", "d5-w0.75", "d3-w0.5"]]
    layer, hd = 5, bundle.config.head_dim  # kept by every shape above
    segments, start = [], 0  # (start, end, shape id, attn, mlp)
    for spec, rows in zip(specs, [3, 2, 4], strict=True):
        segments.append((start, start + rows, spec.id, spec.heads[layer] * hd, spec.mlp[layer]))
        start += rows
    per_layer = [[s[1:] for s in segments] if i == layer else None for i in range(layer + 1)]
    bound = bind_step(bundle.model.lora, per_layer, kernels=False)[layer]
    assert bound is not None
    weights, ids = experts.route(specs)
    torch.manual_seed(1)
    for name in LINEARS:
        a_all, b_all = experts.a[f"{layer}_{name}"], experts.b[f"{layer}_{name}"]
        x = torch.randn(start, a_all.shape[1])
        y = torch.zeros(start, b_all.shape[2])
        bound.add(name, y, x)
        expected = torch.zeros_like(y)
        for i, (lo, hi, _, attn, mlp) in enumerate(segments):
            width = attn if name in ("q", "o") else mlp
            n = width if name in OUTPUT_PREFIX else b_all.shape[2]
            k = a_all.shape[1] if name in OUTPUT_PREFIX else width
            for t in range(lo, hi):  # one token at a time, expert by expert
                for g, e in zip(weights[i].tolist(), ids[i].tolist(), strict=True):
                    term = (x[t, :k] @ a_all[e, :k]) @ b_all[e, :, :n]
                    expected[t, :n] += g * experts.scale * term.detach()
        assert (y - expected).abs().max().item() <= 1e-4, name


def test_serving_forward_equals_training_forward(bundle, tokenizer):
    experts = _experts(bundle)
    texts = ["Persuasion, by Jane Austen", "Sir Walter Elliot", "Chapter 1", "Anne"]
    prompts, specs = _ids(tokenizer, texts), [bundle.spec(s) for s in SHAPES]
    served = prefill_logits(bundle, prompts, specs)  # one mixed-shape step
    for prompt, spec, logits in zip(prompts, specs, served, strict=True):
        ids = torch.tensor([prompt])
        trained = shape_logits(bundle.model, spec, ids, bundle.biases, experts.mixture(spec))[0]
        assert (trained - logits).abs().max().item() <= 1e-4, spec.name
    plain = shape_logits(bundle.model, specs[1], torch.tensor([prompts[1]]), bundle.biases)[0]
    assert (plain - served[1]).abs().max().item() > 1e-2, "the adapter changes the shape"


@pytest.mark.skipif(
    not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
def test_kernel_path_equals_torch_path(bundle, tokenizer, monkeypatch):
    launches, original = [], LayerLora._add_kernels

    def spy(self, name, *args):
        launches.append(name)
        return original(self, name, *args)

    monkeypatch.setattr(LayerLora, "_add_kernels", spy)
    prompts = _ids(tokenizer, ["Persuasion", "Chapter 1", "Sir"])
    specs = [bundle.spec(s) for s in ["full", "d5-w0.75", "d3-w0.5"]]
    torch_path = prefill_logits(bundle, prompts, specs)
    assert not launches
    kernel_path = prefill_logits(bundle, prompts, specs, kernels=True)
    assert set(launches) == set(LINEARS), "the segmented LoRA kernels ran"
    for a, b in zip(torch_path, kernel_path, strict=True):
        assert (a - b).abs().max().item() <= 1e-4


def test_mixed_batch_with_adapters_equals_each_alone(bundle, tokenizer):
    texts = ["It is a truth universally", "Emma Woodhouse, handsome", "Sir Walter", "Catherine"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=16))  # chunked prefill too
    ids = [engine.add_request(t, params, s) for t, s in zip(texts, SHAPES, strict=True)]
    together = _drain(engine)
    for text, shape, rid in zip(texts, SHAPES, ids, strict=True):
        alone_engine = LLMEngine(bundle)
        alone_id = alone_engine.add_request(text, params, shape)
        assert _drain(alone_engine)[alone_id] == together[rid], shape


def _drain(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", ["d5-w0.75", "d3-w0.5"])
def test_export_loads_in_transformers_and_peft(
    arch, shape, tiny_llama_dir, tiny_qwen2_dir, tokenizer, tmp_path
):
    from peft import PeftModel

    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    base = load_bundle(model_dir, dtype="float32")
    bundle = load_bundle(model_dir, pack=random_pack(base.pack, seed=3), dtype="float32")
    bundle = _with_lora(bundle, _experts(bundle, seed=2))
    spec = bundle.spec(shape)
    out = export_shape(bundle, spec, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, out / ADAPTER_DIR)
    ids = _ids(tokenizer, ["It is a truth universally acknowledged, that a single man"])[0]
    ref = model(torch.tensor([ids])).logits[0]
    ours = prefill_logits(bundle, [ids], [spec])[0]
    assert (ref - ours).abs().max().item() <= 1e-3


def test_adapters_round_trip_through_the_pack(bundle, tiny_llama_dir, pack_dir, tmp_path):
    experts = _experts(bundle, seed=4)
    path = tmp_path / "with-lora"
    bundle.pack.save(path)
    save_adapters(experts, path, {"note": "test"})
    loaded, meta = load_adapters(path, bundle.config, bundle.pack.widths)
    assert meta == {"note": "test"}
    for a, b in zip(experts.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with_lora = load_bundle(tiny_llama_dir, pack=path, dtype="float32")
    without = load_bundle(tiny_llama_dir, pack=path, dtype="float32", lora=False)
    assert without.model.lora is None and with_lora.model.lora is not None
    assert (
        with_lora.model.lora.routes
        == effective_weights(experts, bundle.specs, torch.float32, torch.device("cpu")).routes
    )
    with pytest.raises(ValueError, match="widths"):
        load_adapters(path, bundle.config, [1.0, 0.5])
    if with_lora.native is not None:  # the native step mixes the experts: no torch tables
        assert with_lora.model.lora.tables == [] and with_lora.model.lora.experts
        torch_only = load_bundle(tiny_llama_dir, pack=path, dtype="float32", cpu_kernels="torch")
        assert torch_only.model.lora.tables, "the torch step gets its per-shape tables"
        small = with_lora.spec("d3-w0.5")
        step = build_step(
            [SeqChunk(small, [1, 2, 3], logits="last")],
            bundle.config.num_layers,
            bundle.config.head_dim,
            2 * bundle.config.kv_size,
            16,
            with_lora.biases,
        )
        with pytest.raises(RuntimeError, match="native CPU step only"):
            with_lora.model.forward(step)
    half = tmp_path / "bf16"
    bundle.pack.save(half)
    save_adapters(experts, half, {}, torch.bfloat16)
    assert (half / "lora.safetensors").stat().st_size < 0.6 * (
        path / "lora.safetensors"
    ).stat().st_size
    rounded, _ = load_adapters(half, bundle.config, bundle.pack.widths)
    for key in experts.a:
        assert rounded.a[key].dtype == torch.float32
        assert torch.equal(rounded.a[key], experts.a[key].detach().bfloat16().float())
        assert torch.equal(rounded.b[key], experts.b[key].detach().bfloat16().float())


def _distill_kl(bundle, experts, spec, ids) -> float:
    """The distillation loss less the teacher's entropy (its floor): KL(teacher || student)."""
    with torch.no_grad():
        teacher = shape_logits(bundle.model, bundle.full, ids, bundle.biases).softmax(-1)
        student = shape_logits(bundle.model, spec, ids, bundle.biases, experts.mixture(spec))
        entropy = -(teacher * teacher.clamp_min(1e-30).log()).sum(-1).mean()
        return (soft_cross_entropy(student, teacher) - entropy).item()


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> list[int]:
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "corpus", "austen")
    path = os.path.join(root, "emma.txt")
    if not os.path.isfile(path):  # any English text will do
        return tokenizer(" ".join([__doc__ or ""] * 200))["input_ids"]
    with open(path, encoding="utf-8") as f:
        return tokenizer(f.read(60_000))["input_ids"]


def test_short_finetune_lowers_distillation_loss_of_small_shape(peaked_bundle, text_ids, tmp_path):
    bundle = peaked_bundle
    held = sample_batch(torch.tensor(text_ids), 4, 32, seed=12345)  # fixed, unlike training's
    config = FinetuneConfig(
        steps=12, lr=1e-2, lora=CONFIG, seq_len=32, batch=4, random_shapes=1, eval_every=0
    )
    result = finetune(bundle, text_ids, [], tmp_path / "out", config, progress=False)
    smallest = min(bundle.specs, key=lambda s: s.weight_fraction)
    fresh = LoraExperts(bundle.config, bundle.pack.widths, CONFIG)  # B = 0: no adapter
    before = _distill_kl(bundle, fresh, smallest, held)
    after = _distill_kl(bundle, result.experts, smallest, held)
    assert after < 0.5 * before, (before, after)
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_resume_continues_the_step_count(bundle, text_ids, tmp_path):
    saved, bundle.model.lora = bundle.model.lora, None
    config = FinetuneConfig(
        steps=2, lora=CONFIG, seq_len=16, batch=2, random_shapes=1, eval_every=0, checkpoint_every=1
    )
    ckpt = tmp_path / "ckpt.pt"
    try:
        first = finetune(bundle, text_ids, [], tmp_path / "a", config, ckpt, progress=False)
        longer = replace(config, steps=4)
        resumed = finetune(bundle, text_ids, [], tmp_path / "b", longer, ckpt, True, progress=False)
    finally:
        bundle.model.lora = saved
    assert (first.start_step, first.steps) == (0, 2)
    assert (resumed.start_step, resumed.steps) == (2, 4)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
