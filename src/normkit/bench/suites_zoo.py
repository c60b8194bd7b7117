"""Bench suites for the literature's methods: ``microbatch``, ``transformer``, ``selfnorm``.

Each suite trains small models on scikit-learn's digits and prints the papers' headline
claims beside our numbers. The data set is small, so gaps under about one point are within
seed noise (359 test images); run with ``--full`` for three seeds before reading much into
them. Layers are imported when a job is built, so listing the suites costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normkit.bench.models import SmallCNN, TinyViT
from normkit.bench.suites import Job, SuiteConfig, claim_line, mean_acc, register_suite
from normkit.data import DataSplit, load_digits

# --------------------------------------------------------------------------- microbatch


def _ws_conv() -> Callable[..., nn.Module]:
    from normkit.nn.weight_standardization import WSConv2d

    return WSConv2d


#: label → (norm name, convolution with weight standardization?, norm contains its activation?)
MICROBATCH_NORMS: dict[str, tuple[str, bool, bool]] = {
    "batchnorm": ("batchnorm", False, False),
    "groupnorm": ("groupnorm", False, False),
    "groupnorm+ws": ("groupnorm", True, False),
    "bcn+ws": ("bcn", True, False),
    "evonorm_b0": ("evonorm_b0", False, True),
    "evonorm_s0": ("evonorm_s0", False, True),
    "frn": ("frn", False, True),
    "ibn": ("ibn", False, False),
}


def _cnn(label: str) -> nn.Module:
    norm, ws, has_act = MICROBATCH_NORMS[label]
    kwargs: dict[str, Any] = {}
    if ws:
        kwargs["conv"] = _ws_conv()
    if has_act:  # EvoNorm and FRN+TLU are normalization-activation layers
        kwargs["act"] = nn.Identity
    return SmallCNN(norm, **kwargs)


def _microbatch_claims(results: list[dict[str, Any]]) -> list[str]:
    """GN (Wu & He 2018), WS+BCN (Qiao et al. 2019), EvoNorm (Liu et al. 2020): BN alone degrades at micro-batch."""
    acc = {(n, bs): mean_acc(results, model="cnn", norm=n, batch_size=bs) for n in MICROBATCH_NORMS for bs in (64, 2)}
    drop = {n: acc[n, 64] - acc[n, 2] for n in MICROBATCH_NORMS if acc[n, 64] is not None and acc[n, 2] is not None}
    if "batchnorm" not in drop:
        return []
    holders = [n for n in ("groupnorm+ws", "bcn+ws", "evonorm_s0") if n in drop]
    ours = ", ".join(f"{n} {acc[n, 64]:.1%}→{acc[n, 2]:.1%}" for n in ["batchnorm", *holders])
    held = all(drop[n] < drop["batchnorm"] for n in holders) if holders else None
    lines = [
        claim_line(
            "Wu & He 2018; Qiao et al. 2019; Liu et al. 2020",
            "from batch 64 to 2, BN loses more accuracy than GN+WS, BCN+WS and EvoNorm-S0",
            ours + " (batch 64 → 2)",
            held,
        )
    ]
    if held is False and drop["batchnorm"] < 0.01:
        lines.append("    note: BN lost < 1 pt at batch 2 on 8×8 digits: the micro-batch regime barely hurts BN here")
    return lines


@register_suite(
    "microbatch",
    description="digits CNN at batch 64 and 2: BN vs GN, GN+WS, BCN+WS, EvoNorm-B0/S0, FRN, IBN",
    claims=_microbatch_claims,
)
def microbatch(cfg: SuiteConfig) -> list[Job]:
    """Image norms for micro-batch training, each in the same small CNN at batch 64 and 2."""
    epochs = 16 if cfg.full else 8
    return [
        Job("digits", "cnn", label, _cnn, bs, epochs, 1e-2 if bs >= 32 else 1e-3) for bs in (64, 2) for label in MICROBATCH_NORMS
    ]


# --------------------------------------------------------------------------- transformer


def _token_bn(num_features: int) -> nn.Module:
    from normkit.nn.batch_norm import BatchNorm

    return BatchNorm(num_features, channels_last=True)


def _vit_with_layernorm_scaling(_: str) -> nn.Module:
    from normkit.nn.layer_norm_scaling import apply_layernorm_scaling

    model = TinyViT("layernorm")
    apply_layernorm_scaling(model.blocks)  # block ℓ's norms scaled by 1/sqrt(ℓ); the final norm is not
    return model


def _vit(norm: str | Callable[[int], nn.Module]) -> Callable[[str], nn.Module]:
    return lambda _: TinyViT(norm)


#: label → builder of the ViT for that norm (labels are registry names where one exists).
TRANSFORMER_NORMS: dict[str, Callable[[str], nn.Module]] = {
    "layernorm": _vit("layernorm"),
    "rmsnorm": _vit("rmsnorm"),
    "crmsnorm": _vit("crmsnorm"),
    "powernorm": _vit("powernorm"),
    "unifiednorm": _vit("unifiednorm"),
    "batchnorm": _vit(_token_bn),
    "repbn": _vit("repbn"),
    "prepbn": _vit("prepbn"),
    "dyt": _vit("dyt"),
    "layernorm_scaling": _vit_with_layernorm_scaling,
}


def _transformer_claims(results: list[dict[str, Any]]) -> list[str]:
    acc = {n: mean_acc(results, model="vit", norm=n) for n in TRANSFORMER_NORMS}
    lines = []

    def have(*names: str) -> bool:
        return all(acc.get(n) is not None for n in names)

    if have("powernorm", "layernorm", "batchnorm"):
        ours = f"PN {acc['powernorm']:.1%}, LN {acc['layernorm']:.1%}, BN {acc['batchnorm']:.1%}"
        pn_ok = acc["powernorm"] >= acc["layernorm"] - 0.01  # "≥" up to seed noise
        lines.append(claim_line("Shen et al. 2020 (PowerNorm)", "PN ≥ LN > BN in transformers", ours,
                                pn_ok and acc["layernorm"] > acc["batchnorm"]))  # fmt: skip
    for name, source in (("unifiednorm", "Yang et al. 2022 (UN)"), ("prepbn", "Guo et al. 2024 (SLAB)")):
        if have(name, "layernorm"):
            gap = acc[name] - acc["layernorm"]
            ours = f"{name} {acc[name]:.1%} vs LN {acc['layernorm']:.1%} ({gap * 100:+.1f} pt)"
            lines.append(claim_line(source, f"{name} ≈ LN (within 1 pt)", ours, abs(gap) <= 0.01))
    return lines


@register_suite(
    "transformer",
    description="digits ViT: LN vs RMSNorm, CRMSNorm, PowerNorm, UN, BN, RepBN, PRepBN, DyT, LN-Scaling",
    claims=_transformer_claims,
)
def transformer(cfg: SuiteConfig) -> list[Job]:
    """Token norms in the same tiny ViT (2×2 patches, 2 pre-norm blocks) at batch 64."""
    epochs = 60 if cfg.full else 30
    return [Job("digits", "vit", label, build, 64, epochs, 1e-2, weight_decay=0.05) for label, build in TRANSFORMER_NORMS.items()]


# --------------------------------------------------------------------------- selfnorm

SELFNORM_DEPTH = 32
SELFNORM_WIDTH = 64


class _MLP(nn.Module):
    """Flatten → ``depth`` × (Linear → [BatchNorm1d] → ReLU) → Linear; torch's default init."""

    def __init__(self, depth: int, width: int, batch_norm: bool, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else width, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _snn(_: str) -> nn.Module:
    from normkit.models.self_normalizing import self_normalizing_mlp

    return nn.Sequential(nn.Flatten(), self_normalizing_mlp(64, 10, depth=SELFNORM_DEPTH, width=SELFNORM_WIDTH))


#: label → model builder for the 32-layer MLPs.
SELFNORM_MODELS: dict[str, Callable[[str], nn.Module]] = {
    "selu+lecun": _snn,
    "relu": lambda _: _MLP(SELFNORM_DEPTH, SELFNORM_WIDTH, batch_norm=False),
    "relu+bn": lambda _: _MLP(SELFNORM_DEPTH, SELFNORM_WIDTH, batch_norm=True),
}


@torch.no_grad()
def layer_statistics(model: nn.Module, data: DataSplit) -> dict[str, list[float]]:
    """Mean and variance of every hidden activation layer's output on the test set (eval mode).

    Hidden activations are the outputs of the model's ``SELU``/``ReLU`` modules, in order.
    """
    model.eval()
    acts = [m for m in model.modules() if isinstance(m, nn.SELU | nn.ReLU)]
    stats: list[tuple[float, float]] = []
    hooks = [a.register_forward_hook(lambda _m, _i, out: stats.append((out.mean().item(), out.var().item()))) for a in acts]
    try:
        model(data.x_test)
    finally:
        for h in hooks:
            h.remove()
    return {"layer_mean": [m for m, _ in stats], "layer_var": [v for _, v in stats]}


SELFNORM_LRS = (1e-3, 1e-2)


def _best(results: list[dict[str, Any]], norm: str) -> tuple[float | None, dict[str, Any] | None]:
    """Best accuracy of ``norm`` over the learning-rate grid, and one run at that rate."""
    by_lr = {lr: mean_acc(results, norm=norm, lr=lr) for lr in SELFNORM_LRS}
    by_lr = {lr: a for lr, a in by_lr.items() if a is not None}
    if not by_lr:
        return None, None
    lr = max(by_lr, key=lambda k: by_lr[k])
    run = next(r for r in results if r["norm"] == norm and r["lr"] == lr and r["status"] == "ok")
    return by_lr[lr], run


def _selfnorm_claims(results: list[dict[str, Any]]) -> list[str]:
    best = {n: _best(results, n) for n in SELFNORM_MODELS}
    acc = {n: a for n, (a, _) in best.items()}
    lines = []
    if all(v is not None for v in acc.values()):
        ours = ", ".join(f"{n} {a:.1%} (lr {best[n][1]['lr']:g})" for n, a in acc.items())
        lines.append(claim_line(
            "Klambauer et al. 2017 (SNN)",
            f"a {SELFNORM_DEPTH}-layer SELU MLP trains at least as well as ReLU+BN; plain ReLU does not train",
            ours + " (best of the lr grid)",
            acc["selu+lecun"] >= acc["relu+bn"] - 0.01 and acc["selu+lecun"] > acc["relu"] + 0.01,
        ))  # fmt: skip
    if "selu+lecun" in {r["norm"] for r in results}:
        # The fixed-point theorem is about the initialization (weights of mean 0, variance 1/n):
        # measure it on a fresh network, then report the trained network's statistics beside it.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            init = layer_statistics(_snn(""), load_digits())
        means, variances = init["layer_mean"], init["layer_var"]
        deep = slice(len(variances) // 2, None)  # the attractor must hold in the deeper half, not just layer 1
        ok = all(abs(m) < 0.2 for m in means[deep]) and all(0.7 < v < 1.3 for v in variances[deep])
        ours = (f"at init, layers {len(variances) // 2 + 1}-{len(variances)}: means in [{min(means[deep]):+.2f}, "
                f"{max(means[deep]):+.2f}], variances in [{min(variances[deep]):.2f}, {max(variances[deep]):.2f}]")  # fmt: skip
        _, snn = best.get("selu+lecun", (None, None))
        if snn is not None and snn.get("layer_var"):
            ours += (f"; after training: means in [{min(snn['layer_mean']):+.2f}, {max(snn['layer_mean']):+.2f}], "
                     f"variances in [{min(snn['layer_var']):.2f}, {max(snn['layer_var']):.2f}]")  # fmt: skip
        lines.append(claim_line("Klambauer et al. 2017 (SNN)", "SELU activations are drawn to mean 0, variance 1 through depth",
                                ours, ok))  # fmt: skip
    return lines


def _selfnorm_plots(results: list[dict[str, Any]], out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results if r["status"] == "ok" and r.get("layer_var")]
    if not rows:
        return []
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_m, ax_v = fig.subplots(1, 2)
    for r in rows:
        layers = range(1, len(r["layer_var"]) + 1)
        label = f"{r['norm']} lr {r['lr']:g} (seed {r['seed']})"
        ax_m.plot(layers, r["layer_mean"], label=label)
        ax_v.plot(layers, r["layer_var"], label=label)
    ax_m.set(xlabel="layer", ylabel="activation mean", title="mean per layer (test set)")
    ax_v.set(xlabel="layer", ylabel="activation variance", yscale="log", title="variance per layer (test set)")
    ax_v.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_m.legend(fontsize=7)
    path = out / "selfnorm_layers.png"
    fig.savefig(path, dpi=120)
    return [path]


@register_suite(
    "selfnorm",
    description=f"digits {SELFNORM_DEPTH}-layer MLP: SELU+LeCun vs ReLU vs ReLU+BN, per-layer activation statistics",
    claims=_selfnorm_claims,
    plots=_selfnorm_plots,
)
def selfnorm(cfg: SuiteConfig) -> list[Job]:
    """Deep MLPs on flattened digits at two learning rates (claims use each model's best).

    The activations of every hidden layer on the test set are plotted (selfnorm_layers.png).
    """
    epochs = 30 if cfg.full else 15
    return [
        Job("digits", f"mlp{SELFNORM_DEPTH} lr={lr:g}", label, build, 64, epochs, lr, measure=layer_statistics)
        for lr in SELFNORM_LRS
        for label, build in SELFNORM_MODELS.items()
    ]
