"""GDWCT against a plain statement of the official WonwoongCho/GDWCT code (model.py::WCT, run.py::reg)."""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.gdwct import (
    coloring_matrix,
    coloring_regularizer,
    gdwct,
    group_whitening,
    whitening_regularizer,
)
from normkit.nn.gdwct import GDWCT

D = torch.float64


def official_wct(c_a, s_ct, s_mu, alpha, g, eps=1e-5):
    """model.py::WCT.wct + Get.coloring with the MLP outputs given (s_ct: (B, G·n²), s_mu: (B, C))."""
    b, c, h, w = c_a.shape
    n_mem = c // g
    mask = torch.block_diag(*[torch.ones(n_mem, n_mem, dtype=c_a.dtype)] * g)
    xs, us = [], []
    for i in range(g):
        s_ct_i = s_ct[:, (n_mem**2) * i : (n_mem**2) * (i + 1)].unsqueeze(2).view(b, n_mem, n_mem)
        d = (torch.sum(s_ct_i**2, dim=1, keepdim=True)) ** 0.5
        u_i = s_ct_i / d
        xs.append(torch.bmm(s_ct_i, u_i.permute(0, 2, 1)))
        us.append(u_i)
    eigen_s = torch.cat(us, dim=0)
    x_b = mask * torch.cat(xs, dim=1).repeat(1, 1, g)
    c_a_ = c_a.permute(1, 0, 2, 3).contiguous().view(g, n_mem, -1)
    c_a_ = c_a_ - torch.mean(c_a_, dim=2, keepdim=True)
    cov_c = torch.bmm(c_a_, c_a_.permute(0, 2, 1)).div(b * h * w - 1) + eps * torch.eye(n_mem, dtype=c_a.dtype).unsqueeze(0)
    whitened = c_a_.unsqueeze(0).contiguous().view(c, b, -1).permute(1, 0, 2)
    colored = torch.bmm(x_b, whitened).unsqueeze(3).view(b, c, h, -1)
    return alpha * (colored + s_mu[:, :, None, None]) + (1 - alpha) * c_a, cov_c, eigen_s


def official_reg(tensors):
    """run.py::reg for one list: mean |x − I| over the concatenation."""
    x = torch.cat(tensors, dim=0)
    return torch.mean(torch.abs(x - torch.eye(x.shape[-1], dtype=x.dtype)))


def official_mlp(mlp, x):
    """MLP with LinearBlock(norm='none'): Linear + LeakyReLU(0.01), the last without activation."""
    blocks = list(mlp.main)
    for i, blk in enumerate(blocks):
        x = TF.linear(x, blk.fc.weight, blk.fc.bias)
        if i < len(blocks) - 1:
            x = TF.leaky_relu(x, 0.01)
    return x


