"""Bad input gets a clear error naming what was expected."""

import pytest
import torch

import normkit
from normkit import functional as F


def test_wrong_channel_count_names_expected_and_got():
    with pytest.raises(ValueError, match=r"\(\*, 8\).*\(2, 7\)"):
        normkit.LayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="expects 8 channels.*got 6"):
        normkit.BatchNorm(8)(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="expects 8 channels.*got 4"):
        normkit.GroupNorm(8, 4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="expects 8 channels.*got 3"):
        normkit.LayerNorm2d(8)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="C=8.*got shape"):
        normkit.DyT(8)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\(\*, 8\)"):
        normkit.ScaleNorm(8)(torch.randn(2, 3))


def test_wrong_rank():
    with pytest.raises(ValueError, match="expected 4D input \\(got 3D"):
        normkit.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        F.group_norm(torch.randn(8), 2)
    with pytest.raises(ValueError, match=">= 3 dims"):
        normkit.InstanceNorm(3)(torch.randn(2, 3))


def test_batchnorm_one_value_per_channel_in_training():
    bn = normkit.BatchNorm1d(4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 4))
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)  # eval with running stats is fine


def test_bad_hyperparameters():
    for make in (lambda: normkit.LayerNorm(4, eps=-1e-5), lambda: normkit.BatchNorm(4, eps=-1.0),
                 lambda: normkit.GroupNorm(4, 2, eps=-1), lambda: normkit.RMSNorm(4, eps=-1e-6)):
        with pytest.raises(ValueError, match="eps must be a non-negative"):
            make()
    with pytest.raises(ValueError, match="num_groups=3 must be a positive divisor of num_channels=8"):
        normkit.GroupNorm(8, 3)
    with pytest.raises(ValueError, match="positive divisor of the 8 channels"):
        F.group_norm(torch.randn(2, 8, 3), 3)
    with pytest.raises(ValueError, match="momentum"):
        normkit.BatchNorm(4, momentum=2.0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        normkit.LayerNorm(4, backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        normkit.set_backend("cuda")


def test_types():
    with pytest.raises(TypeError, match="floating-point"):
        F.layer_norm(torch.ones(2, 4, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="bool"):
        F.batch_norm(torch.randn(4, 2, 3), None, None, training=True, mask=torch.ones(4, 1, 3))
    with pytest.raises(ValueError, match="weight must have 4 elements"):
        F.layer_norm(torch.randn(2, 4), 4, torch.ones(3))


def test_triton_backend_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        normkit.LayerNorm(4, backend="triton")(torch.randn(2, 4))


def test_nan_is_not_masked():
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    for backend in ("eager", "compiled"):
        y = F.layer_norm(x, 4, backend=backend)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
