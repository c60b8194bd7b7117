"""Exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (normkit.convert.crms; Jiang et al. 2023, arXiv:2305.14858).

The reference is the untouched Pre-LN model: its logits, computed before the conversion, must be
reproduced to float64 rounding (1e-9) and fp32 rounding (1e-4). The mechanism is restated plainly
too: after ``to_pre_rmsnorm`` the residual stream has zero mean over the hidden dim at every
norm's input (so LayerNorm = RMSNorm there), and after ``to_pre_crmsnorm`` every norm's input is
(d − 1)-wide and its decompression ``[x, −Σx]`` is the Pre-RMSNorm model's stream.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.bench.e2e import ViT as E2EViT
from normkit.bench.models import TinyGPT, TinyViT
from normkit.convert.crms import to_pre_crmsnorm, to_pre_rmsnorm

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

transformers.logging.set_verbosity_error()
VERBS = [to_pre_rmsnorm, to_pre_crmsnorm]


def _random_ln(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial LayerNorm affines (γ ≠ 1, β ≠ 0) so the folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model


def _gpt2(seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=24, n_layer=2, n_head=3, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0, **kw)
    return _random_ln(GPT2LMHeadModel(cfg), seed)


def _hf_vit(seed: int, qkv_bias: bool = True, cls=ViTForImageClassification, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48, image_size=8,
                    patch_size=4, num_labels=5, qkv_bias=qkv_bias)
    return _random_ln(cls(cfg, **kw), seed)


def _no_bias(model: nn.Module) -> nn.Module:
    """Drop every linear/conv bias (a bias-free variant of the same architecture)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.bias = None
    return model


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


