"""Bench suite ``convert``: the claims behind :mod:`normkit.convert`, each with our numbers.

Four jobs, one per claim, each run once per paired seed (the seed fixes the random weights, the
inputs and, for the LN-free job, the fine-tuning data order):

* ``crms`` — Jiang et al. 2023 (arXiv:2305.14858): Pre-CRMSNorm ≡ Pre-LN and is faster. A tiny HF
  GPT-2 (random weights) converted by :func:`normkit.convert.crms.to_pre_crmsnorm`: the largest
  float64 logits difference, and inference / train-step time of Pre-LN vs Pre-CRMSNorm
  (:func:`normkit.convert.crms.measure_speedup`, medians).
* ``fold`` — folding eval-mode BN into the adjacent conv is exact (fp32 rounding) and faster at
  inference: a ResNet-18-shaped :class:`normkit.models.resnet.ResNet` (widths 8–64, 32×32 inputs)
  with random running statistics, :func:`normkit.convert.fold_norms`
  (:func:`normkit.convert.measure.measure_fold`; times are best-of-n, the two variants alternated).
* ``tune`` — You et al. 2024 (arXiv:2305.11624): tune-mode ConvBN gives the gradients of conv →
  BN(eval) with less memory: the same ResNet, one fine-tuning step with BN in eval mode, plain and
  after :func:`normkit.convert.tune_mode_convbn` (:func:`normkit.convert.measure.measure_tune_mode`:
  saved-tensor bytes, the largest gradient difference, step time).
* ``lnfree`` — Baroni et al. 2025 (arXiv:2507.02559): after the removal fine-tune an LN-free GPT-2
  stays within a small loss increase of the same fine-tune with LayerNorm. A tiny GPT-2 (2 layers,
  d=64, byte vocabulary) is pretrained once on :mod:`normkit.data.text` (seed 0, shared by all seeds:
  the claim is about the fine-tune), then per seed fine-tuned twice from it on the same batches —
  with LayerNorm (baseline) and with :func:`normkit.convert.ln_removal.remove_layernorm` on the
  official schedule — with the official optimizer settings; the LN-free model is exported with
  :func:`~normkit.convert.ln_removal.export_layernorm_free` and evaluated too.

Margins (pre-stated): exactness 1e-9 relative (float64 logits) and 1e-4 absolute (fp32 fold,
outputs of order 1–10); gradients 1e-4 relative to the largest gradient entry (fp32; the first
version compared absolute differences, which grow with the gradients' scale); LN removal:
non-inferior within 0.1 nats (the paper's own increases are +0.025…+0.067 nats on OpenWebText).
Timing claims need the interval of the per-seed speedup above 0; on a loaded machine they may come
out inconclusive. Runs in about 2–6 minutes on 2 cores (341 s on a heavily loaded one, 1 thread).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.bench.suites import Job, SuiteConfig, register_suite
from normkit.bench.train import seed_everything
from normkit.bench.verdict import format_claim, paired_verdict
from normkit.data import DataSplit

#: Tiny GPT-2 for the LN-removal claim (byte vocabulary, no dropout) and its training settings.
LNFREE: dict[str, Any] = {
    "n_embd": 64, "n_layer": 2, "n_head": 4, "seq_len": 64, "batch_size": 16,
    "pretrain_steps": 300, "pretrain_lr": 3e-3, "finetune_steps": 100, "lr": 6e-4, "min_lr": 3e-4,
    "warmup_steps": 20, "val_batches": 16, "margin": 0.1,
}  # fmt: skip
#: Tiny GPT-2 for the Pre-CRMSNorm claim (random weights) and its input.
CRMS: dict[str, Any] = {"n_embd": 128, "n_layer": 2, "n_head": 4, "vocab": 512, "batch": 4, "seq": 64, "reps": 10}
#: ResNet-18 layout for the folding claim.
FOLD: dict[str, Any] = {"widths": (8, 16, 32, 64), "batch": 16, "size": 32, "reps": 20}
TOL_F64 = 1e-9
TOL_FOLD = 1e-4
TOL_GRAD = 1e-4


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _row(steps: int = 0, **fields: Any) -> dict[str, Any]:
    """A result row. The leaderboard averages ``test_acc``, ``train_loss`` and ``ms_per_step`` (finite numbers):
    ``test_acc`` is 1/0 for "exact within the claim's tolerance" in the conversion jobs (its mean over
    seeds is the share of exact seeds) and the next-byte validation accuracy of the LN-free model in
    the ``lnfree`` job; ``train_loss`` is 0 where nothing is trained."""
    return {"status": "ok", "error": "", "steps": steps, "train_loss": 0.0, **fields}


def _gpt2(n_embd: int, n_layer: int, n_head: int, vocab: int, positions: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


# --------------------------------------------------------------------------- crms


def _crms_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.convert.crms import measure_speedup, to_pre_crmsnorm

    c = CRMS
    seed_everything(seed)
    model = _gpt2(c["n_embd"], c["n_layer"], c["n_head"], c["vocab"], c["seq"]).eval()
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq"]))
    m64 = copy.deepcopy(model).double()
    conv = to_pre_crmsnorm(m64, inplace=False).model.eval()
    with torch.no_grad():
        ref = m64(ids).logits
        diff = float((conv(ids).logits - ref).abs().max() / ref.abs().max())
    rows = measure_speedup(model, ids, reps=max(3, round(c["reps"] * min(1.0, scale))))
    if on_step:
        on_step(1)
    ln, cr = rows["pre_ln"], rows["pre_crms"]
    return _row(
        1, test_acc=float(diff < TOL_F64), max_rel_diff_f64=diff, ln_infer_ms=ln["infer_ms"], crms_infer_ms=cr["infer_ms"],
        ln_train_ms=ln["train_ms"], crms_train_ms=cr["train_ms"], ms_per_step=cr["train_ms"],
    )  # fmt: skip


# --------------------------------------------------------------------------- fold and tune mode


def _fold_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.convert.measure import measure_fold

    r = measure_fold(
        FOLD["batch"], FOLD["size"], FOLD["widths"], repeats=max(3, round(FOLD["reps"] * min(1.0, scale))), seed=seed
    )
    if on_step:
        on_step(1)
    return _row(1, **r, test_acc=float(r["max_abs_diff"] < TOL_FOLD), ms_per_step=r["folded_ms"])


def _tune_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.convert.measure import _resnet, measure_tune_mode

    r = measure_tune_mode(
        FOLD["batch"], FOLD["size"], FOLD["widths"], repeats=max(3, round(FOLD["reps"] * min(1.0, scale))), seed=seed
    )
    # the gradients' scale, for a relative difference: the same model and input measure_tune_mode used
    net = _resnet(FOLD["widths"], seed)
    x = torch.randn(FOLD["batch"], 3, FOLD["size"], FOLD["size"])
    net(x).square().mean().backward()
    r["max_grad"] = max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)
    r["max_rel_grad_diff"] = r["max_grad_diff"] / r["max_grad"]
    if on_step:
        on_step(1)
    return _row(1, **r, test_acc=float(r["max_rel_grad_diff"] < TOL_GRAD), ms_per_step=r["tune_ms"])


# --------------------------------------------------------------------------- LN removal

_PRETRAINED: dict[tuple[Any, ...], dict[str, Tensor]] = {}


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    logits = model(batch[0]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())


def _lnfree_settings(scale: float) -> dict[str, Any]:
    s = dict(LNFREE)
    if scale < 1:  # smoke runs: shorter pretraining, schedule and fine-tune, same structure
        s["pretrain_steps"] = max(10, round(s["pretrain_steps"] * scale))
        s["finetune_steps"] = max(10, round(s["finetune_steps"] * scale))
        s["warmup_steps"] = max(1, round(s["warmup_steps"] * scale))
        s["val_batches"] = max(2, round(s["val_batches"] * scale))
    return s


def _schedule(s: dict[str, Any]) -> list[Any]:
    from normkit.convert.ln_removal import removal_schedule

    sched = removal_schedule(s["n_layer"])  # official: start 20, gaps 2/2/3 (ends at 34 for 2 layers)
    if sched[-1].step >= s["finetune_steps"]:  # smoke runs: the same order, one event per step
        sched = removal_schedule(s["n_layer"], start=1, gap_ln2=1, gap_ln1qk=1, gap_ln1v=1)
    return sched


def _pretrained(s: dict[str, Any]) -> nn.Module:
    from normkit.convert.ln_removal import finetune_lm
    from normkit.data.text import lm_batches, load_text

    key = tuple(sorted((k, v) for k, v in s.items()))
    if key not in _PRETRAINED:
        seed_everything(0)
        model = _gpt2(s["n_embd"], s["n_layer"], s["n_head"], 256, s["seq_len"])
        finetune_lm(
            model, lm_batches(load_text(), s["batch_size"], s["seq_len"], seed=10_000), steps=s["pretrain_steps"],
            lr=s["pretrain_lr"], min_lr=s["pretrain_lr"] / 10, warmup_steps=s["warmup_steps"], loss_fn=_loss,
        )  # fmt: skip
        _PRETRAINED[key] = copy.deepcopy(model.state_dict())
    model = _gpt2(s["n_embd"], s["n_layer"], s["n_head"], 256, s["seq_len"])
    model.load_state_dict(_PRETRAINED[key])
    return model


@torch.no_grad()
def _next_byte_accuracy(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    hits = sum(int((model(x).logits.argmax(-1) == y).sum()) for x, y in batches)
    return hits / sum(y.numel() for _, y in batches)


def _lnfree_run(job: Job, seed: int, *, scale: float = 1.0, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    from normkit.convert.ln_removal import export_layernorm_free, finetune_lm, lm_loss, remove_layernorm
    from normkit.data.text import lm_batches, load_text

    s = _lnfree_settings(scale)
    corpus = load_text()
    t0 = time.perf_counter()
    base = _pretrained(s)
    val = list(lm_batches(corpus, s["batch_size"], s["seq_len"], split="val", shuffle=False, num_batches=s["val_batches"]))
    pretrained = lm_loss(base, val, _loss)
    train = dict(lr=s["lr"], min_lr=s["min_lr"], warmup_steps=s["warmup_steps"], loss_fn=_loss)
    lnfree_start = copy.deepcopy(base)
    seed_everything(seed)
    finetune_lm(base, lm_batches(corpus, s["batch_size"], s["seq_len"], seed=seed), steps=s["finetune_steps"], **train)
    baseline = lm_loss(base, val, _loss)
    seed_everything(seed)
    res = remove_layernorm(
        lnfree_start, lm_batches(corpus, s["batch_size"], s["seq_len"], seed=seed), steps=s["finetune_steps"],
        schedule=_schedule(s), inplace=True, **train,
    )  # fmt: skip
    lnfree = lm_loss(res.model, val, _loss)
    exported = export_layernorm_free(res.model)
    vanilla = lm_loss(exported, val, _loss)
    with torch.no_grad():
        a, b = res.model.eval()(val[0][0]).logits, exported.eval()(val[0][0]).logits
        export_diff = float((a - b).abs().max() / a.abs().max())
    if on_step:
        on_step(1)
    return _row(
        2 * s["finetune_steps"], val_loss_pretrained=pretrained, val_loss_baseline=baseline, val_loss_lnfree=lnfree,
        val_loss_exported=vanilla, export_rel_diff=export_diff, test_acc=_next_byte_accuracy(res.model, val),
        train_loss=res.losses[-1],
        train_time_s=time.perf_counter() - t0, ms_per_step=1e3 * (time.perf_counter() - t0) / (2 * s["finetune_steps"]),
        corpus_sha256=corpus.sha256[:12], python=corpus.python_version,
    )  # fmt: skip


# --------------------------------------------------------------------------- claims


def _rows(results: list[dict[str, Any]], task: str) -> list[Mapping[str, Any]]:
    return [r for r in results if r.get("task") == task and r.get("status") == "ok"]


def _missing(results: list[dict[str, Any]], task: str, source: str, claim: str) -> str | None:
    if _rows(results, task):
        return None
    errors = [r.get("error", "") for r in results if r.get("task") == task]
    why = errors[0] if errors else "job not run"
    return f"[inconclusive] {source}: {claim} | ours: not measured ({why})"


def _exact_line(source: str, claim: str, diffs: list[float], tol: float, *, paper: str, ours: str) -> str:
    """Exactness: every seed's difference below ``tol`` (one seed's miss contradicts it)."""
    label = "supported" if len(diffs) >= 2 and max(diffs) < tol else "contradicted" if max(diffs) >= tol else "inconclusive"
    n = len(diffs)
    return (
        f"[{label}] {source}: {claim} | paper: {paper} | ours: {ours} | max {max(diffs):.1e} < {tol:g}, {n} seed{'s' * (n != 1)}"
    )


def _speedups(rows: list[Mapping[str, Any]], slow: str, fast: str) -> list[float]:
    return [r[slow] / r[fast] - 1.0 for r in rows]


def _mean(rows: list[Mapping[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _convert_claims(results: list[dict[str, Any]]) -> list[str]:
    """One or two lines per claim (exactness, then speed or memory), paired over the seeds."""
    lines: list[str] = []
    src = "Jiang et al. 2023 (Pre-CRMSNorm, arXiv:2305.14858)"
    claim = "Pre-CRMSNorm ≡ Pre-LN and is faster"
    miss = _missing(results, "crms", src, claim)
    if miss:
        lines.append(miss)
    else:
        rows = _rows(results, "crms")
        setting = f"HF GPT-2 d={CRMS['n_embd']} L={CRMS['n_layer']}, batch {CRMS['batch']}×{CRMS['seq']} tokens, CPU"
        lines.append(_exact_line(src, "Pre-CRMSNorm ≡ Pre-LN (float64 logits, relative)", [r["max_rel_diff_f64"] for r in rows],
                                 TOL_F64, paper="equivalent in exact arithmetic", ours=setting))  # fmt: skip
        parts = {
            "inference": paired_verdict(_speedups(rows, "ln_infer_ms", "crms_infer_ms"), "greater"),
            "train step": paired_verdict(_speedups(rows, "ln_train_ms", "crms_train_ms"), "greater"),
        }
        lines.append(format_claim(
            src, "Pre-CRMSNorm is faster than Pre-LN (speedup − 1)", parts,
            paper="1–10% faster training and inference (GPU, ViT/GPT)",
            ours=f"{setting}: inference {_mean(rows, 'ln_infer_ms'):.1f} → {_mean(rows, 'crms_infer_ms'):.1f} ms, "
            f"train step {_mean(rows, 'ln_train_ms'):.1f} → {_mean(rows, 'crms_train_ms'):.1f} ms",
            unit="%",
        ))  # fmt: skip

    src = "BN folding (Deploy mode; You et al. 2024, arXiv:2305.11624)"
    miss = _missing(results, "fold", src, "folding is exact and faster at inference")
    if miss:
        lines.append(miss)
    else:
        rows = _rows(results, "fold")
        setting = (
            f"ResNet-18 layout widths 8–64, batch {FOLD['batch']}×3×{FOLD['size']}², CPU, {int(rows[0]['folded'])} BNs folded"
        )
        lines.append(_exact_line(src, "folded model ≡ conv→BN(eval) (fp32 logits, max |Δ|)", [r["max_abs_diff"] for r in rows],
                                 TOL_FOLD, paper="exact (a re-parameterisation)", ours=setting))  # fmt: skip
        lines.append(format_claim(
            src, "folding is faster at inference (speedup − 1)",
            paired_verdict(_speedups(rows, "eval_ms", "folded_ms"), "greater"),
            paper="one conv instead of conv + BN per block",
            ours=f"{setting}: {_mean(rows, 'eval_ms'):.2f} → {_mean(rows, 'folded_ms'):.2f} ms", unit="%",
        ))  # fmt: skip

    src = "You et al. 2024 (tune-mode ConvBN, arXiv:2305.11624)"
    miss = _missing(results, "tune", src, "tune mode saves memory with equal gradients")
    if miss:
        lines.append(miss)
    else:
        rows = _rows(results, "tune")
        setting = (
            f"ResNet-18 layout widths 8–64, batch {FOLD['batch']}×3×{FOLD['size']}², fine-tuning step with BN in eval mode, CPU"
        )
        lines.append(_exact_line(src, "tune mode gives conv→BN(eval)'s gradients (fp32, max |Δgrad| / max |grad|)",
                                 [r["max_rel_grad_diff"] for r in rows], TOL_GRAD, paper="identical forward and backward",
                                 ours=setting))  # fmt: skip
        saving = [1.0 - r["tune_saved_mb"] / r["eval_saved_mb"] for r in rows]
        lines.append(format_claim(
            src, "tune mode saves memory (saved-tensor bytes, saving fraction)", paired_verdict(saving, "greater"),
            paper="up to ~half the memory of Eval mode, faster (object detection/classification fine-tuning, GPU)",
            ours=f"{setting}: saved tensors {_mean(rows, 'eval_saved_mb'):.1f} → {_mean(rows, 'tune_saved_mb'):.1f} MB, "
            f"step {_mean(rows, 'eval_ms'):.1f} → {_mean(rows, 'tune_ms'):.1f} ms", unit="%",
        ))  # fmt: skip

    src = "Baroni et al. 2025 (LN removal, arXiv:2507.02559)"
    claim = f"LN-free GPT-2 after the removal fine-tune is within {LNFREE['margin']} nats of the fine-tuned baseline"
    miss = _missing(results, "lnfree", src, claim)
    if miss:
        lines.append(miss)
    else:
        rows = _rows(results, "lnfree")
        d = [r["val_loss_baseline"] - r["val_loss_lnfree"] for r in rows]  # > 0: LN-free better
        export = max(r["export_rel_diff"] for r in rows)
        lines.append(format_claim(
            src, claim, paired_verdict(d, "noninferior", LNFREE["margin"]),
            paper="GPT-2 small, OpenWebText, 300 steps × 0.5M tokens: 3.0126 → 3.0797 (+0.067); XL +0.025",
            ours=f"GPT-2 L={LNFREE['n_layer']} d={LNFREE['n_embd']}, bytes of Python {rows[0]['python']}'s docstrings "
            f"(sha256 {rows[0]['corpus_sha256']}), {LNFREE['finetune_steps']} steps × "
            f"{LNFREE['batch_size']}×{LNFREE['seq_len']}: "
            f"val CE pretrained {_mean(rows, 'val_loss_pretrained'):.3f}, baseline {_mean(rows, 'val_loss_baseline'):.3f}, "
            f"LN-free {_mean(rows, 'val_loss_lnfree'):.3f}, exported {_mean(rows, 'val_loss_exported'):.3f} "
            f"(logits vs fake-LN model ≤ {export:.1e} relative)",
            scale=1.0, unit=" nats (baseline − LN-free)", digits=3,
        ))  # fmt: skip
    return lines


def _unused_build(norm: str) -> nn.Module:  # the jobs build their own models in run
    raise RuntimeError("the convert suite's jobs build their models in their run function")


def _one_batch(batch_size: int) -> Callable[[], DataSplit]:
    """A one-step split: these jobs load their own data in ``run``; the runner sizes its progress bar from ``job.data``."""

    def data() -> DataSplit:
        x, y = torch.zeros(batch_size, 1), torch.zeros(batch_size, dtype=torch.long)
        return DataSplit("none", x, y, x, y, 1)

    return data


def _job(task: str, model: str, norm: str, run: Callable[..., Mapping[str, Any]], batch: int, extra: Mapping[str, Any]) -> Job:
    return Job(task, model, norm, _unused_build, batch, 1.0, 0.0, data=_one_batch(batch), extra=dict(extra), run=run)


@register_suite(
    "convert",
    description="normkit.convert claims: Pre-CRMSNorm ≡ Pre-LN and faster, BN folding exact and faster, tune-mode "
    "ConvBN memory with equal gradients, LN-free GPT-2 after removal fine-tune (~2 min)",
    claims=_convert_claims,
    seeds=3,
    full_seeds=3,
    max_workers=1,  # its claims include wall-clock speedups: no concurrent runs on the same cores
)
def convert(cfg: SuiteConfig) -> list[Job]:
    """One job per claim; each builds, converts and measures its own model (see the module docstring)."""
    return [
        _job("crms", "gpt2-tiny", "pre_ln→pre_crmsnorm", _crms_run, CRMS["batch"], {"setting": str(CRMS)}),
        _job("fold", "resnet18-w8", "bn→folded", _fold_run, FOLD["batch"], {"setting": str(FOLD)}),
        _job("tune", "resnet18-w8", "bn(eval)→tune_mode", _tune_run, FOLD["batch"], {"setting": str(FOLD)}),
        _job("lnfree", "gpt2-tiny", "layernorm→removed", _lnfree_run, LNFREE["batch_size"], {"setting": str(LNFREE)}),
    ]


__all__ = ["CRMS", "FOLD", "LNFREE", "convert"]
