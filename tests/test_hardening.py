"""Issue 12, item 7: momentum range, deepcopy after training, a clear TorchScript error."""

import copy

import pytest
import torch

import normkit
from normkit.registry import list_norms, sample_norm


@pytest.mark.parametrize("momentum", [-0.5, 1.5, True])
def test_instancenorm_rejects_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match=r"InstanceNorm: momentum must be a number in \[0, 1\]"):
        normkit.create_norm("instancenorm", 8, momentum=momentum)
    assert normkit.create_norm("instancenorm", 8, momentum=None).momentum is None


def test_adab2n_deepcopy_after_training_forward():
    m = normkit.create_norm("adab2n", 8)
    m(torch.randn(4, 8, 3, 3, requires_grad=True))
    assert m.loss is not None and m.loss.grad_fn is not None
    c = copy.deepcopy(m)
    assert c.loss is None and m.loss is not None
    for k, v in m.state_dict().items():
        assert torch.equal(v, c.state_dict()[k])
    c(torch.randn(4, 8, 3, 3, requires_grad=True))
    c.regularizer().backward()


@pytest.mark.parametrize("name", list_norms())
def test_torchscript_gives_one_clear_error(name):
    model = torch.nn.Sequential(torch.nn.Identity(), sample_norm(name, 8))
    with pytest.raises(RuntimeError, match="TorchScript .* is not supported; use torch.compile or torch.export"):
        torch.jit.script(model)


def test_prepbn_at_lambda_one_keeps_a_nan_token_in_its_token():
    # λ = 1 at the start of the schedule: pure LayerNorm, whose statistics are per token
    m = normkit.create_norm("prepbn", 8).train()
    x = torch.randn(4, 5, 8)
    x[0, 1, 2] = float("nan")
    y = m(x)
    nan = torch.isnan(y)
    assert nan[0, 1].all() and nan.sum() == 8  # only the poisoned token
    ln = torch.nn.functional.layer_norm(x, (8,), m.norm1.weight, m.norm1.bias, m.norm1.eps)
    torch.testing.assert_close(y[~nan], ln[~nan])


def test_regionnorm_b_keeps_a_nan_in_its_region():
    # RN-B normalizes the hole and the valid region with separate (batch) statistics: a NaN in the
    # valid region of channel 2 may only reach channel 2's valid region (0·NaN used to carry it over)
    from normkit.registry import sample_inputs

    torch.manual_seed(0)
    m = sample_norm("regionnorm_b", 8).train()
    x = torch.randn(4, 8, 4, 4)
    kw = sample_inputs("regionnorm_b", x)
    hole = kw["mask"].bool().expand_as(x)
    clean = m(x, **kw)
    i = (~hole[0, 2]).nonzero()[0]
    x[0, 2, i[0], i[1]] = float("nan")
    y = m(x, **kw)
    nan = torch.isnan(y)
    assert nan[:, 2][~hole[:, 2]].all()  # the valid region of that channel: the math's reach
    assert not nan[:, 2][hole[:, 2]].any()  # the hole region: untouched
    keep = torch.ones_like(nan)
    keep[:, 2] = hole[:, 2]
    torch.testing.assert_close(y[keep], clean[keep])


@pytest.mark.parametrize("mask_shape", ["positions", "broadcast"])
def test_channels_last_batchnorm_mask_moves_with_the_channels(mask_shape):
    # the mask was left in the caller's layout while the input moved to (N, C, *): a clear-looking
    # ValueError about the internal shape (4, 8, 5) for a valid (4, 5) or (4, 5, 1) mask
    torch.manual_seed(0)
    m = normkit.BatchNorm(8, channels_last=True, affine=False)
    x = torch.randn(4, 5, 8)
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[0, 3:] = False
    keep[2, 1:] = False
    y = m(x, mask=keep if mask_shape == "positions" else keep.unsqueeze(-1))
    sel = x[keep]  # (valid positions, 8): the statistics come from these rows only
    mean, var = sel.mean(0), sel.var(0, unbiased=False)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + m.eps))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 3\) does not broadcast to the input shape \(4, 5, 8\)"):
        m(x, mask=torch.ones(4, 3, dtype=torch.bool))
