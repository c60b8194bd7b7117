"""fold_norms: every foldable norm's eval form (written out here), folded after and before Conv/Linear layers.

Each norm's eval map is checked against a plain formula in this file, then the folded model against the
original: float64 to 1e-10, float32 to its rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit.convert.fold import eval_affine, fold_norms
from normkit.models.resnet import ResNet

C = 6


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics (variances in [0.5, 2]), so the fold matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if not t.is_floating_point() or name.endswith(("buffer_x2", "buffer_gz", "ema_gz", "estbn_moving_speed")):
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64) * 1.5 + 0.5 if ("var" in name or "phi" in name) else (
                torch.randn(t.shape, generator=g, dtype=torch.float64)
            )
            t.copy_(r.to(t.dtype))
    return m.eval()


# Each entry: (builder of the norm for C channels, its eval map written plainly, layout).
def _bn_formula(m, x, dim):
    v = [-1 if i == dim % x.dim() else 1 for i in range(x.dim())]
    return (x - m.running_mean.view(v)) / torch.sqrt(m.running_var.view(v) + m.eps) * m.weight.view(v) + m.bias.view(v)


def _rep_formula(m, x, dim):
    bn = m.bn
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias + m.alpha * x


def _un_formula(m, x, dim):
    return m.weight * x / torch.sqrt(m.running_var + m.eps) + m.bias


def _pn_formula(m, x, dim):
    if m.num_groups is not None:  # GroupScaling: each token over its group of C / G channels
        xg = x.reshape(*x.shape[:-1], m.num_groups, -1)
        x = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + m.group_eps)).reshape(x.shape)
    return m.weight * x / torch.sqrt(m.running_phi + m.eps) + m.bias


def _bcn_formula(m, x, dim):
    a = _bn_formula(m.pbn, x, 1)
    ag = a.reshape(a.shape[0], m.num_groups, -1)
    mean, var = ag.mean(-1, keepdim=True), ag.var(-1, unbiased=False, keepdim=True)
    return (((ag - mean) / torch.sqrt(var + m.eps)) * m.weight + m.bias).reshape(x.shape)


def _evo_formula(m, x, dim):
    return x * m.weight.view(1, -1, *([1] * (x.dim() - 2))) + m.bias.view(1, -1, *([1] * (x.dim() - 2)))


def _prep():
    m = normkit.PRepBN(C, warm=0, total_step=3)
    return m


CHANNELS_FIRST = {
    "torch_bn": (lambda: nn.BatchNorm2d(C), lambda m, x: _bn_formula(m, x, 1)),
    "batchnorm": (lambda: normkit.BatchNorm2d(C), lambda m, x: _bn_formula(m, x, 1)),
    "ghostbn": (lambda: normkit.GhostBatchNorm(C, 2), lambda m, x: _bn_formula(m, x, 1)),
    "batchrenorm": (lambda: normkit.BatchRenorm(C), lambda m, x: _bn_formula(m, x, 1)),
    "estbn": (lambda: normkit.EstBN(C), lambda m, x: _bn_formula(m, x, 1)),
    "bcn": (lambda: normkit.BatchChannelNorm(C, num_groups=2), lambda m, x: _bcn_formula(m, x, 1)),
    "evonorm_b0_linear": (lambda: normkit.EvoNormB0(C, apply_act=False), lambda m, x: _evo_formula(m, x, 1)),
}
CHANNELS_LAST = {
    "repbn": (lambda: normkit.RepBN(C), lambda m, x: _rep_formula(m, x, -1)),
    "prepbn": (_prep, lambda m, x: _rep_formula(m.norm2, x, -1)),
    "unifiednorm": (lambda: normkit.UnifiedNorm(C), lambda m, x: _un_formula(m, x, -1)),
    "powernorm": (lambda: normkit.PowerNorm(C, num_groups=2), lambda m, x: _pn_formula(m, x, -1)),
    "powernorm_nogroups": (lambda: normkit.PowerNorm(C, num_groups=None), lambda m, x: _pn_formula(m, x, -1)),
    "batchnorm_channels_last": (lambda: normkit.BatchNorm(C, channels_last=True), lambda m, x: _bn_formula(m, x, -1)),
}
#: norms that fold on one side only
ONLY = {"bcn": "after", "powernorm": "before"}


@pytest.mark.parametrize("name", sorted({**CHANNELS_FIRST, **CHANNELS_LAST}))
def test_eval_form_matches_the_written_formula(name):
    build, formula = {**CHANNELS_FIRST, **CHANNELS_LAST}[name]
    m = _randomise(build().double())
    shape = (4, C, 3, 3) if name in CHANNELS_FIRST else (4, 5, C)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m(x), formula(m, x), rtol=1e-12, atol=1e-12)


def _model(name: str, side: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    first = name in CHANNELS_FIRST
    build = (CHANNELS_FIRST if first else CHANNELS_LAST)[name][0]
    torch.manual_seed(1)
    if first:
        pre = nn.Conv2d(3, C, 3, padding=1, bias=False)
        post = nn.Conv2d(C, 4, 3, padding=0, groups=2)  # no padding: folding before it is exact
        x = torch.randn(2, 3, 6, 6)
    else:
        pre, post = nn.Linear(5, C), nn.Linear(C, 3, bias=False)
        x = torch.randn(2, 7, 5)
    norm = _randomise(build())
    layers = [pre, norm, nn.ReLU(), post] if side == "after" else [pre, nn.ReLU(), norm, post]
    return nn.Sequential(*layers).to(dtype).eval(), x.to(dtype)


CASES = [(n, s) for n in sorted({**CHANNELS_FIRST, **CHANNELS_LAST}) for s in ("after", "before") if ONLY.get(n, s) == s]


@pytest.mark.parametrize(("name", "side"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_is_exact(name, side, dtype):
    model, x = _model(name, side, dtype)
    report = fold_norms(model, example_inputs=x, sides=(side,))
    assert [(f.norm, f.side) for f in report.folded] == [("1" if side == "after" else "2", side)], str(report)
    with torch.no_grad():
        want, got = model(x), report.model(x)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert report.max_abs_diff is not None and report.max_abs_diff < (1e-10 if dtype == torch.float64 else 1e-4)
    assert not any(isinstance(m, (nn.BatchNorm2d, normkit.RepBN)) for m in report.model.modules())
    assert model[1 if side == "after" else 2] is not None  # the original is untouched (a copy was folded)


def test_linear_then_batchnorm1d_and_sequential_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, C), _randomise(nn.BatchNorm1d(C)), nn.Linear(C, 2)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="assuming"):
        r = fold_norms(model, adjacency="sequential")
    assert r.adjacency == "sequential" and len(r.folded) == 1 and "assumes" in r.folded[0].note
    torch.testing.assert_close(r.model(x), model(x), rtol=0, atol=1e-10)
    # on 3-D input the Linear's features are not BatchNorm1d's channels: shapes from example_inputs refuse it
    model3 = nn.Sequential(nn.Linear(4, 3), _randomise(nn.BatchNorm1d(3)), nn.Linear(3, 2)).double().eval()
    r3 = fold_norms(model3, example_inputs=torch.randn(2, 3, 4, dtype=torch.float64))
    assert not r3.folded and "3-D" in r3.not_folded[0].reason


def test_resnet_folds_every_batchnorm():
    torch.manual_seed(0)
    net = ResNet("basic", (1, 1, 1, 1), widths=(4, 8, 8, 8), stem_width=4, num_classes=3, small_input=True)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _randomise(m)
    net = net.double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model, report = fold_norms(net, example_inputs=x)
    assert report.adjacency == "fx" and len(report.folded) == 12 and not report.not_folded
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=1e-10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_not_foldable_norms_are_reported_with_reasons():
    model = nn.Sequential(
        nn.Conv2d(3, C, 1), nn.GroupNorm(2, C), nn.Conv2d(C, C, 3, padding=1), nn.ReLU(),
        _randomise(normkit.EvoNormB0(C)), nn.Conv2d(C, C, 1), _randomise(nn.BatchNorm2d(C)),
    ).eval()
    r = fold_norms(model, sides=("before",))
    reasons = {n.name: n.reason for n in r.not_folded}
    assert "not a per-channel affine" in reasons["1"]
    assert "apply_act=True" in reasons["4"]
    assert "no adjacent" in reasons["6"] or "before" in reasons["6"]
    padded = nn.Sequential(_randomise(nn.BatchNorm2d(3)), nn.Conv2d(3, 2, 3, padding=1)).eval()
    assert "padded" in fold_norms(padded).not_folded[0].reason
    reflect = nn.Sequential(_randomise(nn.BatchNorm2d(3)), nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    r = fold_norms(reflect, example_inputs=x)
    assert len(r.folded) == 1 and r.max_abs_diff < 1e-10  # reflect padding copies normalized values: exact
    ws = nn.Sequential(normkit.WSConv2d(3, C, 3), _randomise(nn.BatchNorm2d(C))).eval()
    assert "weight standardization" in fold_norms(ws).not_folded[0].reason


def test_a_subclass_with_another_eval_form_is_refused():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = nn.Sequential(nn.Conv2d(3, C, 1), _randomise(Shifted(C))).eval()
    r = fold_norms(model)
    assert not r.folded and "differs from its per-channel affine form" in r.not_folded[0].reason


def test_prepbn_eval_mix_folds_only_after_its_schedule():
    m = _randomise(normkit.PRepBN(C, total_step=2, eval_mix=True))
    with pytest.raises(Exception, match="mid-schedule"):
        eval_affine(m)
    m.iter.zero_()
    eval_affine(m)


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_norms("model")
    with pytest.raises(ValueError, match="training mode"):
        fold_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="no normalization layer"):
        fold_norms(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="sides"):
        fold_norms(nn.Sequential(nn.BatchNorm1d(2)).eval(), sides=("left",))


def test_readme_fold_snippet_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### Fold norms for inference, tune-mode ConvBN for fine-tuning", 1)[1]
    namespace: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "README.md (fold)", "exec"), namespace)  # noqa: S102
    assert len(namespace["fold_report"].folded) == 12 and namespace["fold_report"].max_abs_diff < 1e-4


def test_hf_resnet_is_traced_per_submodule_and_folds_exactly():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 8], depths=[1, 1], num_labels=3)
    net = transformers.ResNetForImageClassification(cfg)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m)
    net = net.double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model, report = fold_norms(net, example_inputs=(x,))
    assert report.adjacency.startswith("fx per submodule") and len(report.folded) == 8 and not report.not_folded
    torch.testing.assert_close(model(x).logits, net(x).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("arch", "norm"), [("cnn", "bcn"), ("cnn", "estbn"), ("vit", "repbn"), ("vit", "powernorm")])
def test_bench_models_fold_exactly(arch, norm):
    from normkit.bench.models import SmallCNN, TinyViT

    torch.manual_seed(0)
    model = SmallCNN(norm) if arch == "cnn" else TinyViT(norm)
    for m in model.modules():
        if type(m).__name__ in ("BatchChannelNorm", "EstBN", "RepBN", "PowerNorm"):
            _randomise(m)
    model = model.double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    report = fold_norms(model, example_inputs=x)
    # the CNN's three norms fold after their convs; the ViT's two pre-norms per block fold into qkv / fc1
    # (x.shape reads do not count as users); its final norm is followed by a token mean, not a Linear
    assert len(report.folded) == (3 if arch == "cnn" else 4), str(report)
    assert report.max_abs_diff < 1e-10


def _bn(c: int) -> nn.BatchNorm2d:
    return _randomise(nn.BatchNorm2d(c))


class _TiedConvs(nn.Module):
    """c1 and c2 share one weight: folding bn into c1 would also rescale c2."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), _bn(4)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.c2(self.bn(self.c1(x))) + self.c2(x)


