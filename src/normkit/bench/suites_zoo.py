"""Bench suites for the literature's methods: ``microbatch``, ``transformer``, ``selfnorm``, ``sequence``.

Each suite trains small models on a built-in task (microbatch: 32×32 scenes; transformer: the
byte LM; selfnorm and sequence: digits and MNIST-1D) and prints the papers' headline claims beside
our numbers, with paired-seed intervals (``normkit.bench.verdict``). Layers are imported when a
job is built, so listing the suites costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normkit.bench.suites import CHANCE_LOSS, Job, SuiteConfig, microbatch_claim, pct, register_suite, scenes_jobs
from normkit.bench.verdict import advantage, format_claim, not_learned, seed_mean
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


def _bcn_micro(num_channels: int) -> nn.Module:
    """BCN in its micro-batch form (``estimate=True``: the BN stage normalizes with running estimates, EstBN)."""
    from normkit.registry import sample_norm

    return sample_norm("bcn", num_channels, estimate=True)


def _cnn(label: str, *, scenes: bool = False, micro: bool = False) -> nn.Module:
    """The micro-batch CNN for ``label``: the digits ``SmallCNN``, or the ``SceneCNN`` with ``scenes``.

    ``micro`` (the batch-2 jobs): a norm with a separate micro-batch form uses it — BCN's EstBN stage
    (:data:`MICROBATCH_FORMS`), as Qiao et al. train BCN at 1–2 images per GPU."""
    from normkit.bench.models import SmallCNN
    from normkit.bench.models_tasks import SceneCNN

    norm, ws, has_act = MICROBATCH_NORMS[label]
    norm = MICROBATCH_FORMS.get(norm, norm) if micro else norm
    kwargs: dict[str, Any] = {}
    if ws:
        kwargs["conv"] = _ws_conv()
    if has_act:  # EvoNorm and FRN+TLU are normalization-activation layers
        kwargs["act"] = nn.Identity
    return SceneCNN(norm, **kwargs) if scenes else SmallCNN(norm, **kwargs)


#: norm → its micro-batch form, used by the batch-2 jobs. BCN: Qiao et al. 2019 (arXiv:1903.10520) §5 train
#: BCN at micro-batch sizes with *estimated* statistics in the BN stage (official README ``BCNorm(estimate=True)``,
#: :class:`normkit.nn.EstBN`, here with moving speed 0.1 from the first step); at batch 64 BCN's BN stage uses
#: batch statistics (the official large-batch code). The earlier suite ran the batch-statistics form at batch 2
#: too, which inherits BN's micro-batch noise and does not test the paper's micro-batch method.
MICROBATCH_FORMS: dict[str, Callable[[int], nn.Module] | str] = {"bcn": _bcn_micro}


def _scene_cnn(label: str) -> nn.Module:
    return _cnn(label, scenes=True)


def _scene_cnn_micro(label: str) -> nn.Module:
    return _cnn(label, scenes=True, micro=True)


def microbatch_scenes_jobs(cfg: SuiteConfig, epochs: float | None = None) -> list[Job]:
    """The micro-batch jobs on scenes (:func:`normkit.bench.suites.scenes_jobs`) for the norms of ``MICROBATCH_RUN``;
    the batch-2 jobs build each norm's micro-batch form (:data:`MICROBATCH_FORMS`)."""
    return [
        *scenes_jobs(cfg, list(MICROBATCH_RUN), build=_scene_cnn, batch_sizes=(64,), epochs=epochs),
        *scenes_jobs(cfg, list(MICROBATCH_RUN), build=_scene_cnn_micro, batch_sizes=(2,), epochs=epochs),
    ]


#: alternative → (label, source) of the micro-batch claims: each is tested against BN on its own line.
MICROBATCH_CLAIMS: dict[str, tuple[str, str]] = {
    "groupnorm": ("GN", "Wu & He 2018 (GroupNorm, arXiv:1803.08494)"),
    "groupnorm+ws": ("GN+WS", "Qiao et al. 2019 (WS, arXiv:1903.10520)"),
    "bcn+ws": ("BCN+WS", "Qiao et al. 2019 (BCN, arXiv:1903.10520; EstBN stage at batch 2)"),
    "evonorm_s0": ("EvoNorm-S0", "Liu et al. 2020 (EvoNorm, arXiv:2004.02967)"),
}


