"""LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in LLMs", arXiv:2502.05795).

Equation (official lmsdss/LayerNorm-Scaling, modeling_llama.py, NORM_TYPE=LNS), block index i = 0, 1, ...:

  h = h + Attn( norm1(h) * 1/sqrt(i + 1) )
  h = h + MLP ( norm2(h) * 1/sqrt(i + 1) )
  final norm: unscaled

so with the 1-based depth l = i + 1:  LNS(x) = (LN(x) * gamma + beta) / sqrt(l).
"""

import math

import pytest
import torch

from normkit.nn.layer_norm import LayerNorm, LayerNorm2d
from normkit.nn.layer_norm_scaling import LayerNormScaling, RMSNormScaling, apply_layernorm_scaling

D = torch.float64


def ref_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("ell", [1, 2, 7])
def test_forward_against_equation(ell):
    m = LayerNormScaling(6, layer_index=ell).double()
    _randomize(m)
    x = torch.randn(3, 4, 6, dtype=D)
    torch.testing.assert_close(m(x), ref_ln(x, m.weight, m.bias, 1e-5) / math.sqrt(ell))
    r = RMSNormScaling(6, ell, eps=1e-6).double()
    _randomize(r)
    torch.testing.assert_close(r(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * r.weight / math.sqrt(ell))
    res = torch.randn_like(x)
    y, s = m.forward_add(x, res)
    torch.testing.assert_close(s, x + res)
    torch.testing.assert_close(y, m(x + res))
    assert f"layer_index={ell}" in repr(m)


def test_state_dict_is_torchs_both_ways():
    ours, theirs = LayerNormScaling(8, layer_index=3), torch.nn.LayerNorm(8)
    _randomize(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8)
    torch.testing.assert_close(ours(x), theirs(x) / math.sqrt(3))
    torch.nn.LayerNorm(8).load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours, torch.nn.LayerNorm) and isinstance(RMSNormScaling(8), torch.nn.RMSNorm)
    torch.nn.RMSNorm(8).load_state_dict(RMSNormScaling(8, 2).state_dict(), strict=True)


def test_gradcheck_float64():
    m = LayerNormScaling(5, layer_index=4).double()
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    w, b = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    fn = lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


class Block(torch.nn.Module):
    def __init__(self, d, norm=torch.nn.LayerNorm):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(d), norm(d)
        self.attn, self.mlp = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, h):
        h = h + self.attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


def official_lns_forward(blocks, final_norm, h):
    """Restatement of the official LNS decoder loop with 0-based block index i."""
    for i, blk in enumerate(blocks):
        h = h + blk.attn(blk.input_layernorm(h) * (1 / math.sqrt(i + 1)))
        h = h + blk.mlp(blk.post_attention_layernorm(h) * (1 / math.sqrt(i + 1)))
    return final_norm(h)


def test_apply_layernorm_scaling_to_a_stack_of_blocks():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([Block(6) for _ in range(4)]).double()
    for b in blocks:
        _randomize(b)
    final = torch.nn.LayerNorm(6).double()
    x = torch.randn(2, 3, 6, dtype=D)
    with torch.no_grad():
        want = official_lns_forward(blocks, final, x)
    done = apply_layernorm_scaling(blocks)
    assert done == [(f"{i}.{n}", i + 1) for i in range(4) for n in ("input_layernorm", "post_attention_layernorm")]
    assert all(type(b.input_layernorm) is LayerNormScaling for b in blocks)
    assert [b.post_attention_layernorm.layer_index for b in blocks] == [1, 2, 3, 4]
    h = x
    for b in blocks:
        h = b(h)
    torch.testing.assert_close(final(h), want)
    # re-applying re-indexes the scaled norms in place (e.g. after inserting a block)
    apply_layernorm_scaling(blocks[1:], start=5)
    assert [b.input_layernorm.layer_index for b in blocks] == [1, 5, 6, 7]


def test_apply_converts_rmsnorm_and_skips_other_norm_types():
    blocks = [Block(4, norm=lambda d: torch.nn.RMSNorm(d, eps=1e-6)), Block(4, norm=LayerNorm2d)]
    done = apply_layernorm_scaling(blocks)
    assert type(blocks[0].input_layernorm) is RMSNormScaling and blocks[0].input_layernorm.eps == 1e-6
    assert type(blocks[1].input_layernorm) is LayerNorm2d  # channels-first subclass: left alone
    assert [ell for _, ell in done] == [1, 1]
    ours = torch.nn.ModuleList([Block(4, norm=lambda d: LayerNorm(d, eps=1e-6, bias=False))])
    apply_layernorm_scaling(ours)
    n = ours[0].input_layernorm
    assert type(n) is LayerNormScaling and n.bias is None and n.eps == 1e-6


def test_errors():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="layer_index"):
            LayerNormScaling(8, layer_index=bad)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNormScaling(8, 2)(torch.randn(2, 7))
    with pytest.raises(TypeError, match="bare norm"):
        apply_layernorm_scaling([torch.nn.LayerNorm(4)])


def test_apply_leaves_per_head_qk_norms_alone():
    # Qwen3's attention has per-head q_norm/k_norm: scaling both by 1/sqrt(l) would divide the
    # attention logits by l, which the paper does not do; the block's pre-norms are scaled
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    done = apply_layernorm_scaling(model.model.layers)
    names = sorted({n.split(".", 1)[1] for n, _ in done})
    assert names == ["input_layernorm", "post_attention_layernorm"]
    assert [ell for n, ell in done if n.endswith("input_layernorm")] == [1, 2, 3]
    assert type(model.model.layers[0].self_attn.q_norm).__name__ == "Qwen3RMSNorm"
    with_qk = transformers.Qwen3ForCausalLM(cfg).eval()
    assert len(apply_layernorm_scaling(with_qk.model.layers, qk_norms=True)) == 12
