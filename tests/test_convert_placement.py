"""Norm placements on existing models (normkit.convert.placement): Peri-LN, Mix-LN, LayerNorm-Scaling.

These are architecture changes, so the tests restate each placement's formula plainly on one block
(torch.nn.functional's norms, the block's own sublayers) and compare the converted block's output
with it; check the structure, that gradients reach every parameter, and state-dict save/load.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit
from normkit.bench.models import TinyGPT, TinyViT
from normkit.convert.placement import to_layernorm_scaling, to_mix_ln, to_peri_ln

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()


def _llama(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(layers: int = 4, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def _randomise(norms: list[nn.Module], seed: int = 1) -> None:
    """Non-trivial affines, so the formula tests see which parameter is used where."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


def _ln(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    return TF.layer_norm(x, (x.shape[-1],), m.weight, m.bias, m.eps)


def _rms(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + m.variance_epsilon) * m.weight


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))

# ------------------------------------------------------------------------------------------ formulas on one block


def test_peri_ln_gpt2_block_formula():
    model = to_peri_ln(_gpt2()).model
    blk = model.transformer.h[1]
    _randomise([blk.ln_1, blk.ln_2, blk.attn_out_norm, blk.mlp_out_norm])
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = x + _ln(blk.attn(_ln(x, blk.ln_1))[0], blk.attn_out_norm)  # x + Norm_out(F(Norm_in(x)))
        want = h + _ln(blk.mlp(_ln(h, blk.ln_2)), blk.mlp_out_norm)
        torch.testing.assert_close(blk(x), want)


def test_peri_ln_llama_block_formula_with_rotary_positions():
    model = to_peri_ln(_llama()).model
    blk = model.model.layers[2]
    assert type(blk.attn_out_norm).__name__ == "LlamaRMSNorm"  # the block's own norm class
    _randomise([blk.input_layernorm, blk.post_attention_layernorm, blk.attn_out_norm, blk.mlp_out_norm])
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    pos = model.model.rotary_emb(x, torch.arange(7)[None])
    with torch.no_grad():
        a = blk.self_attn(hidden_states=_rms(x, blk.input_layernorm), position_embeddings=pos, attention_mask=None)[0]
        h = x + _rms(a, blk.attn_out_norm)
        want = h + _rms(blk.mlp(_rms(h, blk.post_attention_layernorm)), blk.mlp_out_norm)
        torch.testing.assert_close(blk(x, position_embeddings=pos, attention_mask=None), want)


def test_mix_ln_post_block_formula_and_pre_blocks_unchanged():
    ref = _gpt2(layers=8)
    model = to_mix_ln(ref, alpha=0.25, inplace=False).model
    placed = [getattr(b, "placement", "pre") for b in model.transformer.h]
    assert placed == ["post"] * 2 + ["pre"] * 6  # k = floor(0.25 * 8)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    blk = model.transformer.h[0]
    _randomise([blk.ln_1, blk.ln_2])
    with torch.no_grad():
        h = _ln(x + blk.attn(x)[0], blk.ln_1)  # Norm1(x + Attn(x))
        torch.testing.assert_close(blk(x), _ln(h + blk.mlp(h), blk.ln_2))
        torch.testing.assert_close(model.transformer.h[5](x), ref.transformer.h[5](x))  # a Pre-LN block: as before


def test_layernorm_scaling_on_llama_scales_by_inverse_sqrt_depth():
    model = _llama()
    report = to_layernorm_scaling(model)
    layers = model.model.layers
    assert isinstance(model.model.norm, nn.Module) and type(model.model.norm).__name__ == "LlamaRMSNorm"  # final: unscaled
    for ell, blk in enumerate(layers, start=1):
        for norm in (blk.input_layernorm, blk.post_attention_layernorm):
            assert isinstance(norm, normkit.RMSNormScaling) and norm.layer_index == ell
    assert sum("scaled by 1/sqrt(3)" in s.action for s in report) == 2
    assert sum("LlamaRMSNorm -> normkit RMSNorm (exact" in s.action for s in report) == 8
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    n = layers[2].input_layernorm
    with torch.no_grad():
        want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + n.eps) * n.weight / math.sqrt(3)
        torch.testing.assert_close(n(x), want)


def test_layernorm_scaling_on_gpt2_and_bench_vit():
    model = to_layernorm_scaling(_gpt2()).model
    assert [b.ln_2.layer_index for b in model.transformer.h] == [1, 2, 3, 4]
    assert all(isinstance(b.ln_1, normkit.LayerNormScaling) for b in model.transformer.h)
    vit = to_layernorm_scaling(TinyViT("layernorm", depth=3)).model
    assert [b.norm1.layer_index for b in vit.blocks] == [1, 2, 3]
    assert type(vit.norm) is normkit.LayerNorm


# ------------------------------------------------------------------------------------------ init, structure


def test_peri_ln_init_identity_and_calibrated():
    ref = _gpt2()
    with torch.no_grad():
        want = ref(IDS).logits
    plain = to_peri_ln(ref, inplace=False)
    blk = plain.model.transformer.h[0]
    assert torch.equal(blk.attn_out_norm.weight, torch.ones(32)) and torch.equal(blk.mlp_out_norm.bias, torch.zeros(32))
    assert "γ = 1" in plain[0].action
    calibrated = to_peri_ln(ref, calibration=IDS, inplace=False)
    assert "calibration" in calibrated[0].action

    def rel(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(IDS).logits - want).norm() / want.norm())

    # the calibrated start stays close to the original; γ = 1 rescales every sublayer output
    assert rel(calibrated.model) < 0.15 < rel(plain.model)


