"""``normkit models``: train-step time of small real models with torch's norms vs normkit's, same run.

Four models, random init, no download, fp32:

* ``llama`` — a tiny ``transformers`` Llama (hidden 256, 2 layers, vocab 1000; batch 8 × 128 tokens),
  every ``LlamaRMSNorm`` → :class:`normkit.RMSNorm` (``eps=variance_epsilon``; in fp32 Llama's
  ``weight * (x * rsqrt(mean(x²) + eps))`` is exactly that layer). Skipped, with the reason printed,
  when ``transformers`` is not importable (it is an optional dependency).
* ``vit`` — a compact pre-LN ViT (patch 4 on 32×32 images, dim 192, 4 blocks; batch 32),
  ``nn.LayerNorm`` → :class:`normkit.LayerNorm`.
* ``resnet`` — a CIFAR-style ResNet (3 stages of 2 basic blocks, widths 32/64/128; batch 32 × 32×32),
  ``nn.BatchNorm2d`` → :class:`normkit.BatchNorm2d`.
* ``convnext`` — a ConvNeXt-style net (dwconv 7×7 → LayerNorm2d → 1×1 MLP blocks, dims 48/96/192;
  batch 16 × 64×64) whose LayerNorm2d is the plain torch code users write (timm's permute +
  ``F.layer_norm``, :class:`TorchLayerNorm2d`, eps 1e-6) → :class:`normkit.LayerNorm2d` with the
  same eps passed explicitly (normkit's default is 1e-5), and its head ``nn.LayerNorm`` →
  :class:`normkit.LayerNorm`.

``--quick`` (a smoke test for the test suite) uses smaller batches (:data:`BATCH`), eager mode only
and 3 rounds; its times say little.

The swap (:func:`_swap_norms`) replaces modules of an exact class by a factory's module and
loads the old module's state dict into it (strict: same keys), on the old module's device and
dtype. Before timing, every swapped model is checked against its original (:func:`check`, printed
as ``check``): train-mode outputs equal to fp32 tolerances (``torch.testing.assert_close``
defaults), and one step's outputs, parameter gradients and running statistics equal in float64
(fp32 for Llama, whose norm computes in fp32 whatever the input dtype).

Timing: one step is ``zero_grad`` + forward + loss + backward + optimizer step (AdamW for the
transformers and ConvNeXt, SGD with momentum for the ResNet), train mode. Each candidate (torch,
normkit) first runs ``warmup`` explicit steps — for ``compiled`` the first one is the
``torch.compile`` (of the model; Inductor compiles its forward and backward) and its time is
reported as ``warm-up s``. Then ``reps`` rounds; in each round both candidates run one step, the
order alternating between rounds; the table shows the medians. Both candidates start from the
same weights.

``runs`` names what the swapped norms ran in one eager train step, ``op:implementation×calls``
(:func:`implementations`): ``native`` is ATen's op (what torch's module runs), ``kernels`` normkit's
C++ CPU kernels — so a ratio can be read against the path it measures.

Memory — ``saved MiB``: the bytes autograd keeps for backward in one train-mode forward, measured
with :func:`torch.autograd.graph.saved_tensors_hooks` (every saved tensor's storage counted
once, parameters excluded). Works the same in eager and compiled mode (Inductor's compiled
autograd function saves through the same hook). Parameters, gradients and optimizer state are the
same for both candidates, so the difference in a step's peak memory between them is, up to the
transient buffers of a single op, the difference in saved activations. It is not the process's
peak RSS: CPU torch has no allocator statistics, and RSS deltas are dominated by the allocator's
caching rather than by the model.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

import normkit
from normkit.bench.models import Attention

MODELS = ("llama", "vit", "resnet", "convnext")
MODES = ("eager", "compiled")

HEADER = (
    f"{'model':<10}{'batch':<14}{'mode':<10}{'torch ms':>10}{'normkit ms':>12}{'ratio':>8}"
    f"{'saved MiB torch/normkit':>26}{'warm-up s torch/normkit':>26}  runs"
)


# ---------------------------------------------------------------------------- the swap


def _swap_norms(model: nn.Module, mapping: dict[type, Callable[[nn.Module], nn.Module]]) -> nn.Module:
    """Replace, in place, every submodule whose class is exactly a key of ``mapping``.

    ``mapping[cls](old)`` builds the replacement; it receives the old module's state dict
    (``strict``: the keys must match), its device/dtype and its train/eval mode. Exact class
    match, so a subclass (normkit's norms subclass torch's) is never swapped twice. Returns ``model``.
    """
    for name, old in list(model.named_modules()):
        factory = mapping.get(type(old))
        if factory is None or not name:
            continue
        new = factory(old)
        ref = next(iter(old.state_dict().values()), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        new.load_state_dict(old.state_dict(), strict=True)
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
    return model


# ---------------------------------------------------------------------------- the models


class TorchLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of NCHW input, as timm writes it (permute + ``F.layer_norm``, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-LN vision transformer: patch-embedding conv, learned positions, mean-pooled head."""

    def __init__(self, img: int = 32, patch: int = 4, dim: int = 192, depth: int = 4, heads: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = TF.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return TF.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, three stages of basic blocks, global pool, linear head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = TorchLayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, 4 * dim, 1)
        self.pw2 = nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.pw2(TF.gelu(self.pw1(self.norm(self.dwconv(x)))))