class _ReadsWeight(nn.Module):
    """The forward reads fc.weight itself besides calling fc."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), _randomise(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn(self.fc(x)) + x @ self.fc.weight.t()


@pytest.mark.parametrize("case", ["tied", "registered_twice", "reads_weight"])
def test_layers_used_elsewhere_are_not_folded_into(case):
    """A fold rewrites the layer's parameters in place: a tied weight, a module listed twice in a Sequential
    (invisible to the Sequential rule) or a direct read of the weight would see the folded values too."""
    torch.manual_seed(0)
    if case == "tied":
        model, x = _TiedConvs(), torch.randn(2, 4, 5, 5)
    elif case == "registered_twice":
        conv = nn.Conv2d(4, 4, 1)
        model, x = nn.Sequential(conv, _bn(4), nn.ReLU(), conv), torch.randn(2, 4, 5, 5)
    else:
        model, x = _ReadsWeight(), torch.randn(3, 4)
    model = model.double().eval()
    x = x.double()
    for adjacency in ("auto", "sequential"):
        r = fold_norms(model, example_inputs=x, adjacency=adjacency)
        assert not r.folded, str(r)
        assert r.max_abs_diff == 0.0
    adjacency = "sequential" if case == "registered_twice" else "fx"  # fx sees the two calls itself
    reason = fold_norms(model, example_inputs=x, adjacency=adjacency).not_folded[0].reason
    assert {"tied": "shared (tied)", "registered_twice": "registered as", "reads_weight": "reads"}[case] in reason


def test_zero_padded_conv_takes_a_fold_before_it_only_without_a_shift():
    """Before a zero-padded conv the border taps see 0 unfolded but c folded: exact only when c = 0."""
    bn = _bn(3)
    padded = nn.Sequential(nn.ReLU(), bn, nn.Conv2d(3, 2, 3, padding=1)).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert "shift is not 0" in fold_norms(padded, example_inputs=x).not_folded[0].reason
    with torch.no_grad():  # shift c = β − a·μ = 0
        bn.bias.zero_()
        bn.running_mean.zero_()
    r = fold_norms(padded, example_inputs=x)
    assert len(r.folded) == 1 and r.max_abs_diff < 1e-12


def test_assuming_nc_features_warns():
    model = nn.Sequential(nn.Linear(3, 3), _randomise(nn.BatchNorm1d(3))).eval()
    with pytest.warns(UserWarning, match=r"\(N, C\)"):
        fold_norms(model)


@pytest.mark.parametrize("kw", [dict(stride=2, dilation=2, groups=2), dict(stride=(1, 2), dilation=(2, 1)), dict(groups=4)])
def test_fold_before_strided_dilated_grouped_convs_is_exact(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(), _bn(4), nn.Conv2d(4, 8, 3, **kw)).double().eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    r = fold_norms(model, example_inputs=x)
    assert [(f.norm, f.side) for f in r.folded] == [("1", "before")] and r.max_abs_diff < 1e-12


def test_transposed_conv_is_named_in_the_reason():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), _bn(4)).eval()
    reason = fold_norms(model).not_folded[0].reason
    assert "transposed convolutions are not folded" in reason
