"""replace_norms and the transformers integration on tiny models built from configs (no download)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import normkit
from normkit.convert import recognise_norm, replace_norms

transformers = pytest.importorskip("transformers")
from normkit.integrations.transformers import (  # noqa: E402
    NormkitGemmaRMSNorm,
    NormkitLlamaRMSNorm,
    apply_normkit,
    patch_transformers_classes,
)

FP32 = {"rtol": 1.3e-6, "atol": 1e-5}
SMALL = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def _gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**SMALL, head_dim=8))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=8))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}
if hasattr(transformers, "GemmaConfig"):
    BUILDERS["gemma"] = _gemma
if hasattr(transformers, "Qwen3Config"):
    BUILDERS["qwen3"] = _qwen3


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # norm weights away from their init (ones/zeros), so the mapping matters
        for n, p in model.named_parameters():
            if "norm" in n.lower() or "ln" in n.lower():
                p.add_(0.3 * torch.randn_like(p))
    return model


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _norm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules(remove_duplicate=False) if recognise_norm(m) is not None]


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_hf_models_convert_exactly_and_checkpoints_round_trip(name):
    model = _build(name)
    ref = _logits(model, IDS)
    norms = _norm_names(model)
    assert norms, f"{name}: no norm recognised"
    original_sd = {k: v.clone() for k, v in model.state_dict().items()}

    report = apply_normkit(model, inplace=False)
    new = report.model
    assert new is not model
    # the original is untouched: same classes, same values
    assert _norm_names(model) == norms
    for k, v in model.state_dict().items():
        assert torch.equal(v, original_sd[k]), k
    # every norm is listed, replaced by a normkit class, exactly
    assert [r.name for r in report] == norms
    assert report.all_exact and not report.not_converted, str(report)
    assert all(type(new.get_submodule(n)).__module__.startswith("normkit.") for n in norms)
    torch.testing.assert_close(_logits(new, IDS), ref)

    # checkpoint: same keys; converted -> fresh original class, and back
    assert list(new.state_dict()) == list(model.state_dict())
    fresh = _build(name, seed=123)
    fresh.load_state_dict(new.state_dict())
    torch.testing.assert_close(_logits(fresh, IDS), ref)
    other = apply_normkit(_build(name, seed=7)).model
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(_logits(other, IDS), ref)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_hf_models_in_float64(name):
    model = _build(name).double()
    ref = _logits(model, IDS)
    report = replace_norms(model)
    assert report.all_exact and len(report) == len(_norm_names(_build(name)))
    assert all(p.dtype == torch.float64 for p in report.model.parameters())
    # transformers' RMSNorms compute in float32 even for float64 inputs; LayerNorm models are exact in float64
    tol = FP32 if name in ("llama", "gemma", "qwen3") else {}
    torch.testing.assert_close(_logits(report.model, IDS), ref, **tol)


def test_bfloat16_model_keeps_its_dtype():
    model = _build("llama").to(torch.bfloat16)
    report = replace_norms(model)
    assert report.all_exact
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(4, 8)
        self.bn1 = nn.BatchNorm1d(8, momentum=None)
        self.bn3 = nn.BatchNorm3d(2, affine=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.gn(torch.relu(self.bn(self.conv(x))))
        y = self.bn3(x.reshape(x.shape[0], 2, 4, *x.shape[2:])).reshape_as(x)
        return self.head(self.bn1(y.mean((2, 3))))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _CNN()
    model.train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(4, 3, 6, 6))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bn" in n or "gn" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cnn_batch_and_group_norm(dtype):
    model = _cnn().to(dtype)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    ref = model(x)
    report = replace_norms(model, inplace=False)
    assert [(r.name, r.old, r.new, r.exact) for r in report] == [
        ("bn", "BatchNorm2d", "BatchNorm2d", True),
        ("gn", "GroupNorm", "GroupNorm", True),
        ("bn1", "BatchNorm1d", "BatchNorm1d", True),
        ("bn3", "BatchNorm3d", "BatchNorm3d", True),
    ]
    new = report.model
    assert isinstance(new.bn, normkit.BatchNorm2d) and isinstance(new.gn, normkit.GroupNorm)
    assert type(model.bn) is nn.BatchNorm2d  # original untouched
    assert not new.training and new.bn1.momentum is None
    tol = FP32 if dtype == torch.float32 else {}
    torch.testing.assert_close(new(x), ref, **tol)
    # train mode: same output and the same running-statistics update
    model.train()
    new.train()
    torch.testing.assert_close(new(x), model(x), **tol)
    torch.testing.assert_close(new.state_dict(), model.state_dict(), **tol)
    fresh = _CNN().to(dtype)
    fresh.load_state_dict(new.state_dict())


def test_torch_layernorm_and_rmsnorm_and_shared_modules():
    ln = nn.LayerNorm(8, eps=1e-3, bias=False)
    model = nn.Sequential(ln, nn.Linear(8, 8), ln, nn.RMSNorm(8), nn.LayerNorm(8, elementwise_affine=False))
    x = torch.randn(3, 8)
    ref = model(x)
    report = replace_norms(model)
    assert [r.name for r in report] == ["0", "2", "3", "4"]
    assert report.all_exact
    assert model[0] is model[2] and isinstance(model[0], normkit.LayerNorm) and model[0].eps == 1e-3
    assert isinstance(model[3], normkit.RMSNorm) and model[3].eps is None
    torch.testing.assert_close(model(x), ref)
    # normkit's own modules are not norms to convert again
    assert len(replace_norms(model)) == 0


def test_non_exact_target_is_reported_as_such():
    model = _build("gpt2")
    report = replace_norms(model, "rmsnorm")
    assert report and not any(r.exact for r in report) and not report.not_converted
    assert all("copied: weight" in r.note and "outputs differ" in r.note for r in report), str(report)
    assert all(isinstance(model.get_submodule(r.name), normkit.RMSNorm) for r in report)

    # Llama's RMSNorm to the registered rmsnorm *is* exact, and Gemma keeps its offset
    for name in ("llama", "gemma"):
        if name not in BUILDERS:
            continue
        m = _build(name)
        ref = _logits(m, IDS)
        rep = replace_norms(m, "rms")
        assert rep.all_exact, str(rep)
        torch.testing.assert_close(_logits(m, IDS), ref)


def test_where_selects_and_kwargs_reach_the_new_modules():
    model = _build("llama")
    report = replace_norms(model, where=lambda name, m: name.endswith("input_layernorm"), backend="eager")
    assert [r.name for r in report] == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    assert model.model.layers[0].input_layernorm.backend == "eager"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    cnn = _cnn()
    assert [r.name for r in replace_norms(cnn, where=nn.GroupNorm)] == ["gn"]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        replace_norms(_cnn(), backend="nope")


def test_no_norm_and_bad_target():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    report = replace_norms(model)
    assert report == [] and report.model is model
    with pytest.raises(ValueError, match="not a registered norm; registered names: .*rmsnorm"):
        replace_norms(model, "not_a_norm")
    with pytest.raises(TypeError, match="nn.Module"):
        replace_norms("model")


class WeirdRMSNorm(nn.Module):
    """Looks like an RMSNorm (name, weight, eps) but is not one: refused with the reason."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x):
        return torch.tanh(x) * self.weight


