"""Empty inputs (N = 0, zero-length sequences): empty outputs, untouched running statistics."""

import pytest
import torch

import normkit
from normkit.registry import list_norms, norm_info, sample_inputs, sample_norm

BATCH_DEPENDENT = [n for n in list_norms() if norm_info(n).batch_dependent]


def _shapes(name):
    """A normal input shape, then empty ones: N = 0 and a zero-length sequence / spatial dim."""
    if norm_info(name).layout == "channels_last":
        return (4, 5, 8), [(0, 5, 8), (4, 0, 8)]
    return (4, 8, 3, 3), [(0, 8, 3, 3), (4, 8, 0, 3)]


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0)) for k in a)


def test_every_batch_dependent_norm_is_covered():
    assert {"batchnorm", "powernorm", "estbn", "unifiednorm", "adab2n", "bcn"} <= set(BATCH_DEPENDENT)


@pytest.mark.parametrize("name", BATCH_DEPENDENT)
def test_empty_batch_leaves_running_statistics_untouched(name):
    # one empty batch used to make PowerNorm's running_phi (EstBN, UnifiedNorm...) NaN forever
    torch.manual_seed(0)
    m = sample_norm(name, 8).train()
    full, empties = _shapes(name)
    x = torch.randn(full)
    m(x, **sample_inputs(name, x))  # some state to protect
    before = _state(m)
    for shape in empties:
        e = torch.randn(shape)
        try:
            y = m(e, **sample_inputs(name, e))
        except (RuntimeError, IndexError):
            # a zero-size spatial dim has no meaning for a norm with convolutions (LOAN, RegionNorm):
            # torch's conv says so; N = 0 must work
            if shape[0] == 0 or norm_info(name).layout == "channels_last":
                raise
        else:
            assert y.numel() == 0
            if norm_info(name).drop_in:
                assert y.shape == e.shape
        assert _same(_state(m), before), f"{name}: an empty {shape} batch changed the state"
        assert all(t.training for t in m.modules()), "training flags restored"
    m.eval()
    y = m(x, **sample_inputs(name, x))
    assert torch.isfinite(y).all()


def test_empty_batch_keeps_submodule_modes_and_autograd():
    m = normkit.create_norm("powernorm", 8)
    out = m(torch.randn(0, 5, 8))
    out.sum().backward()  # connected to the parameters; zero gradient
    assert m.weight.grad is not None and not m.weight.grad.any()
    assert torch.isfinite(m.running_phi).all()


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list_norms())
def test_zero_batch_input_gives_empty_output(name, training, backend):
    # "cannot reshape tensor of 0 elements" (GroupNorm, LayerNorm2d, FRN, EvoNorm-S0, GDWCT...),
    # InstanceNorm/IBN "Expected more than 1 spatial element" in eval mode with 9 spatial elements
    m = sample_norm(name, 8).train(training)
    shape = (0, *_shapes(name)[0][1:])
    x = torch.randn(shape)
    with normkit.set_backend(backend):
        y = m(x, **sample_inputs(name, x))
    assert y.numel() == 0
    if norm_info(name).drop_in:
        assert y.shape == x.shape
