"""Dual PatchNorm (Kumar, Dehghani, Houlsby 2023, arXiv:2302.01327) against a plain re-statement.

Equation (paper's Flax snippet, image in NHWC there):

  patches = rearrange(img, "b (ht hp) (wt wp) c -> b (ht wt) (hp wp c)")
  tokens  = LN1( Dense( LN0(patches) ) )          LN over P*P*C, then over D
"""

import pytest
import torch
import torch.nn.functional as TF

from normkit.nn.patch_norm import DualPatchNorm, patchify

D = torch.float64


def ref_ln(v, w, b, eps):
    mu = v.mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(((v - mu) ** 2).mean(-1, keepdim=True) + eps) * w + b


def ref_dpn(img, m, ph, pw):
    """Loop over the patch grid row by row; flatten each patch as (hp, wp, c)."""
    n, c, h, w = img.shape
    tokens = []
    for i in range(h // ph):
        for j in range(w // pw):
            patch = img[:, :, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw]  # (N, C, ph, pw)
            v = patch.permute(0, 2, 3, 1).reshape(n, -1)  # channel fastest
            v = ref_ln(v, m.ln0.weight, m.ln0.bias, m.ln0.eps)
            v = v @ m.proj.weight.T + m.proj.bias
            tokens.append(ref_ln(v, m.ln1.weight, m.ln1.bias, m.ln1.eps))
    return torch.stack(tokens, 1)


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()


@pytest.mark.parametrize("patch", [2, (2, 3)])
def test_forward_against_plain_restatement(patch):
    m = DualPatchNorm(5, in_chans=3, patch_size=patch).double()
    _randomize(m)
    img = torch.randn(2, 3, 4, 6, dtype=D)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    y = m(img)
    assert y.shape == (2, (4 // ph) * (6 // pw), 5)
    torch.testing.assert_close(y, ref_dpn(img, m, ph, pw))
    assert m.ln0.eps == 1e-6 and m.ln0.normalized_shape == (3 * ph * pw,)  # Flax LayerNorm default eps


def test_state_dict_keys_and_defaults():
    m = DualPatchNorm(16)
    assert m.patch_size == (16, 16) and m.in_chans == 3
    assert list(m.state_dict()) == ["ln0.weight", "ln0.bias", "proj.weight", "proj.bias", "ln1.weight", "ln1.bias"]
    assert m.proj.weight.shape == (16, 16 * 16 * 3)


def test_projection_equals_conv_patch_embedding():
    m = DualPatchNorm(4, in_chans=3, patch_size=2).double()
    conv = torch.nn.Conv2d(3, 4, 2, stride=2).double()
    m.load_conv_weight(conv.weight, conv.bias)
    img = torch.randn(2, 3, 6, 4, dtype=D)
    torch.testing.assert_close(m.proj(patchify(img, (2, 2))), conv(img).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\)"):
        m.load_conv_weight(torch.randn(4, 3, 3, 3))


def test_gradcheck_float64():
    m = DualPatchNorm(3, in_chans=2, patch_size=2).double()
    _randomize(m)
    img = torch.randn(2, 2, 4, 2, dtype=D, requires_grad=True)
    names, params = zip(*m.named_parameters())

    def f(img, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (img,))

    assert torch.autograd.gradcheck(f, (img, *[p.detach().clone().requires_grad_() for p in params]))


def test_per_pixel_patches_accept_any_spatial_rank():
    m = DualPatchNorm(8, in_chans=4, patch_size=1)
    assert m(torch.randn(2, 4, 3)).shape == (2, 3, 8)
    assert m(torch.randn(2, 4, 3, 5)).shape == (2, 15, 8)
    assert m(torch.randn(2, 4, 2, 2, 2)).shape == (2, 8, 8)
    # per-pixel DPN = LN over channels, Linear, LN, at every position
    x = torch.randn(2, 4, 3, 5)
    v = x.permute(0, 2, 3, 1).reshape(2, 15, 4)
    want = TF.layer_norm(m.proj(TF.layer_norm(v, (4,), m.ln0.weight, m.ln0.bias, 1e-6)), (8,), m.ln1.weight, m.ln1.bias, 1e-6)
    torch.testing.assert_close(m(x), want)


def test_clear_errors():
    m = DualPatchNorm(8, in_chans=3, patch_size=4)
    with pytest.raises(ValueError, match=r"not divisible by patch_size \(4, 4\)"):
        m(torch.randn(1, 3, 8, 10))
    with pytest.raises(ValueError, match=r"expects an image \(N, 3, H, W\)"):
        m(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="expects 2 spatial dims"):
        m(torch.randn(1, 3, 8))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(1, 3, 8, 8, dtype=torch.uint8))
    for bad in (0, (2, 0), True, 2.0):
        with pytest.raises(ValueError, match="patch_size"):
            DualPatchNorm(8, patch_size=bad)
    with pytest.raises(ValueError, match="spatial_dims"):
        DualPatchNorm(8, patch_size=(2, 2), spatial_dims=3)
    with pytest.raises(ValueError, match="in_chans"):
        DualPatchNorm(8, in_chans=0)