def _microbatch_claims(results: list[dict[str, Any]]) -> list[str]:
    """GN, WS+BCN, EvoNorm-S0: from batch 64 to 2, BN's accuracy drops, each alternative's much less (paired seeds)."""
    present = {r["norm"] for r in results if r["status"] == "ok"}
    tasks = [r["task"] for r in results if r.get("model") == "cnn"]
    if "batchnorm" not in present or not tasks:
        return []
    return [
        microbatch_claim(results, norm, label, task=tasks[0], source=source)
        for norm, (label, source) in MICROBATCH_CLAIMS.items()
        if norm in present
    ]


#: The norms the microbatch suite trains: BN and the four with a micro-batch claim. EvoNorm-B0, FRN and
#: IBN (in MICROBATCH_NORMS, ``_cnn`` builds them) make no micro-batch claim; they are left out to keep
#: the full bench within 30 minutes on 2 cores.
MICROBATCH_RUN = ("batchnorm", "groupnorm", "groupnorm+ws", "bcn+ws", "evonorm_s0")


@register_suite(
    "microbatch",
    description="scenes CNN at batch 64 and 2: BN vs GN, GN+WS, BCN+WS, EvoNorm-S0",
    claims=_microbatch_claims,
    seeds=3,
    full_seeds=3,
    scope="ImageNet/COCO-scale effects after ~100 epochs: ours is a 4-conv CNN on 5000 32×32 scenes, 3 epochs, "
    "where batch 64 is still far from converged (78 steps an epoch) while batch 2 takes 2500.",
)
def microbatch(cfg: SuiteConfig) -> list[Job]:
    """Image norms for micro-batch training: the scene CNN at batch 64 and 2, the same epochs for both.

    On scenes (:mod:`normkit.data.scenes`), where per-image colour, light and clutter make a batch of
    two a poor estimate of BN's population statistics; on 8×8 digits BN at batch 2 lost nothing.
    :data:`normkit.bench.suites.SCENES_EPOCHS` epochs (BN at batch 64: 58%, seed 0) and Adam at
    3e-3 (batch 64) / 3e-4 (batch 2) for every norm, as :func:`normkit.bench.suites.scenes_jobs`.
    """
    return microbatch_scenes_jobs(cfg)


# --------------------------------------------------------------------------- transformer


def _token_bn(num_features: int) -> nn.Module:
    """BN over the batch and tokens of (B, T, C) activations, padded tokens left out (the PowerNorm
    and SLAB papers' BN baseline): BatchNorm(channels_last=True) takes the (B, T) mask as it is."""
    from normkit.nn.batch_norm import BatchNorm

    return BatchNorm(num_features, channels_last=True)


def _lm(norm: str | Callable[[int], nn.Module]) -> Callable[[str], nn.Module]:
    def build(_: str) -> nn.Module:
        from normkit.bench.models_tasks import ByteLM

        return ByteLM(norm)

    return build


def _lm_with_layernorm_scaling(_: str) -> nn.Module:
    from normkit.bench.models_tasks import ByteLM
    from normkit.nn.layer_norm_scaling import apply_layernorm_scaling

    model = ByteLM("layernorm")
    apply_layernorm_scaling(model.blocks)  # block ℓ's norms scaled by 1/sqrt(ℓ); the final norm is not
    return model


#: label → builder of the byte-level LM for that norm (labels are registry names where one exists).
TRANSFORMER_NORMS: dict[str, Callable[[str], nn.Module]] = {
    "layernorm": _lm("layernorm"),
    "rmsnorm": _lm("rmsnorm"),
    "crmsnorm": _lm("crmsnorm"),
    "powernorm": _lm("powernorm"),
    "unifiednorm": _lm("unifiednorm"),
    "batchnorm": _lm(_token_bn),
    "repbn": _lm("repbn"),
    "prepbn": _lm("prepbn"),
    "dyt": _lm("dyt"),
    "layernorm_scaling": _lm_with_layernorm_scaling,
}
#: The LM task's training: AdamW steps at batch 16 (padded sequences of 8–64 bytes), one lr for all.
LM_STEPS, LM_STEPS_FULL, LM_BATCH, LM_LR = 300, 300, 16, 3e-3  # full: more seeds, same length (30-min budget)
#: Equivalence margin of the "matches LN" claims, in val bits per byte.
LM_MARGIN = 0.02


