"""The bench LM's statistics norms see only the real tokens (normkit.bench.models_tasks.apply_norm)."""

from __future__ import annotations

import torch

from normkit.bench.models_tasks import _batch_statistics, apply_norm
from normkit.nn import BatchNorm1d, LayerNorm, PowerNorm


def _batch():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return x, valid


def test_gathered_batch_norm_equals_the_masked_statistics_written_out():
    x, valid = _batch()
    bn = BatchNorm1d(8, affine=False, dtype=torch.float64).train()
    y = apply_norm(bn, x, valid, True)
    real = x[valid]  # the batch statistics of the real tokens only
    mean, var = real.mean(0), real.var(0, correction=0)
    torch.testing.assert_close(y[valid], (real - mean) / torch.sqrt(var + 1e-5), rtol=1e-12, atol=1e-12)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))


def test_no_gradient_reaches_padded_positions_through_powernorm():
    x, valid = _batch()
    x.requires_grad_(True)
    pn = PowerNorm(8, dtype=torch.float64).train()
    apply_norm(pn, x, valid, True).square().sum().backward()
    assert torch.equal(x.grad[~valid], torch.zeros_like(x.grad[~valid]))
    assert x.grad[valid].abs().sum() > 0


def test_only_batch_statistics_norms_are_gathered():
    assert _batch_statistics(BatchNorm1d(8)) and _batch_statistics(PowerNorm(8))
    assert not _batch_statistics(LayerNorm(8))
    x, valid = _batch()
    ln = LayerNorm(8, dtype=torch.float64)
    torch.testing.assert_close(apply_norm(ln, x, valid, False), ln(x))