class T5StyleLayerNorm(nn.Module):
    """transformers' T5LayerNorm: named LayerNorm, computes an RMSNorm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def test_look_alikes_are_checked_by_behaviour():
    model = nn.Sequential(WeirdRMSNorm(8), T5StyleLayerNorm(8))
    x = torch.randn(2, 8)
    ref = model(x)
    report = replace_norms(model)
    weird, t5 = report
    assert weird.new is None and not weird.exact and "no exact normkit equivalent" in weird.note
    assert isinstance(model[0], WeirdRMSNorm)
    assert t5.exact and t5.new == "RMSNorm" and model[1].weight_offset == 0.0
    torch.testing.assert_close(model(x), ref)
    assert len(report.converted) == 1 and len(report.not_converted) == 1


def test_class_patch_builds_normkit_modules_and_restores():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm
    plain = _build("llama")
    with patch_transformers_classes() as handle:
        assert "transformers.models.llama.modeling_llama.LlamaRMSNorm" in handle.patched
        torch.manual_seed(0)
        patched = _llama().eval()
    assert modeling_llama.LlamaRMSNorm is original
    assert isinstance(patched.model.norm, NormkitLlamaRMSNorm)
    assert patched.model.norm.variance_epsilon == plain.model.norm.variance_epsilon
    assert list(patched.state_dict()) == list(plain.state_dict())
    patched.load_state_dict(plain.state_dict())
    torch.testing.assert_close(_logits(patched, IDS), _logits(plain, IDS))
    assert isinstance(_llama().model.norm, original)

    if "gemma" in BUILDERS:
        plain = _build("gemma")
        handle = patch_transformers_classes()
        try:
            patched = _gemma().eval()
        finally:
            handle.restore()
        assert isinstance(patched.model.norm, NormkitGemmaRMSNorm)
        assert torch.count_nonzero(patched.model.norm.weight) == 0  # Gemma's zero init of w in (1 + w)
        patched.load_state_dict(plain.state_dict())
        torch.testing.assert_close(_logits(patched, IDS), _logits(plain, IDS))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_transformers_stays_optional():
    out = _run("import sys, normkit, normkit.convert; normkit.convert.replace_norms\n"
               "print('transformers' in sys.modules, 'normkit.convert' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    out = _run("import sys; import normkit; print('normkit.convert' in sys.modules, 'transformers' in sys.modules)")
    assert out.stdout.split() == ["False", "False"], out.stderr
    out = _run("import sys; sys.modules['transformers'] = None\n"
               "try:\n    import normkit.integrations.transformers\n"
               "except ImportError as e:\n    print('ImportError:', e)")
    assert "ImportError: normkit.integrations.transformers needs the `transformers` package" in out.stdout, out.stderr
    assert "normkit[hf]" in out.stdout


def test_model_untouched_copy_is_independent():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    report = replace_norms(model, inplace=False)
    with torch.no_grad():
        report.model.bn.weight.add_(1.0)
    torch.testing.assert_close(model.state_dict(), before)