class ConvNeXt(nn.Module):
    """ConvNeXt-style net (timm's ``conv_mlp`` blocks): patchify stem, LayerNorm2d, LN + linear head."""

    def __init__(self, dims: tuple[int, ...] = (48, 96, 192), depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), TorchLayerNorm2d(dims[0]))
        stages = []
        for i, d in enumerate(dims):
            down = [] if i == 0 else [TorchLayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
            stages.append(nn.Sequential(*down, *[_ConvNeXtBlock(d) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))


class _LlamaLogits(nn.Module):
    """``LlamaForCausalLM`` returning the logits tensor (so every model maps a tensor to a tensor)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits


def _layer_norm(m: nn.Module) -> nn.Module:
    return normkit.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine, bias=m.bias is not None)


def _layer_norm2d(m: nn.Module) -> nn.Module:
    return normkit.LayerNorm2d(m.normalized_shape[0], eps=m.eps, affine=m.elementwise_affine, bias=m.bias is not None)


def _batch_norm2d(m: nn.Module) -> nn.Module:
    return normkit.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)


def _rms_norm_llama(m: nn.Module) -> nn.Module:
    return normkit.RMSNorm(m.weight.shape[0], eps=m.variance_epsilon)


@dataclass
class Spec:
    """One benchmark model: its torch version, the swap mapping, an input batch, the optimizer."""

    name: str
    model: nn.Module
    mapping: dict[type, Callable[[nn.Module], nn.Module]]
    x: Tensor
    target: Tensor
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    grad_dtype: torch.dtype = torch.float64  # see check()


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-4)


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)


# batch per model: (full run, --quick); the models themselves are the same
BATCH = {"llama": (8, 2), "vit": (32, 8), "resnet": (32, 8), "convnext": (16, 4)}


def build(name: str, seed: int = 0, quick: bool = False) -> Spec:
    """Model ``name`` with torch's norms (random init from ``seed``) and its batch (smaller if ``quick``).

    Raises ImportError for ``llama`` when ``transformers`` is not importable.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    g = torch.Generator().manual_seed(seed + 1)
    b = BATCH[name][quick]
    torch.manual_seed(seed)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        cfg = LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000, max_position_embeddings=256, use_cache=False,
        )
        model, mapping = _LlamaLogits(LlamaForCausalLM(cfg)), {LlamaRMSNorm: _rms_norm_llama}
        ids = torch.randint(0, cfg.vocab_size, (b, 129), generator=g)
        x, target, opt, grad_dtype = ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), _adamw, torch.float32
    else:
        if name == "vit":
            model, x, mapping, opt = ViT(), torch.randn(b, 3, 32, 32, generator=g), {nn.LayerNorm: _layer_norm}, _adamw
        elif name == "resnet":
            model, x, mapping, opt = ResNet(), torch.randn(b, 3, 32, 32, generator=g), {nn.BatchNorm2d: _batch_norm2d}, _sgd
        else:
            model, x = ConvNeXt(), torch.randn(b, 3, 64, 64, generator=g)
            mapping, opt = {TorchLayerNorm2d: _layer_norm2d, nn.LayerNorm: _layer_norm}, _adamw
        target, grad_dtype = torch.randint(0, 10, (b,), generator=g), torch.float64
    with torch.no_grad():  # random affine parameters (not ones and zeros), so the check sees them copied
        for m in model.modules():
            if type(m) in mapping:
                for pname, p in m.named_parameters(recurse=False):
                    if pname == "weight":
                        p.uniform_(0.5, 1.5, generator=g)
                    else:
                        p.normal_(0, 0.1, generator=g)
    return Spec(name, model, mapping, x, target, opt, grad_dtype)


def swapped(spec: Spec) -> nn.Module:
    """A copy of ``spec.model`` with normkit's norms."""
    return _swap_norms(copy.deepcopy(spec.model), spec.mapping)


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return TF.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _one_step(model: nn.Module, spec: Spec, dtype: torch.dtype, n: int | None = None) -> Tensor:
    """One train-mode forward + backward of ``model`` in ``dtype`` on the first ``n`` samples; the output."""
    model.to(dtype).train()
    x, target = spec.x[:n], spec.target[:n]
    out = model(x.to(dtype) if x.is_floating_point() else x)
    _loss(out, target).backward()
    return out.detach()


