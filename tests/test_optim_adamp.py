"""AdamP / SGDP against a plain restatement of the official clovaai/AdamP algorithm (v0.3.0).

The reference below is written from the paper's Algorithm and the official code's steps, with
plain tensor arithmetic (dot products and norms by hand), one parameter at a time.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from normkit.optim import SGDP, AdamP


def _cos_max(g: torch.Tensor, w: torch.Tensor, rows: int, eps: float) -> float:
    g2, w2 = g.reshape(rows, -1), w.reshape(rows, -1)
    dots = (g2 * w2).sum(1)
    return float((dots.abs() / torch.clamp(g2.norm(dim=1) * w2.norm(dim=1), min=eps)).max())


def reference_projection(w, g, u, delta, wd_ratio, eps):
    """Returns (projected update, decay factor, which view fired or None)."""
    if w.dim() <= 1:
        return u, 1.0, None
    for rows, name in ((w.shape[0], "channel"), (1, "layer")):
        d = w.numel() // rows
        if _cos_max(g, w, rows, eps) < delta / math.sqrt(d):
            w2 = w.reshape(rows, -1)
            wn = w2 / (w2.norm(dim=1, keepdim=True) + eps)
            u2 = u.reshape(rows, -1)
            u2 = u2 - wn * (wn * u2).sum(1, keepdim=True)
            return u2.reshape(w.shape), wd_ratio, name
    return u, 1.0, None


def reference_adamp(w, grads, lr, betas, eps, weight_decay, delta, wd_ratio, nesterov):
    wd = weight_decay
    w = w.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    fired = []
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = v.sqrt() / math.sqrt(1 - betas[1] ** t) + eps
        u = ((betas[0] * m + (1 - betas[0]) * g) if nesterov else m) / denom
        u, f, which = reference_projection(w, g, u, delta, wd_ratio, eps)
        fired.append(which)
        w = w * (1 - lr * wd * f)
        w = w - lr / (1 - betas[0] ** t) * u
    return w, fired


def reference_sgdp(
    w, grads, lr, momentum, dampening, weight_decay, nesterov, delta, wd_ratio, eps, project_buffer=True, wd_scaling=True
):
    wd = weight_decay
    w = w.clone()
    buf = torch.zeros_like(w)
    fired = []
    for g in grads:
        buf = momentum * buf + (1 - dampening) * g
        d = g + momentum * buf if nesterov else buf
        d, f, which = reference_projection(w, g, d, delta, wd_ratio, eps)
        fired.append(which)
        if not nesterov and project_buffer:
            buf = d
        w = w * (1 - lr * wd * f / ((1 - momentum) if wd_scaling else 1.0))
        w = w - lr * d
    return w, fired


def _grads(w: torch.Tensor, kind: str, steps: int, seed: int = 1):
    """Gradients that force a branch: 'channel' orthogonal to every row of w (so the channel test
    fires), 'layer' orthogonal to w as a whole but not per row, 'none' aligned with w."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.randn(w.shape, generator=gen, dtype=w.dtype)
        rows = w.reshape(w.shape[0], -1)
        g2 = g.reshape(w.shape[0], -1)
        if kind == "channel":
            g2 = g2 - rows * (g2 * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
        elif kind == "layer":
            flat_w, flat_g = rows.reshape(-1), g2.reshape(-1) + 3.0 * rows.reshape(-1) * torch.tensor(
                [1.0 if i % 2 == 0 else -1.0 for i in range(rows.shape[0])], dtype=w.dtype
            ).repeat_interleave(rows.shape[1])
            flat_g = flat_g - flat_w * (flat_g @ flat_w) / (flat_w @ flat_w)
            g2 = flat_g.reshape(rows.shape)
        else:
            g2 = g2 + 5.0 * rows
        out.append(g2.reshape(w.shape).clone())
    return out


def _run(opt_cls, w0, grads, **kw):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


# The weight is held fixed while the gradient sequence is built from w0, so each branch's
# gradients are built orthogonal to w0; with a small lr the weight barely moves and the branch
# stays the same on every step (the reference reports which view fired, and we check it).
@pytest.mark.parametrize("kind", ["channel", "layer", "none"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamp_matches_reference(kind, nesterov, wd):
    torch.manual_seed(0)
    w0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    grads = _grads(w0, kind, 5)
    kw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
    expected, fired = reference_adamp(w0, grads, **kw)
    assert fired == [{"channel": "channel", "layer": "layer", "none": None}[kind]] * len(grads)
    got = _run(AdamP, w0, grads, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["channel", "layer", "none"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgdp_matches_reference(kind, nesterov, wd):
    torch.manual_seed(0)
    w0 = torch.randn(5, 7, dtype=torch.float64)
    grads = _grads(w0, kind, 5)
    kw = dict(lr=1e-4, momentum=0.9, dampening=0.0, weight_decay=wd, nesterov=nesterov, delta=0.1, wd_ratio=0.1, eps=1e-8)
    expected, fired = reference_sgdp(w0, grads, **kw)
    assert fired == [{"channel": "channel", "layer": "layer", "none": None}[kind]] * len(grads)
    got = _run(SGDP, w0, grads, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_sgdp_projects_its_momentum_buffer_in_place_by_default():
    w0 = torch.randn(5, 7, dtype=torch.float64)
    # step 1 aligned with w (no projection), then orthogonal gradients (projection fires): the
    # official code projects the buffer, which removes step 1's radial momentum from later steps.
    grads = _grads(w0, "none", 1) + _grads(w0, "channel", 3, seed=2)
    kw = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, delta=0.1, wd_ratio=0.1, eps=1e-8)
    official, _ = reference_sgdp(w0, grads, **kw)
    raw, _ = reference_sgdp(w0, grads, project_buffer=False, **kw)
    assert not torch.allclose(official, raw)
    torch.testing.assert_close(_run(SGDP, w0, grads, **kw), official, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_run(SGDP, w0, grads, project_momentum=False, **kw), raw, rtol=1e-12, atol=1e-12)


def test_sgdp_dampening_and_decay_factor():
    w0 = torch.randn(3, 4, dtype=torch.float64)
    grads = _grads(w0, "none", 3)
    kw = dict(lr=1e-2, momentum=0.5, dampening=0.3, weight_decay=0.2, nesterov=False, delta=0.1, wd_ratio=0.1, eps=1e-8)
    expected, _ = reference_sgdp(w0, grads, **kw)
    torch.testing.assert_close(_run(SGDP, w0, grads, **kw), expected, rtol=1e-12, atol=1e-12)


def test_sgdp_decay_without_the_momentum_division():
    w0 = torch.randn(3, 4, dtype=torch.float64)
    grads = _grads(w0, "channel", 3)
    kw = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.5, nesterov=False, delta=0.1, wd_ratio=0.1, eps=1e-8)
    official, _ = reference_sgdp(w0, grads, **kw)
    plain, _ = reference_sgdp(w0, grads, wd_scaling=False, **kw)
    assert not torch.allclose(official, plain)
    torch.testing.assert_close(_run(SGDP, w0, grads, wd_momentum_scaling=False, **kw), plain, rtol=1e-12, atol=1e-12)


def test_vectors_are_never_projected_in_auto_mode():
    w0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    g = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # orthogonal, but a vector: no projection
    kw = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False)
    expected, fired = reference_adamp(w0, [g], **kw)
    assert fired == [None]
    torch.testing.assert_close(_run(AdamP, w0, [g], **kw), expected)


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_forced_projection_keeps_the_update_tangent(mode):
    """projection='channel'/'layer' projects whatever the gradient: with an aligned gradient the
    update is all radial, so a (tiny) step leaves each row's (or the layer's) norm unchanged to 1st order."""
    w0 = torch.randn(4, 6, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = SGDP([p], lr=1e-6, projection=mode)
    p.grad = w0.clone()  # purely radial
    opt.step()
    rows = 4 if mode == "channel" else 1
    before = w0.reshape(rows, -1).norm(dim=1)
    after = p.detach().reshape(rows, -1).norm(dim=1)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    q = torch.nn.Parameter(w0.clone())
    opt_off = SGDP([q], lr=1e-6, projection="off")
    q.grad = w0.clone()
    opt_off.step()
    assert (q.detach().norm() - w0.norm()).abs() > 1e-7


@pytest.mark.parametrize("opt_cls", [AdamP, SGDP])
def test_foreach_path_matches_loop(opt_cls):
    torch.manual_seed(0)
    ws = [torch.randn(4, 3), torch.randn(6), torch.randn(2, 2, 3)]
    kw = dict(lr=1e-2, weight_decay=0.1) if opt_cls is AdamP else dict(lr=1e-2, momentum=0.9, weight_decay=0.1)
    out = []
    for foreach in (False, True):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = opt_cls(ps, foreach=foreach, **kw)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opt_cls", [AdamP, SGDP])
def test_state_dict_round_trip_continues_the_same_trajectory(opt_cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    kw = dict(lr=1e-2, weight_decay=0.1) if opt_cls is AdamP else dict(lr=1e-2, momentum=0.9, weight_decay=0.1, nesterov=True)
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    opt = opt_cls(model.parameters(), **kw)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3)
    model2 = copy.deepcopy(model)
    model2.load_state_dict(saved_model)
    opt2 = opt_cls(model2.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=1e-3, betas=(1.0, 0.999)), "beta"),
        (dict(lr=1e-3, betas=(0.9, -0.1)), "beta"),
        (dict(lr=1e-3, eps=-1e-8), "eps"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
        (dict(lr=1e-3, projection="sometimes"), "projection"),
    ],
)
def test_adamp_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamP([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, nesterov=True), "Nesterov"),
        (dict(lr=0.1, delta=-0.1), "delta"),
    ],
)
def test_sgdp_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGDP([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    with pytest.raises(TypeError, match="lr must be a float"):
        SGDP([torch.nn.Parameter(torch.zeros(2, 2))], lr="0.1")


def _official_projection(p, grad, perturb, delta, wd_ratio, eps):
    """The official ``_projection`` sequence, with its own calls (F.cosine_similarity, p_n)."""
    for rows in (p.shape[0], 1):
        cos = torch.nn.functional.cosine_similarity(grad.reshape(rows, -1), p.reshape(rows, -1), dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(p.reshape(rows, -1).shape[1]):
            expand = [-1] + [1] * (p.dim() - 1)
            p_n = p / p.reshape(rows, -1).norm(dim=1).view(expand).add(eps)
            return perturb - p_n * (p_n * perturb).reshape(rows, -1).sum(dim=1).view(expand), wd_ratio, True
    return perturb, 1.0, False


@pytest.mark.parametrize("opt_name", ["AdamP", "SGDP"])
def test_bn_cnn_training_matches_official_sequence(opt_name):
    """A real BatchNorm CNN in float64: the projection fires on its own for the conv weights (and not
    for the classifier); AdamP/SGDP and the official step sequence stay equal over several steps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3, bias=False),
        torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 3),
    ).double()
    ref = copy.deepcopy(net)
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    if opt_name == "AdamP":
        kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=False)
        opt = AdamP(net.parameters(), **kw)
    else:
        kw = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1)
        opt = SGDP(net.parameters(), **kw)
    state = {p: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in ref.parameters()}
    fired = set()
    for t in range(1, 5):
        for model in (net, ref):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                g, s = p.grad, state[p]
                if opt_name == "AdamP":
                    b1, b2 = kw["betas"]
                    s["m"] = b1 * s["m"] + (1 - b1) * g
                    s["v"] = b2 * s["v"] + (1 - b2) * g * g
                    u = s["m"] / (s["v"].sqrt() / math.sqrt(1 - b2**t) + kw["eps"])
                    step = kw["lr"] / (1 - b1**t)
                    decay = kw["lr"] * kw["weight_decay"]
                else:
                    s["m"] = kw["momentum"] * s["m"] + g
                    u = s["m"]
                    step = kw["lr"]
                    decay = kw["lr"] * kw["weight_decay"] / (1 - kw["momentum"])
                f = 1.0
                if p.dim() > 1:
                    u, f, hit = _official_projection(p, g, u, kw["delta"], kw["wd_ratio"], kw["eps"])
                    if hit:
                        fired.add(name)
                    if opt_name == "SGDP":
                        s["m"] = u  # the official code projects its buffer in place
                p.mul_(1 - decay * f)
                p.sub_(step * u)
    assert fired == {"0.weight", "3.weight"}
    # not bit-equal: the first conv's bias has a zero true gradient (BatchNorm removes it), and Adam
    # turns the ~1e-17 rounding left in it into O(lr) steps that differ between the two sequences
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