#: (source, claim, a, b, direction, margin, paper setting): "a vs b" read as "a better than b".
TRANSFORMER_CLAIMS: tuple[tuple[str, str, str, str, str, float, str], ...] = (
    ("Shen et al. 2020 (PowerNorm, arXiv:2003.07845)", "BN is worse than LN in transformers", "layernorm", "batchnorm",
     "greater", 0.0, "IWSLT14/WMT14 translation, PTB/WikiText-103 LM"),
    ("Shen et al. 2020 (PowerNorm, arXiv:2003.07845)", "PN beats BN in transformers", "powernorm", "batchnorm",
     "greater", 0.0, "IWSLT14/WMT14 translation, PTB/WikiText-103 LM"),
    ("Shen et al. 2020 (PowerNorm, arXiv:2003.07845)", "PN is at least as good as LN (here: within 1 pt)", "powernorm",
     "layernorm", "noninferior", 0.01, "IWSLT14/WMT14 +0.4/+0.6 BLEU, PTB/WikiText-103 −5.6/−3.0 ppl vs LN"),
    ("Yang et al. 2022 (UN, arXiv:2208.01313)", "UN matches LN (here: within 1 pt)", "unifiednorm", "layernorm",
     "equivalent", 0.01, "IWSLT14/WMT14 translation, ImageNet ViT"),
    ("Guo et al. 2024 (SLAB, arXiv:2405.11582)", "PRepBN matches LN (here: within 1 pt)", "prepbn", "layernorm",
     "equivalent", 0.01, "ImageNet DeiT/Swin, Wikitext-103 LM"),
    ("Zhu et al. 2025 (DyT, arXiv:2503.10622)", "DyT matches LN (here: within 1 pt)", "dyt", "layernorm",
     "equivalent", 0.01, "ImageNet ViT/ConvNeXt, LLaMA 7B–70B pretraining"),
    ("Zhang & Sennrich 2019 (RMSNorm, arXiv:1910.07467)", "RMSNorm matches LN (here: within 1 pt)", "rmsnorm",
     "layernorm", "equivalent", 0.01, "WMT14 RNNsearch/Transformer, CNN/Daily Mail"),
    ("Sun et al. 2025 (LayerNorm Scaling, arXiv:2502.05795)", "scaling block ℓ's LN by 1/√ℓ improves on plain Pre-LN",
     "layernorm_scaling", "layernorm", "greater", 0.0, "LLaMA 130M–1B pretraining on C4 (perplexity)"),
)  # fmt: skip


def _transformer_claims(results: list[dict[str, Any]]) -> list[str]:
    """The transformer papers' headline claims, each a paired-seed verdict on val bits per byte (lower is better)."""
    from normkit.data.text import load_text

    present = {r["norm"] for r in results if r["status"] == "ok"}
    unigram = load_text().unigram_nats()  # the loss of an LM that learned no context
    lines = []
    for source, claim, a, b, direction, _margin, paper in TRANSFORMER_CLAIMS:
        if a not in present or b not in present:
            continue
        v = advantage(results, {"norm": a}, {"norm": b}, metric="test_loss", lower_is_better=True,
                      direction=direction, margin=LM_MARGIN if direction != "greater" else 0.0)  # type: ignore[arg-type]  # fmt: skip
        bpb = {n: seed_mean(results, "test_loss", norm=n) for n in (a, b)}
        stuck = not_learned(results, {a: {"norm": a}, b: {"norm": b}}, level=unigram, name="unigram")
        ours = (f"byte-level LM on stdlib docstrings, 4 pre-norm blocks, padded batches of 8–64 bytes: "
                f"val {a} {_bpb(bpb[a])} vs {b} {_bpb(bpb[b])} bits/byte")  # fmt: skip
        lines.append(format_claim(source, claim.replace("within 1 pt", f"within {LM_MARGIN} bits/byte"), v, paper=paper,
                                  ours=ours, scale=1.0, unit=" bpb (+ = first better)", digits=3, untrained=stuck))  # fmt: skip
    return lines