def check(spec: Spec, model: nn.Module | None = None) -> float:
    """Assert the swapped model (default: :func:`swapped`) equals the original; return max |Δ output| in fp32.

    1. fp32, train mode: outputs equal to fp32 tolerances (``assert_close`` defaults).
    2. One forward + backward in ``spec.grad_dtype`` on the first 4 samples: outputs, every
       parameter's gradient and every buffer (BatchNorm's running statistics) equal to that
       dtype's default tolerances. float64
       where the norm computes in its input's dtype: in fp32 the gradients of a batch-statistics
       ResNet at init differ from the exact (fp64) ones by ~1e-3 relative for torch itself (ReLU masks
       flip on rounding-level changes, and BN's backward amplifies them), so fp32 cannot tell a wrong
       swap from rounding there; in fp64 a wrong weight, eps or formula fails by orders of magnitude.
       fp32 for Llama, whose RMSNorm upcasts to fp32 whatever the input dtype.
    """
    new = copy.deepcopy(model) if model is not None else swapped(spec)
    assert not any(type(m) in spec.mapping for m in new.modules()), "the swap left torch norms behind"
    outs = [_one_step(copy.deepcopy(m), spec, torch.float32) for m in (spec.model, new)]
    torch.testing.assert_close(outs[1], outs[0])
    ref, new = copy.deepcopy(spec.model), copy.deepcopy(new)
    n = 4  # the first 4 samples: fp64 convolutions are slow on CPU
    torch.testing.assert_close(_one_step(new, spec, spec.grad_dtype, n), _one_step(ref, spec, spec.grad_dtype, n))
    params, buffers = dict(new.named_parameters()), dict(new.named_buffers())
    assert params.keys() == dict(ref.named_parameters()).keys() and buffers.keys() == dict(ref.named_buffers()).keys()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, msg=lambda s, name=name: f"grad of {name}: {s}")
    for name, b in ref.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=lambda s, name=name: f"buffer {name}: {s}")
    return float((outs[1] - outs[0]).abs().max())