CASES = {
    "gpt2": (lambda s: _gpt2(s), lambda s, g: torch.randint(0, 40, (2, 5 + 3 * s), generator=g)),
    "gpt2_seqcls": (lambda s: _random_ln(GPT2ForSequenceClassification(
        GPT2Config(n_embd=24, n_layer=2, n_head=3, vocab_size=40, n_positions=16, num_labels=3, pad_token_id=0)), s),
        lambda s, g: torch.randint(1, 40, (1, 7), generator=g)),
    "hf_vit": (lambda s: _hf_vit(s), lambda s, g: torch.randn(2 + s, 3, 8, 8, generator=g)),
    "hf_vit_nobias": (lambda s: _hf_vit(s, qkv_bias=False), lambda s, g: torch.randn(3, 3, 8, 8, generator=g)),
    "hf_vit_pooler": (lambda s: _hf_vit(s, cls=ViTModel, add_pooling_layer=True),
                      lambda s, g: torch.randn(2, 3, 8, 8, generator=g)),
    "bench_tinyvit": (lambda s: _random_ln(TinyViT("layernorm", dim=24, heads=3), s),
                      lambda s, g: torch.randn(4, 1, 8, 8, generator=g)),
    "e2e_vit_nobias": (lambda s: _random_ln(_no_bias(E2EViT(img=8, dim=24, depth=2, heads=3)), s),
                       lambda s, g: torch.randn(2, 3, 8, 8, generator=g)),
    "bench_tinygpt": (lambda s: _random_ln(TinyGPT("layernorm", dim=24, heads=3), s),
                      lambda s, g: torch.randint(0, 64, (2, 6 + s), generator=g)),
    "vit_no_ln_affine": (lambda s: TinyViT(lambda c: nn.LayerNorm(c, elementwise_affine=False), dim=24, heads=3),
                         lambda s, g: torch.randn(2, 1, 8, 8, generator=g)),
}


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.pooler_output if hasattr(out, "pooler_output") and out.pooler_output is not None else _logits(model, x)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("verb", VERBS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("seed", [0, 1])
def test_float64_logits_equal_original(case, verb, seed):
    build, inputs = CASES[case]
    model = build(seed).double().eval()
    x = inputs(seed, torch.Generator().manual_seed(seed))
    x = x.double() if x.is_floating_point() else x
    ref = _pooled(model, x)
    report = verb(model, inplace=False)
    out = _pooled(report.model, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    assert not any(isinstance(m, nn.LayerNorm) for m in report.model.modules())
    want = normkit.CRMSNorm if verb is to_pre_crmsnorm else normkit.RMSNorm
    norms = [m for m in report.model.modules() if isinstance(m, (normkit.RMSNorm, normkit.CRMSNorm))]
    assert norms and all(type(m) is want for m in norms)
    # the original is untouched (inplace=False)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())


@pytest.mark.parametrize("case", ["gpt2", "hf_vit", "e2e_vit_nobias"])
@pytest.mark.parametrize("verb", VERBS, ids=lambda f: f.__name__)
def test_float32_logits_equal_original(case, verb):
    build, inputs = CASES[case]
    model = build(2).eval()
    x = inputs(1, torch.Generator().manual_seed(3))
    ref = _logits(model, x)
    torch.testing.assert_close(_logits(verb(model).model, x), ref, rtol=0, atol=1e-4)


def _norm_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
             for m in model.modules() if isinstance(m, (normkit.RMSNorm, normkit.CRMSNorm))]
    _logits(model, x)
    for h in hooks:
        h.remove()
    return seen


def test_stream_is_zero_mean_and_crms_stream_is_its_compression():
    """The mechanism, restated: Pre-RMSNorm's stream has zero mean; Pre-CRMSNorm's is its first d − 1 coordinates."""
    model = _gpt2(0).double().eval()
    x = torch.randint(0, 40, (2, 9))
    rms_in = _norm_inputs(to_pre_rmsnorm(model, inplace=False).model, x)
    crms_in = _norm_inputs(to_pre_crmsnorm(model, inplace=False).model, x)
    assert len(rms_in) == len(crms_in) == 5  # ln_1, ln_2 per block, ln_f
    for h, z in zip(rms_in, crms_in):
        assert h.shape[-1] == 24 and z.shape[-1] == 23
        torch.testing.assert_close(h.mean(-1), torch.zeros_like(h[..., 0]), rtol=0, atol=1e-12)
        torch.testing.assert_close(z, h[..., :-1], rtol=0, atol=1e-12)
        torch.testing.assert_close(-z.sum(-1), h[..., -1], rtol=0, atol=1e-12)


def test_gpt2_head_untied_and_stays_untied():
    model = _gpt2(0).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    report = to_pre_crmsnorm(model)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.config.tie_word_embeddings is False
    assert any(s.name == "lm_head" and "untied" in s.action for s in report)
    model.tie_weights()  # transformers must not tie them back
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.transformer.wte.weight.shape == (40, 23) and model.lm_head.weight.shape == (40, 23)


def test_gpt2_generation_with_cache_unchanged():
    model = _gpt2(1).double().eval()
    ids = torch.randint(1, 40, (1, 4))
    want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = to_pre_crmsnorm(model, inplace=False).model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_bare_body_keeps_final_affine_and_crms_refuses():
    """GPT2Model's ln_f output is the model's output: Pre-RMSNorm keeps its affine; Pre-CRMSNorm cannot drop a coordinate."""
    torch.manual_seed(0)
    body = _random_ln(GPT2Model(GPT2Config(n_embd=24, n_layer=1, n_head=3, vocab_size=40, n_positions=16)), 0).double().eval()
    x = torch.randint(0, 40, (2, 6))
    ref = _logits(body, x)
    report = to_pre_rmsnorm(body, inplace=False)
    assert report.model.ln_f.weight is not None and report.model.ln_f.bias is not None
    torch.testing.assert_close(_logits(report.model, x), ref, rtol=0, atol=1e-9)
    with pytest.raises(TypeError, match="ln_f.*no linear reads it"):
        to_pre_crmsnorm(body)


def test_report_lists_every_change_and_dropout_note():
    report = to_pre_rmsnorm(_gpt2(0), inplace=False)
    names = {s.name for s in report}
    for n in ("transformer.wte", "transformer.wpe", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj",
              "transformer.h.0.ln_1", "transformer.ln_f", "lm_head"):
        assert n in names
    assert report.architecture.startswith("GPT-2") and report.target == "Pre-RMSNorm"
    assert any("dropout" in n for n in report.notes)
    assert "transformer.h.0.ln_1: LayerNorm -> RMSNorm" in str(report)


def test_crms_model_trains_and_converted_parameters_get_gradients():
    model = to_pre_crmsnorm(TinyViT("layernorm", dim=24, heads=3)).model.train()
    loss = model(torch.randn(4, 1, 8, 8)).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unsupported_models_get_clear_errors():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=30))
    with pytest.raises(TypeError, match="unsupported architecture LlamaForCausalLM"):
        to_pre_rmsnorm(llama)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        to_pre_crmsnorm("gpt2")
    rms = to_pre_rmsnorm(TinyViT("layernorm", dim=24, heads=3)).model
    with pytest.raises(TypeError, match="expects a Pre-LN model.*blocks.0.norm1.*RMSNorm"):
        to_pre_crmsnorm(rms)  # converts from the Pre-LN original only
    stray = TinyViT("layernorm", dim=24, heads=3)
    stray.blocks[0].mlp.insert(1, nn.LayerNorm(48))  # a LayerNorm inside the MLP: not a pre-norm
    with pytest.raises(TypeError, match="outside the recognised pre-norm layout.*blocks.0.mlp.1"):
        to_pre_rmsnorm(stray)
    scaled = TinyViT("layernorm", dim=24, heads=3)
    scaled.blocks[0].ls1 = nn.Identity()  # e.g. timm's LayerScale: an unknown child could break the zero mean
    with pytest.raises(TypeError, match="plain pre-LN block"):
        to_pre_rmsnorm(scaled)


def test_measure_speedup_smoke():
    from normkit.convert.crms import measure_speedup

    rows = measure_speedup(TinyViT("layernorm", dim=24, heads=3), torch.randn(2, 1, 8, 8), reps=1, warmup=0)
    assert set(rows) == {"pre_ln", "pre_rms", "pre_crms"}
    assert rows["pre_ln"]["infer_speedup"] == 1.0 and all(r["train_ms"] > 0 for r in rows.values())


def test_the_equivalence_is_of_the_model_not_of_training():
    """Same logits at conversion, but SGD on the converted parameters (LN affines folded into the readers,
    the writers' last row implied) is another trajectory: the docstring must not promise equal training."""
    import copy

    torch.manual_seed(0)
    pre_ln = TinyViT("layernorm", dim=24, heads=3).double().eval()
    crms = to_pre_crmsnorm(copy.deepcopy(pre_ln)).model.eval()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    torch.testing.assert_close(crms(x), pre_ln(x), rtol=0, atol=1e-9)
    for net in (pre_ln, crms):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert (crms(x) - pre_ln(x)).abs().max() > 1e-2
    note = " ".join(to_pre_rmsnorm(TinyViT("layernorm", dim=24, heads=3)).notes)
    assert "training equivalent" not in note and "re-centre them after each step" in note