def _bpb(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


@register_suite(
    "transformer",
    description="byte-level LM, padded batches: LN vs RMSNorm, CRMSNorm, PowerNorm, UN, BN, RepBN, PRepBN, DyT, LN-Scaling",
    claims=_transformer_claims,
    seeds=3,
    full_seeds=3,
    scope="effects at 100M+ parameters, long training or translation: ours is a 4-block, dim-64 byte LM, a few hundred steps.",
)
def transformer(cfg: SuiteConfig) -> list[Job]:
    """Token norms in the same byte-level causal LM (4 pre-norm blocks, dim 64) on the stdlib text corpus.

    Variable-length padded batches, the setting of the PowerNorm and UN papers; batch-statistics norms
    see only the real tokens (gathered, then scattered back: PowerNorm's and UN's approximate backwards
    would otherwise send gradient into padded positions; see :mod:`normkit.bench.models_tasks`).
    Metric: val bits per byte.
    """
    from normkit.bench.train import train_lm_run

    steps = LM_STEPS_FULL if cfg.full else LM_STEPS
    return [
        Job("text", "lm", label, build, LM_BATCH, 0, LM_LR, weight_decay=0.01, extra={"steps": steps}, run=train_lm_run)
        for label, build in TRANSFORMER_NORMS.items()
    ]


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
#: Epochs of every selfnorm run (quick and full).
SELFNORM_EPOCHS = 15


def _best_lr(results: list[dict[str, Any]], norm: str) -> float | None:
    """The learning rate of the grid where ``norm`` has its best mean accuracy (one grid for all models)."""
    by_lr = {lr: seed_mean(results, norm=norm, lr=lr) for lr in SELFNORM_LRS}
    by_lr = {lr: a for lr, a in by_lr.items() if a is not None}
    return max(by_lr, key=lambda k: by_lr[k]) if by_lr else None


#: SELU fixed point at initialization (Klambauer et al. 2017, Theorem 1): bounds checked in the deeper half.
FIXED_POINT_MEAN, FIXED_POINT_VAR = 0.2, (0.7, 1.3)


def _selfnorm_claims(results: list[dict[str, Any]]) -> list[str]:
    source = "Klambauer et al. 2017 (SNN, arXiv:1706.02515)"
    lr = {n: _best_lr(results, n) for n in SELFNORM_MODELS}
    lines = []
    if all(v is not None for v in lr.values()):
        sel = {n: {"norm": n, "lr": lr[n]} for n in SELFNORM_MODELS}
        ours = ", ".join(f"{n} {pct(seed_mean(results, **sel[n]))} (lr {lr[n]:g})" for n in SELFNORM_MODELS)
        parts = {
            "SELU − ReLU+BN": advantage(results, sel["selu+lecun"], sel["relu+bn"], direction="noninferior", margin=0.01),
            "SELU − ReLU": advantage(results, sel["selu+lecun"], sel["relu"]),
        }
        lines.append(format_claim(
            source,
            f"a {SELFNORM_DEPTH}-layer SELU MLP trains at least as well as ReLU+BN (within 1 pt) and better than plain ReLU",
            parts,
            paper="121 UCI tasks, Tox21, HTRU2; FNNs up to 32 layers",
            ours=f"digits, {SELFNORM_DEPTH}×{SELFNORM_WIDTH} MLP, each model at its best lr of {list(SELFNORM_LRS)}: {ours}",
        ))  # fmt: skip
    if "selu+lecun" in {r["norm"] for r in results}:
        lines.append(_fixed_point_line(results, source))
    return lines


def _fixed_point_line(results: list[dict[str, Any]], source: str) -> str:
    """The fixed-point theorem is about initialization: measured on fresh networks, one per seed of the run.

    Deterministic given the seeds, so no interval: ``supported`` when every seed's deeper half stays in
    the bounds, ``contradicted`` when none does, ``inconclusive`` in between.
    """
    seeds = sorted({int(r.get("seed", 0)) for r in results}) or [0]
    ok, spans = [], []
    for seed in seeds:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            init = layer_statistics(_snn(""), load_digits())
        means, variances = init["layer_mean"], init["layer_var"]
        deep = slice(len(variances) // 2, None)  # the attractor must hold in the deeper half, not just layer 1
        lo, hi = FIXED_POINT_VAR
        ok.append(all(abs(m) < FIXED_POINT_MEAN for m in means[deep]) and all(lo < v < hi for v in variances[deep]))
        spans.append((min(means[deep]), max(means[deep]), min(variances[deep]), max(variances[deep])))
    label = "supported" if all(ok) else "contradicted" if not any(ok) else "inconclusive"
    m0, m1 = min(s[0] for s in spans), max(s[1] for s in spans)
    v0, v1 = min(s[2] for s in spans), max(s[3] for s in spans)
    ours = (f"at init, layers {SELFNORM_DEPTH // 2 + 1}-{SELFNORM_DEPTH}, {len(seeds)} seed(s): means in [{m0:+.2f}, {m1:+.2f}], "
            f"variances in [{v0:.2f}, {v1:.2f}]; in bounds (|mean| < {FIXED_POINT_MEAN}, var in {FIXED_POINT_VAR}) "
            f"for {sum(ok)}/{len(ok)} seeds")  # fmt: skip
    return (f"[{label}] {source}: SELU activations are drawn to mean 0, variance 1 through depth | "
            f"paper: Theorem 1 (fixed point (0, 1) for LeCun-normal weights) | ours: {ours}")  # fmt: skip


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
    scope="the paper's 121 UCI tasks, Tox21 and HTRU2: ours is one small image set (digits).",
)
def selfnorm(cfg: SuiteConfig) -> list[Job]:
    """Deep MLPs on flattened digits at two learning rates (claims use each model's best).

    The activations of every hidden layer on the test set are plotted (selfnorm_layers.png).
    """
    epochs = SELFNORM_EPOCHS  # --full adds a seed (2 → 3), not length: 30 epochs took ~250 CPU-s (2026-12-03)
    return [
        Job("digits", f"mlp{SELFNORM_DEPTH} lr={lr:g}", label, build, 64, epochs, lr, measure=layer_statistics)
        for lr in SELFNORM_LRS
        for label, build in SELFNORM_MODELS.items()
    ]


# --------------------------------------------------------------------------- sequence (MNIST-1D)


def _ln_chw(num_features: int) -> nn.Module:
    """The GroupNorm paper's "LN" baseline in a CNN: statistics over all of (C, L), i.e. GroupNorm with one group."""
    from normkit.nn.batch_norm import GroupNorm

    return GroupNorm(num_features, 1)


def _seq_cnn(norm: str | Callable[[int], nn.Module]) -> Callable[[str], nn.Module]:
    def build(_: str) -> nn.Module:
        from normkit.bench.models_tasks import SeqCNN

        return SeqCNN(norm)

    return build


def _seq_transformer(norm: str | Callable[[int], nn.Module]) -> Callable[[str], nn.Module]:
    def build(_: str) -> nn.Module:
        from normkit.bench.models_tasks import SeqTransformer

        return SeqTransformer(norm)

    return build


#: label → builder of the 1-D CNN (conv → norm → ReLU ×3) on MNIST-1D; "ln" is the GN paper's LN (C, L).
SEQUENCE_CNN_NORMS: dict[str, Callable[[str], nn.Module]] = {
    "batchnorm": _seq_cnn("batchnorm"),
    "groupnorm": _seq_cnn("groupnorm"),
    "ln": _seq_cnn(_ln_chw),
    "instancenorm": _seq_cnn("instancenorm"),
}
#: label → builder of the transformer classifier over MNIST-1D's 40 positions (2 pre-norm blocks, dim 48).
SEQUENCE_TRANSFORMER_NORMS: dict[str, Callable[[str], nn.Module]] = {
    "layernorm": _seq_transformer("layernorm"),
    "rmsnorm": _seq_transformer("rmsnorm"),
    "dyt": _seq_transformer("dyt"),
}
#: Training of every sequence job (no per-claim or per-norm tuning): AdamW, batch 64, lr 3e-3 with
#: warm-up and cosine decay; epochs over MNIST-1D's 4000 training signals (quick, full). 6 epochs (372
#: steps) keep the suite at ~150 s on 2 idle cores; 10 epochs took 484 CPU-s (2026-12-03).
SEQUENCE_BATCH, SEQUENCE_LR, SEQUENCE_EPOCHS, SEQUENCE_EPOCHS_FULL = 64, 3e-3, 6, 6
#: Margin of the "close to" / "matches" claims: 1 pt of accuracy (1000 test signals: 1 pt = 10 signals).
SEQUENCE_MARGIN = 0.01
GN_TABLE1 = "ImageNet ResNet-50, batch 32/GPU (Table 1): top-1 error BN 23.6, GN 24.1, LN 25.3, IN 28.4"

#: (source, claim, a, b, direction, margin, paper setting) on the 1-D CNN: "a better than b".
SEQUENCE_CNN_CLAIMS: tuple[tuple[str, str, str, str, str, float, str], ...] = (
    ("Wu & He 2018 (GroupNorm, arXiv:1803.08494)", "at a normal batch GN is close to BN (here: within 1 pt)",
     "groupnorm", "batchnorm", "noninferior", SEQUENCE_MARGIN, GN_TABLE1),
    ("Wu & He 2018 (GroupNorm, arXiv:1803.08494)", "GN beats LN (statistics over all channels)", "groupnorm", "ln",
     "greater", 0.0, GN_TABLE1),
    ("Wu & He 2018 (GroupNorm, arXiv:1803.08494)", "GN beats IN", "groupnorm", "instancenorm", "greater", 0.0, GN_TABLE1),
    ("Ba et al. 2016 (LayerNorm, arXiv:1607.06450)", "LN is worse than BN in CNNs", "batchnorm", "ln", "greater", 0.0,
     "remark in §6: LN 'did not work as well as BN' in convolutional networks (no numbers)"),
)  # fmt: skip
#: The same on the transformer classifier (positions as tokens).
SEQUENCE_TRANSFORMER_CLAIMS: tuple[tuple[str, str, str, str, str, float, str], ...] = (
    ("Zhu et al. 2025 (DyT, arXiv:2503.10622)", "DyT matches LN in a classification transformer (here: within 1 pt)",
     "dyt", "layernorm", "equivalent", SEQUENCE_MARGIN, "ImageNet ViT-B/L supervised: 82.5/83.6 (DyT) vs 82.3/83.1 (LN)"),
    ("Zhang & Sennrich 2019 (RMSNorm, arXiv:1910.07467)", "RMSNorm matches LN (here: within 1 pt)", "rmsnorm",
     "layernorm", "equivalent", SEQUENCE_MARGIN, "WMT14 RNNsearch/Transformer, CNN/Daily Mail, image-caption retrieval"),
)  # fmt: skip


def _sequence_claims(results: list[dict[str, Any]]) -> list[str]:
    """The GN paper's Table 1 ranking on the 1-D CNN and the "matches LN" claims on the transformer, paired seeds."""
    lines = []
    for model, claims, what in (
        ("cnn1d", SEQUENCE_CNN_CLAIMS, f"MNIST-1D, 3-layer 1-D CNN, batch {SEQUENCE_BATCH}"),
        ("transformer", SEQUENCE_TRANSFORMER_CLAIMS, "MNIST-1D, 40 positions as tokens, 2 pre-norm blocks, dim 48"),
    ):
        present = {r["norm"] for r in results if r["status"] == "ok" and r.get("model") == model}
        for source, claim, a, b, direction, margin, paper in claims:
            if a not in present or b not in present:
                continue
            sel_a, sel_b = {"model": model, "norm": a}, {"model": model, "norm": b}
            v = advantage(results, sel_a, sel_b, direction=direction, margin=margin)  # type: ignore[arg-type]
            ours = f"{what}: {a} {pct(seed_mean(results, **sel_a))} vs {b} {pct(seed_mean(results, **sel_b))}"
            stuck = not_learned(results, {a: sel_a, b: sel_b}, level=CHANCE_LOSS, name="chance")
            lines.append(format_claim(source, claim, v, paper=paper, ours=ours, untrained=stuck))
    return lines


@register_suite(
    "sequence",
    description="MNIST-1D (40 positions): 1-D CNN with BN, GN, LN, IN; transformer over positions with LN, RMSNorm, DyT",
    claims=_sequence_claims,
    seeds=3,
    full_seeds=3,
    scope="ImageNet/WMT-scale effects: ours is a 3-layer 1-D CNN and a 2-block transformer on 4000 generated signals.",
)
def sequence(cfg: SuiteConfig) -> list[Job]:
    """The issue's sequence task: every sequence claim on MNIST-1D (:func:`normkit.data.mnist1d.load_mnist1d`).

    One task, one training recipe for every norm and both models (batch 64, AdamW lr 3e-3, weight
    decay 0.01 on kernels, warm-up + cosine); nothing tuned per claim or per norm.
    """
    from normkit.data.mnist1d import load_mnist1d

    epochs = SEQUENCE_EPOCHS_FULL if cfg.full else SEQUENCE_EPOCHS
    return [
        Job("mnist1d", model, label, build, SEQUENCE_BATCH, epochs, SEQUENCE_LR, weight_decay=0.01, data=load_mnist1d)
        for model, table in (("cnn1d", SEQUENCE_CNN_NORMS), ("transformer", SEQUENCE_TRANSFORMER_NORMS))
        for label, build in table.items()
    ]