# ---------------------------------------------------------------------------- timing


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for backward in one forward of ``model`` (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


class _Candidate:
    def __init__(self, module: nn.Module, spec: Spec, compiled: bool) -> None:
        self.module = module.train()
        self.run = torch.compile(module) if compiled else module
        self.opt = spec.optimizer(module)
        self.x, self.target = spec.x, spec.target
        self.times: list[float] = []
        self.warmup_s = 0.0

    def step(self) -> float:
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        _loss(self.run(self.x), self.target).backward()
        self.opt.step()
        return time.perf_counter() - t


@dataclass
class Row:
    model: str
    batch: str
    mode: str
    torch_ms: float
    normkit_ms: float
    ratio: float
    torch_saved_mib: float
    normkit_saved_mib: float
    torch_warmup_s: float
    normkit_warmup_s: float
    runs: str = ""  # what the swapped norms ran (:func:`implementations`)

    def line(self) -> str:
        return (
            f"{self.model:<10}{self.batch:<14}{self.mode:<10}{self.torch_ms:>10.2f}{self.normkit_ms:>12.2f}{self.ratio:>8.3f}"
            f"{f'{self.torch_saved_mib:.2f} / {self.normkit_saved_mib:.2f}':>26}"
            f"{f'{self.torch_warmup_s:.1f} / {self.normkit_warmup_s:.1f}':>26}  {self.runs}"
        ).rstrip()


def implementations(spec: Spec, model: nn.Module | None = None) -> str:
    """What normkit's default backend ran for the swapped norms in one fp32 train-mode forward of ``model``
    (default: :func:`swapped`), as ``op:impl×calls`` — e.g. ``rms_norm:kernels×5``, one count per norm call.

    Recorded with :class:`normkit.backend.record`, which sends each call through
    :func:`normkit.backend.resolve` instead of the modules' fast paths; those paths take exactly the
    implementation ``"auto"`` resolves to (``native``: ATen's op; ``kernels``: normkit's C++ kernels;
    ``eager``: normkit's autograd math), so the record names what the timed step ran. A norm call's
    entry is the first resolution inside it (the functional layer below resolves again, and the
    backward too). A compiled model traces the same choice (ATen's op into Inductor's graph, the
    kernels as an opaque custom op).
    """
    from collections import Counter

    from normkit.backend import record

    model = copy.deepcopy(model if model is not None else swapped(spec))
    orig = dict(spec.model.named_modules())
    ran: Counter[str] = Counter()
    with record() as calls:
        def pre(m: nn.Module, args: object) -> None:
            m._nk_record_start = len(calls)  # (a deep copy, dropped after this step)

        def post(m: nn.Module, args: object, out: object) -> None:
            first = calls[m._nk_record_start:m._nk_record_start + 1]
            ran[f"{first[0][0]}:{first[0][1]}" if first else f"{type(m).__name__}:eager"] += 1

        for name, m in model.named_modules():
            if type(orig.get(name)) in spec.mapping:  # a swapped norm (the swap keeps the names)
                m.register_forward_pre_hook(pre)
                m.register_forward_hook(post)
        _one_step(model, spec, torch.float32)
    return " ".join(f"{k}×{n}" for k, n in sorted(ran.items()))


def time_model(spec: Spec, mode: str, reps: int, warmup: int, runs: str = "") -> Row:
    """Interleaved train-step timing of the torch and the normkit version of ``spec`` in ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    compiled = mode == "compiled"
    if compiled:
        torch._dynamo.reset()
    cands = [_Candidate(copy.deepcopy(spec.model), spec, compiled), _Candidate(swapped(spec), spec, compiled)]
    for c in cands:
        t = time.perf_counter()
        for _ in range(max(warmup, 1)):
            c.step()
        c.warmup_s = time.perf_counter() - t
    for r in range(reps):
        for c in cands if r % 2 == 0 else cands[::-1]:
            c.times.append(c.step())
    ms = [statistics.median(c.times) * 1e3 for c in cands]
    mib = [saved_bytes(c.run, spec.x) / 2**20 for c in cands]
    batch = "x".join(map(str, spec.x.shape))
    return Row(spec.name, batch, mode, ms[0], ms[1], paired_ratio(cands[0].times, cands[1].times), mib[0], mib[1],
               cands[0].warmup_s, cands[1].warmup_s, runs)


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median over rounds of ``other[r] / base[r]``: the two steps of a round run back to back, so a
    machine-speed drift between rounds (other jobs, frequency) cancels in each round's ratio, where a
    ratio of the two medians would keep it (measured: the same ATen BatchNorm in both models read
    0.99–1.11 as a ratio of medians on the shared machine)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired_ratio needs equally many rounds, got {len(base)} and {len(other)}")
    return statistics.median(o / b for b, o in zip(base, other))


def run(
    models: tuple[str, ...] | list[str] = MODELS,
    modes: tuple[str, ...] | list[str] = MODES,
    reps: int = 15,
    warmup: int = 3,
    quick: bool = False,
    echo: Callable[[str], None] | None = print,
) -> list[Row]:
    """Check, then time every model in every mode; print (via ``echo``) the checks and the table; return the rows.

    ``quick`` uses the smaller batches of :data:`BATCH` (a smoke test: its times say little).
    """
    say = echo or (lambda s: None)
    rows: list[Row] = []
    specs = []
    for name in models:
        try:
            spec = build(name, quick=quick)
        except ImportError as e:
            say(f"skip {name}: transformers is not importable ({e}); pip install 'transformers>=4.40'")
            continue
        diff = check(spec)
        n = sum(type(m) in spec.mapping for m in spec.model.modules())
        dt = str(spec.grad_dtype).removeprefix("torch.")
        kinds = ", ".join(sorted({type(m).__name__ for m in spec.model.modules() if type(m) in spec.mapping}))
        say(
            f"check {name}: {n} norms swapped ({kinds}); outputs equal to fp32 tolerance (max |Δout| {diff:.1e}), "
            f"grads and buffers to {dt} tolerance"
        )
        specs.append((spec, implementations(spec)))
    say(HEADER)
    for mode in modes:
        for spec, runs in specs:
            row = time_model(spec, mode, reps, warmup, runs)
            rows.append(row)
            say(row.line())
    return rows


def run_cli(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """``normkit models``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps if args.reps else (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    modes = args.modes.split(",") if args.modes else (["eager"] if args.quick else list(MODES))
    models = args.models.split(",") if args.models else list(MODELS)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, train step (fwd + bwd + optimizer); "
        f"normkit default backend: {normkit.get_backend()!r}; median of {reps} interleaved rounds after {warmup} warm-up steps"
    )
    t = time.perf_counter()
    run(models, modes, reps=reps, warmup=warmup, quick=args.quick)
    print(
        "ratio = median over rounds of normkit / torch step time (each round runs both back to back); "
        "saved MiB = activations kept for backward; runs = what the swapped norms "
        f"ran, op:implementation×calls per step (native: ATen's op; kernels: normkit's C++ kernels); "
        f"total {time.perf_counter() - t:.0f} s"
    )
    return 0


def configure_parser(p) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    p.add_argument("--quick", action="store_true", help="smaller batches, eager only, 3 rounds, 1 warm-up step (smoke test)")
    p.add_argument("--reps", type=int, default=0, help="timed rounds (default 15, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per candidate (default 3, --quick 1)")
    p.add_argument("--modes", default="", help="comma-separated: eager, compiled (default both; --quick: eager)")
    p.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
