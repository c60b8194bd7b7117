"""Tools that put normkit into models people already have.

:func:`replace_norms` swaps the normalization layers of any ``nn.Module`` (torch's classes and the
transformers RMSNorm families, recognised by behaviour) for normkit's, exactly where it can and
saying so where it cannot. :func:`fold_norms` folds eval-mode norms into the adjacent Conv/Linear
(inference), :func:`tune_mode_convbn` computes Conv → BN(eval) as one convolution (fine-tuning with
frozen statistics). :func:`to_pre_rmsnorm` / :func:`to_pre_crmsnorm` turn a Pre-LN transformer into
the equivalent Pre-RMSNorm / Pre-CRMSNorm one (exact); :func:`to_peri_ln`, :func:`to_mix_ln` and
:func:`to_layernorm_scaling` change where the norms sit (architecture changes).
:func:`remove_layernorm` fine-tunes a GPT-2 while replacing its LayerNorms by :class:`FakeLayerNorm`
(frozen std) and :func:`export_layernorm_free` turns the result into a stock LN-free model.
"""

from __future__ import annotations

from normkit.convert.crms import ExactReport, to_pre_crmsnorm, to_pre_rmsnorm
from normkit.convert.fold import FoldReport, eval_affine, fold_norms
from normkit.convert.ln_removal import FakeLayerNorm, export_layernorm_free, remove_layernorm
from normkit.convert.placement import PlacementReport, to_layernorm_scaling, to_mix_ln, to_peri_ln
from normkit.convert.replace_norms import NormReplacement, NormReport, recognise_norm, replace_norms
from normkit.convert.tune_mode import TuneModeReport, tune_mode_convbn

__all__ = [
    "ExactReport",
    "FakeLayerNorm",
    "FoldReport",
    "NormReplacement",
    "NormReport",
    "PlacementReport",
    "TuneModeReport",
    "eval_affine",
    "export_layernorm_free",
    "fold_norms",
    "recognise_norm",
    "remove_layernorm",
    "replace_norms",
    "to_layernorm_scaling",
    "to_mix_ln",
    "to_peri_ln",
    "to_pre_crmsnorm",
    "to_pre_rmsnorm",
    "tune_mode_convbn",
]
