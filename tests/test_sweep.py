"""Issue 12: the registry-driven bad-input sweep, as a test.

Every registered norm × backend × a list of unusual inputs. Each case either gives the right
answer (checked against the same layer run in float64 on the eager backend, or a property that
the math guarantees) or raises an error whose message says what was expected and what came. A
silently wrong value — or an exception that names neither — fails the test. The compiled backends
run a sample (they compile per configuration; all of them run with ``-m slow``).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from normkit.registry import list_norms, norm_info, sample_inputs, sample_norm

C = 8
NAMES = list_norms()
#: words that make an error message say what was expected (and usually what came instead)
CLEAR = re.compile(r"expect|got|must|needs?|should|requires?|only|not supported|does not|cannot|valid|invalid", re.I)


def _shape(name: str, n: int = 4) -> tuple[int, ...]:
    return (n, 5, C) if norm_info(name).layout == "channels_last" else (n, C, 3, 3)


def _layer(name: str, backend: str, **kw):
    try:
        return sample_norm(name, C, backend=backend, **kw)
    except TypeError:
        return None  # the layer has no backend switch (its eager math is its only path)


def _run(m, x, name, kw=None):
    return m(x, **(sample_inputs(name, x) if kw is None else kw))


def _cast(kw, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}


def _reference(m, x, name, kw):
    """The same layer (copied, its state included) in float64 on the eager backend."""
    ref = copy.deepcopy(m).double()
    for mod in ref.modules():
        if hasattr(mod, "backend"):
            try:
                mod.backend = "eager"
            except (AttributeError, ValueError):
                pass
    return ref(x.double(), **_cast(kw, torch.float64))


def _assert_clear(err: BaseException, case: str) -> None:
    msg = str(err)
    assert CLEAR.search(msg), f"{case}: unclear error {type(err).__name__}: {msg[:300]}"


CASES = ("wrong_channels", "wrong_rank", "int_dtype", "noncontiguous", "float64", "bf16", "nan_sample", "empty")


def _case(name: str, backend: str, case: str, train: bool) -> None:
    torch.manual_seed(0)
    m = _layer(name, backend)
    if m is None:
        pytest.skip("no backend switch")
    m.train(train)
    shape = _shape(name)
    cl = norm_info(name).layout == "channels_last"
    kw = sample_inputs(name, torch.randn(shape))  # extra inputs (style, cond, mask) drawn once
    if case == "wrong_channels":
        bad = (4, 5, C + 3) if cl else (4, C + 3, 3, 3)
        with pytest.raises((ValueError, RuntimeError, TypeError)) as e:
            _run(m, torch.randn(bad), name)
        _assert_clear(e.value, case)
        assert str(C) in str(e.value), f"{case}: message does not name the expected size {C}: {e.value}"
        return
    if case == "wrong_rank":
        with pytest.raises((ValueError, RuntimeError, TypeError, IndexError)) as e:
            _run(m, torch.randn(()) if cl else torch.randn(C), name, kw)
        _assert_clear(e.value, case)
        return
    if case == "int_dtype":
        with pytest.raises((TypeError, ValueError, RuntimeError)) as e:
            _run(m, torch.randint(0, 5, shape), name, kw)
        _assert_clear(e.value, case)
        return
    if case == "empty":
        x = torch.randn((0, *shape[1:]))
        y = _run(m, x, name)  # extra inputs sized for the empty batch
        assert y.numel() == 0
        return
    x = torch.randn(shape)
    if case == "noncontiguous":
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
        assert not xt.is_contiguous()
        y = _run(copy.deepcopy(m), xt, name, kw)
        torch.testing.assert_close(y, _run(m, x, name, kw), rtol=1e-5, atol=1e-5)
        return
    if case == "float64":
        ref = _reference(m, x, name, kw)
        y = _run(copy.deepcopy(m).double(), x.double(), name, _cast(kw, torch.float64))
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
        return
    if case == "bf16":
        ref = _reference(m, x, name, kw)
        y = _run(m, x.bfloat16(), name, _cast(kw, torch.bfloat16))
        assert y.dtype == torch.bfloat16, f"{case}: output dtype {y.dtype}, expected the input's bfloat16"
        torch.testing.assert_close(y.double(), ref, rtol=0.1, atol=0.1)
        return
    if case == "nan_sample":
        x[1].view(-1)[3] = float("nan")
        y = _run(m, x, name, kw)
        others = torch.cat([y[:1], y[2:]])
        per_sample = not norm_info(name).batch_dependent or not train
        if per_sample:
            assert not torch.isnan(others).any(), f"{case}: a NaN in sample 1 reached other samples"
        assert torch.isnan(y[1]).any() or norm_info(name).batch_dependent, f"{case}: the NaN was masked"
        return
    raise AssertionError(case)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_sweep_auto(name, case, train):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _case(name, "auto", case, train)


@pytest.mark.parametrize("case", ["float64", "nan_sample", "empty", "wrong_channels"])
@pytest.mark.parametrize("name", NAMES)
def test_sweep_eager(name, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _case(name, "eager", case, True)


#: the compiled backends compile per configuration (seconds each): a sample in every run
COMPILED_SAMPLE = ["layernorm", "batchnorm", "powernorm", "frn"]


@pytest.mark.parametrize("case", ["float64", "nan_sample", "empty"])
@pytest.mark.parametrize("name", COMPILED_SAMPLE)
def test_sweep_compiled(name, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _case(name, "compiled", case, True)


def _far_from_one(name: str, backend: str, scale: float, train: bool, big: bool) -> None:
    """Finite float32 input scaled far from 1 gives the float64 answer (issue 12, item 3): the
    statistics may not overflow (|x| ≈ 1e30 squares past float32's range) or underflow."""
    torch.manual_seed(0)
    m = _layer(name, backend)
    if m is None and backend == "auto":
        m = sample_norm(name, C)  # no backend switch: its one path is the default
    if m is None:
        pytest.skip("no backend switch")
    m.train(train)
    for mod in m.modules():  # eps=None means finfo(dtype).eps, which differs in the float64 reference
        if getattr(mod, "eps", 0.0) is None:
            mod.eps = 1e-6
    shape = _shape(name)
    if big:  # ≥ 2^18 elements: the size from which auto's ATen paths check their statistics
        shape = (1024, 32, C) if norm_info(name).layout == "channels_last" else (64, C, 32, 32)
    x = torch.randn(shape) * scale
    kw = sample_inputs(name, x)
    if norm_info(name).extra_inputs:  # style/condition tensors on the same scale as the content
        kw = {k: (v * scale if torch.is_tensor(v) and v.is_floating_point() and k != "mask" else v) for k, v in kw.items()}
    ref = _reference(m, x, name, kw)
    if ref.abs().max() > torch.finfo(torch.float32).max:
        pytest.skip("the true output is past float32's range (e.g. eval with untrained running statistics)")
    y = _run(m, x, name, kw)
    assert torch.isfinite(y).all(), f"x·{scale:g}: non-finite output for finite input"
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"x·{scale:g}: relative error {err:.2e} against the float64 layer"


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("name", NAMES)
def test_sweep_far_from_one_eager(name, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _far_from_one(name, "eager", scale, True, big=False)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("name", NAMES)
def test_sweep_far_from_one_auto(name, scale, train):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _far_from_one(name, "auto", scale, train, big=True)
