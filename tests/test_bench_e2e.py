"""`normkit models`: the norm swap of the end-to-end benchmark is exact, and the command prints every model."""

import copy
import re
import sys

import pytest
import torch
from torch import nn

import normkit
from normkit.bench import e2e
from normkit.cli import main

CONV_AND_VIT = ["vit", "resnet", "convnext"]


def _eval_out(model: nn.Module, spec: e2e.Spec) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(spec.x[:4])


@pytest.mark.parametrize("name", CONV_AND_VIT)
def test_swap_is_exact_and_state_dict_loads_into_the_original_class(name):
    spec = e2e.build(name, quick=True)
    new = e2e.swapped(spec)
    e2e.check(spec, new)  # fp32 outputs; fp64 outputs, grads, running stats
    # the swapped model's state dict loads (strict) into a freshly initialised torch model
    other = e2e.build(name, seed=1, quick=True).model
    assert type(other) is type(spec.model)
    other.load_state_dict(new.state_dict())
    torch.testing.assert_close(_eval_out(other, spec), _eval_out(new, spec))


def test_llama_swap_is_exact():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    spec = e2e.build("llama", quick=True)
    new = e2e.swapped(spec)
    norms = [m for m in new.modules() if isinstance(m, normkit.RMSNorm)]
    assert len(norms) == 5 and not any(isinstance(m, LlamaRMSNorm) for m in new.modules())
    assert all(m.eps == spec.model.lm.config.rms_norm_eps for m in norms)
    e2e.check(spec, new)
    other = e2e.build("llama", seed=1, quick=True).model
    other.load_state_dict(new.state_dict())
    torch.testing.assert_close(_eval_out(other, spec), _eval_out(new, spec))


def test_swap_helper_keeps_dtype_mode_and_skips_subclasses():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-3), nn.Sequential(nn.LayerNorm(8)), normkit.LayerNorm(8))
    model[2][0].weight.data.uniform_()
    model = model.double()
    model[1].eval()
    ref, ours = copy.deepcopy(model), model[3]
    out = e2e._swap_norms(model, {nn.LayerNorm: e2e._layer_norm})
    assert out is model
    assert [type(m) for m in (model[1], model[2][0], model[3])] == [normkit.LayerNorm] * 3
    assert model[3] is ours  # exact-class match: normkit's subclass of nn.LayerNorm is left alone
    assert model[1].eps == 1e-3 and not model[1].training and model[2][0].training
    assert model[2][0].weight.dtype == torch.float64
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x))


def test_layer_norm2d_eps_is_passed_explicitly():
    spec = e2e.build("convnext", quick=True)
    new = e2e.swapped(spec)
    ln2d = [m for m in new.modules() if type(m) is normkit.LayerNorm2d]
    assert ln2d and all(m.eps == 1e-6 for m in ln2d)  # timm's 1e-6, not normkit's default 1e-5


def test_models_command_quick_prints_every_model(capsys):
    assert main(["models", "--quick", "--reps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert f"normkit default backend: {normkit.get_backend()!r}" in out and "threads" in out
    assert "ratio" in out and "saved MiB" in out
    try:
        import transformers  # noqa: F401

        names = e2e.MODELS
    except ImportError:
        assert "skip llama" in out
        names = CONV_AND_VIT
    for name in names:
        assert f"check {name}:" in out
        rows = [line.split() for line in out.splitlines() if line.startswith(name + " ")]
        assert len(rows) == 1 and rows[0][2] == "eager"
        assert float(rows[0][3]) > 0 and float(rows[0][4]) > 0 and float(rows[0][5]) > 0
        assert re.fullmatch(r"[a-z_0-9]+:(native|kernels|eager)×\d+", rows[0][-1]), rows[0]  # the runs column


def test_runs_names_one_implementation_per_swapped_norm_call():
    spec = e2e.build("resnet", quick=True)
    n = sum(isinstance(m, nn.BatchNorm2d) for m in spec.model.modules())
    assert e2e.implementations(spec) == f"batch_norm:native×{n}"  # small batches: ATen's op, as torch's module
    model = e2e.swapped(spec)
    for m in model.modules():
        if isinstance(m, normkit.BatchNorm2d):
            m.backend = "eager"
    assert e2e.implementations(spec, model) == f"batch_norm:eager×{n}"


def test_llama_is_skipped_with_a_reason_without_transformers(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert e2e.run(["llama"], modes=("eager",), reps=1, warmup=1) == []
    assert "skip llama: transformers is not importable" in capsys.readouterr().out


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 ran on a machine twice as slow for both models: per-round ratios stay 1.1, 1.1, 1.2
    base = [10.0, 20.0, 10.0]
    other = [11.0, 22.0, 12.0]
    assert e2e.paired_ratio(base, other) == pytest.approx(1.1)
    # the ratio of the medians would read 12 / 10 = 1.2
    with pytest.raises(ValueError, match="equally many rounds"):
        e2e.paired_ratio([1.0], [1.0, 2.0])
