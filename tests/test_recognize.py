"""The shared norm recognition on tiny transformers models (from configs, random weights, no download):
every model-walking helper finds their norms, and RMSNorm's ``casting`` reproduces their bf16/fp16 rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from normkit.adapt import TestTimeAdapter, train_only_norms
from normkit.adapt._norms import named_norms
from normkit.nn import apply_layernorm_scaling
from normkit.nn.recognize import exact_equivalent, recognise_norm

transformers = pytest.importorskip("transformers")
from normkit.integrations.transformers import apply_normkit  # noqa: E402

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _perturb_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or "ln" in n.lower():
                p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval()


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def _gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**SMALL, head_dim=8))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3))


# model → (builder, expected recognised kinds with counts): L layers of 2 pre-norms + final norm (+ QK-norms)
MODELS = {
    "llama": (_llama, {"third_party": 5}),
    "gemma": (_gemma, {"third_party": 5}),
    "qwen3": (_qwen3, {"third_party": 9}),  # + q_norm, k_norm per layer (per head_dim)
    "gpt2": (_gpt2, {"layernorm": 5}),
    "bert": (_bert, {"layernorm": 6}),  # embeddings + 2 per layer + the MLM head's transform
    "vit": (_vit, {"layernorm": 5}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recognition_on_tiny_hf_models(name):
    build, expected = MODELS[name]
    torch.manual_seed(0)
    model = _perturb_norms(build())
    kinds: dict[str, int] = {}
    for _, m in model.named_modules():
        k = recognise_norm(m)
        if k:
            kinds[k] = kinds.get(k, 0) + 1
    assert kinds == expected
    # the same norms are the "layer" norms of adapt, and each has an exact normkit equivalent
    layer = [m for _, m in named_norms(model, "layer")]
    assert len(layer) == sum(expected.values())
    for m in layer:
        new, note = exact_equivalent(m)
        assert new is not None, note


def test_exact_equivalent_picks_each_models_rounding_order():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    want = {LlamaRMSNorm: ("llama", 0.0), GemmaRMSNorm: ("gemma", 1.0), Olmo2RMSNorm: ("olmo2", 0.0)}
    for cls, (casting, offset) in want.items():
        new, note = exact_equivalent(cls(16, eps=1e-6))
        assert (new.casting, new.weight_offset) == (casting, offset), note


def _rms_reference(x, w, eps, order):
    """The three rounding orders, written out."""
    xf = x.float()
    xh = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    if order == "llama":  # normalise in fp32, cast, then multiply by the weight
        return w * xh.to(x.dtype)
    if order == "gemma":  # all in fp32 with (1 + w), then cast
        return (xh * (1.0 + w.float())).to(x.dtype)
    return (w * xh).to(x.dtype)  # olmo2: (w · x̂) in fp32, then cast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["llama", "gemma", "olmo2"])
def test_casting_orders_match_the_written_formulas(order, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=g) * 4).to(dtype)
    norm = normkit.RMSNorm(48, 1e-6, weight_offset=1.0 if order == "gemma" else 0.0, casting=order, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g).to(dtype))
        y = norm(x)
    ref = _rms_reference(x, norm.weight.detach(), 1e-6, order)
    diff = (y.float() - ref.float()).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.float().abs().max().item()
    assert y.dtype == dtype and diff <= ulp, (diff, ulp)
    # the float32 path (fast kernels) is the same function to float32 rounding
    y32 = normkit.RMSNorm(48, 1e-6, weight_offset=norm.weight_offset, casting=order)
    with torch.no_grad():
        y32.weight.copy_(norm.weight.float())
        torch.testing.assert_close(y32(x.float()), _rms_reference(x.float(), y32.weight, 1e-6, order))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama", "gemma", "qwen3"])
def test_patched_half_logits_equal_the_original_bitwise(name, dtype):
    torch.manual_seed(0)
    model = _perturb_norms(MODELS[name][0]()).to(dtype)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    report = apply_normkit(model, inplace=False)
    assert report.converted and all("casting=" in r.note for r in report.converted), str(report)
    with torch.no_grad():
        got = report.model(input_ids=IDS).logits
    assert got.dtype == dtype and torch.equal(got, want)


def test_layernorm_scaling_finds_llama_norms():
    torch.manual_seed(0)
    model = _perturb_norms(_llama())
    x = torch.randn(2, 3, 32)
    before = [layer.post_attention_layernorm(x) for layer in model.model.layers]
    done = apply_layernorm_scaling(model.model.layers)
    assert done == [("0.input_layernorm", 1), ("0.post_attention_layernorm", 1),
                    ("1.input_layernorm", 2), ("1.post_attention_layernorm", 2)]
    for ell, (layer, y) in enumerate(zip(model.model.layers, before), start=1):
        assert isinstance(layer.post_attention_layernorm, normkit.RMSNormScaling)
        torch.testing.assert_close(layer.post_attention_layernorm(x), y / ell**0.5)
    model(input_ids=IDS)  # still runs


def test_train_only_norms_and_tent_on_llama():
    torch.manual_seed(0)
    model = _perturb_norms(_llama())
    summary = train_only_norms(copy.deepcopy(model), norms="layer")
    assert summary.trainable == 5 * 32 and len(summary.names) == 5
    adapter = TestTimeAdapter(model, "tent", lr=1e-2)
    assert len(adapter.tent_parameters) == 5 and all(n.endswith("weight") for n in adapter.tent_parameters)
    before = adapter.model.model.norm.weight.detach().clone()
    out = adapter(input_ids=IDS)
    assert isinstance(out, transformers.modeling_outputs.ModelOutput) and out.logits.shape == (2, 7, 64)
    assert not out.logits.requires_grad
    assert not torch.equal(adapter.model.model.norm.weight, before)  # adapted
    adapter.reset()
    assert torch.equal(adapter.model.model.norm.weight, before)


def test_bad_casting_is_an_error():
    with pytest.raises(ValueError, match="casting must be None or one of"):
        normkit.RMSNorm(8, casting="bf16")
    with pytest.raises(ValueError, match="reduction_dims"):
        normkit.RMSNorm((2, 4), casting="llama", reduction_dims=1)
    norm = normkit.RMSNorm(8, casting="llama", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="mask"):
        norm(torch.randn(2, 8, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bool))
    assert exact_equivalent(nn.Linear(2, 2))[0] is None


def test_scale_offset_and_gamma_report_use_the_effective_scale():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from normkit.adapt import gamma_report
    from normkit.nn.recognize import scale_offset

    assert (scale_offset(GemmaRMSNorm(8)), scale_offset(LlamaRMSNorm(8))) == (1.0, 0.0)
    assert scale_offset(normkit.RMSNorm(8, weight_offset=1.0)) == 1.0 and scale_offset(nn.LayerNorm(8)) == 0.0
    torch.manual_seed(0)
    gemma = _gemma()  # GemmaRMSNorm weights start at 0: the effective scale 1 + w is 1, not ≈ 0
    report = gamma_report(gemma, norms="layer")
    assert report.total == 5 * 32 and report.near_zero == 0


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_class_patch_in_bf16_gives_the_original_logits(name):
    from normkit.integrations.transformers import patch_transformers_classes

    build = MODELS[name][0]
    torch.manual_seed(0)
    original = build().to(torch.bfloat16).eval()
    with patch_transformers_classes():
        torch.manual_seed(0)
        patched = build().to(torch.bfloat16).eval()
    assert isinstance(patched.model.norm, normkit.RMSNorm) and patched.model.norm.casting == name
    patched.load_state_dict(original.state_dict())
    with torch.no_grad():
        assert torch.equal(patched(input_ids=IDS).logits, original(input_ids=IDS).logits)