def test_functional_matches_official_wct():
    b, c, g = 3, 8, 2
    x = torch.randn(b, c, 4, 5, dtype=D) * 2 + 1
    s_ct = torch.randn(b, g * (c // g) ** 2, dtype=D)
    s_mu = torch.randn(b, c, dtype=D)
    alpha = torch.tensor([0.6], dtype=D)
    y, cov, u = gdwct(x, s_ct, s_mu, alpha, g)
    y_ref, cov_ref, u_ref = official_wct(x, s_ct, s_mu, alpha, g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(cov, cov_ref)
    torch.testing.assert_close(whitening_regularizer(cov), official_reg([cov_ref]))
    torch.testing.assert_close(coloring_regularizer(u), official_reg([u_ref]))


def test_module_matches_official_wct_and_keys():
    torch.manual_seed(0)
    m = GDWCT(8, num_groups=4, mlp_dim=16).double()
    assert abs(m.alpha.item() - 0.6) < 1e-7
    keys = set(m.state_dict())
    assert "alpha" in keys and "mlp_CT.main.0.fc.weight" in keys and "mlp_CT.main.4.fc.bias" in keys
    assert "mlp_mu.main.2.fc.weight" in keys and len([k for k in keys if k.startswith("mlp_CT")]) == 10
    assert all(torch.all(mod.bias == 0) for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    x = torch.randn(2, 8, 3, 3, dtype=D)
    style = torch.randn(2, 8, dtype=D)
    b, g = 2, 4
    s_ct = official_mlp(m.mlp_CT, style.view(b * g, 8 // g)).view(b, -1)
    s_mu = official_mlp(m.mlp_mu, style)
    y_ref, cov_ref, u_ref = official_wct(x, s_ct, s_mu, m.alpha, g)
    torch.testing.assert_close(m(x, style), y_ref)
    torch.testing.assert_close(m(x, style.view(2, 8, 1, 1)), y_ref)
    y, w_loss, c_loss = m(x, style, return_losses=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(w_loss, official_reg([cov_ref]))
    torch.testing.assert_close(c_loss, official_reg([u_ref]))
    assert w_loss.dim() == 0 and c_loss.dim() == 0


def test_coloring_matrix_is_u_d_ut_and_paper_regularizer():
    s = torch.randn(3, 2, 4, 4, dtype=D)
    x, u = coloring_matrix(s, 2)
    torch.testing.assert_close(u.norm(dim=-2), torch.ones(3, 2, 4, dtype=D))  # unit columns
    d = s.norm(dim=-2)
    torch.testing.assert_close(x, u @ torch.diag_embed(d) @ u.transpose(-1, -2))
    torch.testing.assert_close(x, x.transpose(-1, -2))
    eye = torch.eye(4, dtype=D)
    torch.testing.assert_close(coloring_regularizer(u, paper_exact=True), (u.transpose(-1, -2) @ u - eye).abs().mean())
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D))
    assert coloring_regularizer(q, paper_exact=True) < 1e-12 < coloring_regularizer(q)  # orthogonal but not I


def test_official_whitening_is_centring_with_batch_statistics():
    x = torch.randn(3, 4, 2, 5, dtype=D) * 3 + 2
    xw, cov = group_whitening(x, 2)
    torch.testing.assert_close(xw, x - x.mean((0, 2, 3), keepdim=True))
    assert cov.shape == (2, 2, 2)
    # per-sample variant
    xw_s, cov_s = group_whitening(x, 2, per_sample=True)
    torch.testing.assert_close(xw_s, x - x.mean((2, 3), keepdim=True))
    v = xw_s.reshape(3, 2, 2, -1)
    torch.testing.assert_close(cov_s, v @ v.transpose(-1, -2) / 9 + 1e-5 * torch.eye(2, dtype=D))


@settings(max_examples=25, deadline=None)
@given(
    g=st.sampled_from([1, 2, 3]),
    n=st.integers(1, 4),
    b=st.integers(1, 3),
    hw=st.integers(3, 6),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_exact_whitening_gives_identity_covariance_per_group(g, n, b, hw, per_sample, seed):
    torch.manual_seed(seed)
    c = g * n
    # a well-conditioned mix (rotation × scales in [0.5, 2]): with a near-singular one (randn + 2I can be,
    # e.g. seed 387: eigenvalues 3.7e-5 and 10 of mix·mixᵀ) the eps ridge alone moves the whitened
    # variance by eps/λ_min ≈ 3e-5, which is the math of the ridge, not an error
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=D))
    mix = q * (0.5 + 1.5 * torch.rand(c, dtype=D))
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(b, c, hw, 4, dtype=D)) + 3
    xw, _ = group_whitening(x, g, eps=1e-9, exact=True, per_sample=per_sample)
    v = xw.reshape(b, g, n, -1) if per_sample else xw.transpose(0, 1).reshape(1, g, n, -1)
    m = v.shape[-1]
    cov = (v - v.mean(-1, keepdim=True)) @ (v - v.mean(-1, keepdim=True)).transpose(-1, -2) / (m - 1)
    torch.testing.assert_close(cov, torch.eye(n, dtype=D).expand_as(cov), atol=1e-5, rtol=0)


def test_gradcheck():
    x = torch.randn(2, 4, 2, 3, dtype=D, requires_grad=True)
    s = torch.randn(2, 2 * 2 * 2, dtype=D, requires_grad=True)
    mu = torch.randn(2, 4, dtype=D, requires_grad=True)
    alpha = torch.tensor([0.6], dtype=D, requires_grad=True)

    def f(x, s, mu, alpha, **kw):
        y, cov, u = gdwct(x, s, mu, alpha, 2, **kw)
        return y, whitening_regularizer(cov), coloring_regularizer(u, paper_exact=True)

    assert torch.autograd.gradcheck(f, (x, s, mu, alpha))
    assert torch.autograd.gradcheck(lambda *a: f(*a, exact=True), (x, s, mu, alpha))
    assert torch.autograd.gradcheck(lambda *a: f(*a, per_sample=True), (x, s, mu, alpha))


def test_exact_whitening_compiles_fullgraph_and_alpha_clamp():
    torch._dynamo.reset()
    m = GDWCT(4, num_groups=2, mlp_dim=8, exact_whitening=True)
    x, style = torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")  # graph breaks are found by dynamo; skip inductor
    torch.testing.assert_close(cm(x, style, return_losses=True), m(x, style, return_losses=True), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        m.alpha.fill_(1.7)
    m.clamp_alpha_()
    assert m.alpha.item() == 1.0


def test_errors():
    with pytest.raises(ValueError, match="positive divisor of num_features=6"):
        GDWCT(6, num_groups=4)
    with pytest.raises(ValueError, match="style_dim=5"):
        GDWCT(8, num_groups=2, style_dim=5)
    m = GDWCT(8, num_groups=2, mlp_dim=8)
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="needs the style code"):
        m(x)
    with pytest.raises(ValueError, match=r"style code of shape \(N=2, 8\)"):
        m(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"style code of shape \(N=2, 8\)"):
        m(x, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"content of shape \(N, 8, \*spatial\)"):
        m(torch.randn(2, 4, 3, 3), torch.randn(2, 8))
    with pytest.raises(ValueError, match="num_groups=3 must be a positive divisor of the 8 channels"):
        group_whitening(x, 3)
    with pytest.raises(ValueError, match="at least 2 positions"):
        group_whitening(torch.randn(1, 8, 1), 2)
    with pytest.raises(ValueError, match=r"not \(N, G·n·n\)"):
        coloring_matrix(torch.randn(2, 7), 2)
    with pytest.raises(ValueError, match=r"style_mean must be \(N=2, C=8\)"):
        gdwct(x, torch.randn(2, 32), torch.randn(2, 4), 0.5, 2)
    with pytest.raises(ValueError, match="n, n"):
        whitening_regularizer(torch.randn(3, 2, 4))