def test_peri_ln_calibration_accepts_keyword_batches():
    ref = _llama(layers=2)
    report = to_peri_ln(ref, calibration={"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}, inplace=False)
    assert not torch.equal(report.model.model.layers[0].attn_out_norm.weight, torch.ones(32))


def test_structure_and_generation_with_cache():
    ref = _llama()
    report = to_peri_ln(ref, inplace=False)
    assert report.blocks == "model.layers" and report.placement == "Peri-LN" and len(report) == 4
    assert "placement=peri" in repr(report.model.model.layers[0])
    assert isinstance(report.model.model.layers[0], type(ref.model.layers[0]))  # a subclass: isinstance still holds
    assert type(ref.model.layers[0]).__name__ == "LlamaDecoderLayer"  # inplace=False left the original alone
    out = report.model.generate(IDS[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    mix = to_mix_ln(_gpt2(), inplace=False).model
    assert mix.generate(IDS[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 7)


@pytest.mark.parametrize("alpha,k", [(0.0, 0), (0.25, 1), (0.5, 2), (0.74, 2), (1.0, 4)])
def test_mix_ln_k_is_floor_alpha_l(alpha, k):
    model = to_mix_ln(TinyViT("layernorm", depth=4), alpha=alpha).model
    assert [getattr(b, "placement", "pre") for b in model.blocks] == ["post"] * k + ["pre"] * (4 - k)


@pytest.mark.parametrize("verb", [to_peri_ln, to_mix_ln, to_layernorm_scaling], ids=lambda f: f.__name__)
@pytest.mark.parametrize("build", [_llama, _gpt2, lambda: TinyViT("layernorm", depth=4)], ids=["llama", "gpt2", "vit"])
def test_gradients_reach_every_parameter(verb, build):
    model = verb(build()).model.train()
    x = torch.randn(2, 1, 8, 8) if isinstance(model, TinyViT) else IDS
    out = model(x)
    getattr(out, "logits", out).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    if verb is to_peri_ln:
        blocks = model.blocks if isinstance(model, TinyViT) else (
            model.model.layers if hasattr(model, "model") else model.transformer.h)
        assert blocks[-1].mlp_out_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("verb", [to_peri_ln, to_mix_ln, to_layernorm_scaling], ids=lambda f: f.__name__)
def test_state_dict_save_load_into_a_model_converted_the_same_way(verb, tmp_path):
    model = verb(_gpt2()).model
    _randomise([m for m in model.modules() if isinstance(m, nn.LayerNorm)], seed=7)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = verb(_gpt2()).model
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_mix_ln_and_scaling_keep_the_original_keys():
    for verb in (to_mix_ln, to_layernorm_scaling):
        sd = verb(_gpt2()).model.state_dict()
        _gpt2().load_state_dict(sd)  # strict: same keys and shapes as the Pre-LN class
    peri = set(to_peri_ln(_gpt2()).model.state_dict()) - set(_gpt2().state_dict())
    assert peri == {f"transformer.h.{i}.{n}_out_norm.{p}" for i in range(4) for n in ("attn", "mlp") for p in ("weight", "bias")}


# ------------------------------------------------------------------------------------------ errors


def test_errors():
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\].*got 1.5"):
        to_mix_ln(_gpt2(), alpha=1.5)
    with pytest.raises(TypeError, match="no stack of supported blocks in Linear"):
        to_peri_ln(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        to_layernorm_scaling("llama")
    peri = to_peri_ln(_gpt2()).model
    with pytest.raises(ValueError, match="already has placement='peri'"):
        to_mix_ln(peri)
    with pytest.raises(TypeError, match="crossattention"):
        to_peri_ln(_gpt2(add_cross_attention=True))


# ------------------------------------------------------------------------------------------ normkit's builders


@pytest.mark.parametrize("cls", [TinyViT, TinyGPT])
def test_bench_builders_take_a_placement(cls):
    x = torch.randn(2, 1, 8, 8) if cls is TinyViT else torch.randint(0, 64, (2, 9))
    for placement, want in (("pre", ["pre"] * 4), ("peri", ["peri"] * 4), ("mix", ["post"] + ["pre"] * 3)):
        torch.manual_seed(0)
        model = cls("rmsnorm", depth=4, placement=placement)
        assert [getattr(b, "placement", "pre") for b in model.blocks] == want
        assert model(x).shape[0] == 2
    assert isinstance(cls("layernorm", placement="peri").blocks[0].attn_out_norm, normkit.LayerNorm)
    with pytest.raises(ValueError, match="placement must be one of"):
        cls("layernorm", placement="sandwich")


def test_tiny_gpt_is_causal():
    model = TinyGPT("layernorm", placement="peri").eval()
    ids = torch.randint(0, 64, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5])  # the past does not see the future


def test_readme_section_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### Exact Pre-RMSNorm / Pre-CRMSNorm, and where the norms sit", 1)[1]
    namespace: dict = {}
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (placements)", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["crms_diff"] < 1e-4
    assert [getattr(b, "placement", "pre") for b in namespace["mix"].model.model.layers] == ["post", "pre", "pre", "pre"]
    assert namespace["crms"].model.transformer.wte.weight.shape == (100, 63)


class _TupleLayer(nn.Module):
    """A Llama-style layer as in transformers 4.x: the model reads ``layer(...)[0]``."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(4), nn.LayerNorm(4)
        self.self_attn, self.mlp = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return (h + self.mlp(self.post_attention_layernorm(h)),)


@pytest.mark.parametrize("verb", [to_peri_ln, to_mix_ln])
def test_tuple_returning_hf_blocks_are_refused(verb):
    """Returning a tensor where the model indexes [0] would silently keep only the first batch element."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([_TupleLayer() for _ in range(4)]))
    with pytest.raises(TypeError, match="returns tuple"):
        verb(model)
