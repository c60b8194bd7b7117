"""Location-aware Adaptive Normalization (LOAN): SPADE-style modulation from a static, location-wise condition map."""

from __future__ import annotations

import torch.nn.functional as TF
from torch import Tensor

from normkit.functional._core import check_channels_first, check_eps, check_float, check_param
from normkit.functional.batch_norm import batch_norm, instance_norm
from normkit.stats import Reducer

FREE_NORMS = ("batch", "instance", "none")


def _check_conv(w: Tensor, b: Tensor | None, c_out: int, c_in: int, name: str) -> None:
    check_float(w, f"{name}_weight")
    if w.dim() != 4 or w.shape[0] != c_out or w.shape[1] != c_in or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"loan: {name}_weight must be a ({c_out}, {c_in}, k, k) conv weight with odd k, got {tuple(w.shape)}")
    check_param(b, c_out, f"{name}_bias", "loan")


def loan(
    x: Tensor,
    cond: Tensor,
    gamma_weight: Tensor,
    gamma_bias: Tensor | None,
    beta_weight: Tensor,
    beta_bias: Tensor | None,
    *,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    cond_running_mean: Tensor | None = None,
    cond_running_var: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    free_norm: str = "batch",
    reducer: Reducer | None = None,
    backend: str | None = None,
) -> Tensor:
    """LOAN: ``y = norm(x) · (1 + γ(c)) + β(c)`` with γ, β predicted per location from a condition map.

    Shams Eddin, Roscher & Gall, "Location-aware Adaptive Normalization: A Deep Learning Approach for
    Wildfire Danger Forecasting", IEEE TGRS 2023, arXiv:2212.08208. Official code
    ``HakamShams/LOAN/models/CNN.py::LOAN`` (commit a487d85):

        x̂    = BN_{affine=False}(x)                   ``free_norm='batch'`` (BatchNorm3d over (N, D, H, W))
        a    = ReLU(BN_{affine=False}(c))             the condition is batch-normalized too (own running stats)
        γ, β = conv_k(a), conv_k(a)                   two separate k×k convs, zero padding k // 2
        y    = x̂ · (1 + γ) + β                        γ, β broadcast along the time axis D of 5-D input

    Shapes: ``x`` ``(N, C, H, W)`` with ``cond`` ``(N, Cc, H, W)``; ``x`` ``(N, C, D, H, W)`` (the official
    layout, D = time) with the static ``cond`` ``(N, Cc, H, W)``; or ``x`` ``(N, C, L)`` with
    ``cond`` ``(N, Cc, L)`` (treated as width 1). ``cond`` must have x's trailing spatial size (the
    official code does not resize it; the SPADE-style interpolation is commented out there).

    ``free_norm``: ``"batch"`` (official), ``"none"`` (the official ``norm=False``, used for its second
    LOAN layer: modulate the raw features), or ``"instance"`` (per-sample statistics, SPADE's option;
    not in the LOAN code). BN layers use batch statistics when ``training`` or when no running buffers
    are given, else the running statistics; in training the given buffers are updated in place
    (torch's convention: ``momentum`` weights the new batch, running_var gets the unbiased variance).
    """
    eps = check_eps(eps)
    if free_norm not in FREE_NORMS:
        raise ValueError(f"loan: free_norm must be one of {FREE_NORMS}, got {free_norm!r}")
    c = check_channels_first(x, None, "loan")
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"loan expects x of shape (N, C, H, W), (N, C, D, H, W) or (N, C, L), got {tuple(x.shape)}")
    check_float(cond, "cond")
    spatial = tuple(x.shape[-1:]) if x.dim() == 3 else tuple(x.shape[-2:])
    if cond.dim() != 2 + len(spatial) or cond.shape[0] != x.shape[0] or tuple(cond.shape[2:]) != spatial:
        want = ", ".join(str(s) for s in spatial)
        raise ValueError(
            f"loan expects cond of shape (N={x.shape[0]}, Cc, {want}) for x of shape {tuple(x.shape)}, got {tuple(cond.shape)}"
        )
    cc = cond.shape[1]
    _check_conv(gamma_weight, gamma_bias, c, cc, "gamma")
    _check_conv(beta_weight, beta_bias, c, cc, "beta")

    if free_norm == "batch":
        use_batch = training or running_mean is None or running_var is None
        xn = batch_norm(x, running_mean, running_var, None, None, use_batch, momentum, eps, reducer=reducer, backend=backend)
    elif free_norm == "instance":
        xn = instance_norm(x, eps=eps, backend=backend)
    else:
        xn = x
    use_batch_c = training or cond_running_mean is None or cond_running_var is None
    a = TF.relu(batch_norm(
        cond, cond_running_mean, cond_running_var, None, None, use_batch_c, momentum, eps, reducer=reducer, backend=backend,
    ))
    a4 = (a.unsqueeze(-1) if a.dim() == 3 else a).to(gamma_weight.dtype)  # bf16 input, fp32 convs: as every norm
    gamma = TF.conv2d(a4, gamma_weight, gamma_bias, padding=gamma_weight.shape[-1] // 2)
    beta = TF.conv2d(a4, beta_weight, beta_bias, padding=beta_weight.shape[-1] // 2)
    if x.dim() == 3:
        gamma, beta = gamma.squeeze(-1), beta.squeeze(-1)
    elif x.dim() == 5:
        gamma, beta = gamma.unsqueeze(2), beta.unsqueeze(2)
    return xn * (1 + gamma.to(xn.dtype)) + beta.to(xn.dtype)
