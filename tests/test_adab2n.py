"""AdaB2N (Lyu et al. 2023, arXiv:2310.08855) against a plain re-statement of the official code."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normkit
from normkit.nn.adab2n import (
    AdaB2N,
    adab2n_eta,
    adab2n_layers,
    adab2n_regularizer,
    adab2n_sample_weights,
    convert_adab2n,
    end_task,
    set_task_labels,
)
from normkit.nn.batch_norm import BatchNorm, BatchNorm2d

# --------------------------------------------------------------------------- re-statement


class RefAdaB2N:
    """Line-by-line restatement of lvyilin/AdaB2N models/utils/adab2n.py (float64, Python loops)."""

    def __init__(self, c, num_tasks, kappa, momentum=0.1, eps=1e-5):
        self.c, self.kappa, self.m, self.eps = c, kappa, momentum, eps
        self.rm = torch.zeros(c, dtype=torch.float64)
        self.rv = torch.ones(c, dtype=torch.float64)
        self.nbt = 0
        self.last_eta = None
        self.cur_tasks = 0
        self.w = torch.zeros(num_tasks, dtype=torch.float64)

    def get_eta(self):
        if self.kappa == 0.0:
            return 1.0 / self.nbt
        if self.kappa == 1.0:
            return self.m
        if self.last_eta is None:
            self.last_eta = self.m**self.kappa
            return self.last_eta
        self.last_eta = self.last_eta / (self.last_eta + (1 - self.m) ** self.kappa)
        return self.last_eta

    def weights(self, labels_task):
        # the model-level set_counts: unique / counts, extended to cur_tasks + 1 entries
        n = len(labels_task)
        counts = {t: labels_task.count(t) for t in set(labels_task)}
        ext = [counts.get(t, 0) for t in range(self.cur_tasks + 1)]
        conc = [math.exp(float(self.w[t])) + ext[t] for t in range(self.cur_tasks + 1)]
        total = sum(conc)
        return [conc[labels_task[i]] / total / counts[labels_task[i]] for i in range(n)]

    def train_step(self, x, task_ids=None):
        x = x.double()
        n, c = x.shape[:2]
        self.nbt += 1
        eta = self.get_eta()
        mean = torch.zeros(c, dtype=torch.float64)
        var = torch.zeros(c, dtype=torch.float64)
        if task_ids is not None and self.cur_tasks > 0:
            w = self.weights([int(t) for t in task_ids])
            for ch in range(c):
                mean[ch] = sum(w[i] * x[i, ch].mean() for i in range(n))
                var[ch] = sum(w[i] * ((x[i, ch] - mean[ch]) ** 2).mean() for i in range(n))
        else:
            for ch in range(c):
                vals = x[:, ch].reshape(-1)
                mean[ch] = vals.mean()
                var[ch] = ((vals - mean[ch]) ** 2).mean()
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        self.rm = self.rm + eta * (mean - self.rm)
        self.rv = (1 - eta) * self.rv + eta * var
        loss = ((mean - self.rm) ** 2).mean() + ((var - self.rv) ** 2).mean()
        return y, loss, eta


def _ids(n, cur, gen):
    return torch.randint(0, cur + 1, (n,), generator=gen)


# --------------------------------------------------------------------------- layer vs re-statement


@pytest.mark.parametrize("kappa", [0.0, 0.4, 1.0])
def test_training_steps_match_restatement(kappa):
    gen = torch.Generator().manual_seed(1)
    m = AdaB2N(3, 4, 2, kappa=kappa, dtype=torch.float64)
    ref = RefAdaB2N(3, 4, kappa)
    with torch.no_grad():
        m.task_weight.copy_(torch.tensor([0.3, -0.2, 0.5, 0.0]))
    ref.w = m.task_weight.detach().clone()
    for step in range(12):
        if step in (3, 7):  # task boundaries
            m.end_task()
            ref.cur_tasks += 1
        x = torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 + 1
        ids = _ids(6, ref.cur_tasks, gen) if step % 4 != 1 else None  # some steps without task ids
        m.set_task_ids(ids)
        y = m(x)
        y_ref, loss_ref, _ = ref.train_step(x, ids)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(m.running_mean, ref.rm)
        torch.testing.assert_close(m.running_var, ref.rv)
        torch.testing.assert_close(m.regularizer().detach(), loss_ref)
    assert int(m.num_batches_tracked) == 12 and int(m.eta_steps) == 12 and int(m.cur_tasks) == 2


def test_eval_uses_running_statistics_like_bn():
    m = AdaB2N(4, 3, 2, kappa=0.4)
    m.end_task()
    for _ in range(3):
        m.set_task_ids(torch.tensor([0, 1, 1, 0, 1]))
        m(torch.randn(5, 4, 3, 3))
    m.eval()
    x = torch.randn(2, 4, 3, 3)
    expected = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    torch.testing.assert_close(m(x, task_ids=torch.tensor([5, 9])), expected)  # ids are ignored in eval


def test_forward_task_ids_argument_overrides_stored_ids():
    x = torch.randn(4, 2, 3)
    a, b = AdaB2N(2, 2), AdaB2N(2, 2)
    a.end_task(), b.end_task()
    a.set_task_ids(torch.tensor([0, 0, 0, 1]))
    b.set_task_ids(torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(a(x, torch.tensor([0, 1, 1, 1])), b(x, torch.tensor([0, 1, 1, 1])))


def test_first_task_and_no_ids_fall_back_to_plain_bn_statistics():
    x = torch.randn(8, 3, 4, 4)
    m = AdaB2N(3, 5, 2)
    m.set_task_ids(torch.zeros(8, dtype=torch.long))  # cur_tasks = 0: plain biased statistics
    ref = torch.nn.functional.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    torch.testing.assert_close(m(x), ref)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    torch.testing.assert_close(m.running_mean, 0.1 * mean)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * var)  # biased: no Bessel correction (unlike torch BN)


# --------------------------------------------------------------------------- weights and eta


def test_sample_weights_formula_and_missing_task_shrinks():
    tw = torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64)
    ids = torch.tensor([0, 0, 2, 0, 2])  # task 1 (seen) absent from the batch
    w = adab2n_sample_weights(ids, tw, torch.tensor(2))
    conc = [math.exp(0.5) + 3, math.exp(-1.0) + 0, math.exp(0.2) + 2]
    pi = [c / sum(conc) for c in conc]
    expected = torch.tensor([pi[0] / 3, pi[0] / 3, pi[2] / 2, pi[0] / 3, pi[2] / 2], dtype=torch.float64)
    torch.testing.assert_close(w, expected)
    assert float(w.sum()) < 1.0  # official behaviour: the absent task keeps its share
    w_renorm = adab2n_sample_weights(ids, tw, torch.tensor(2), renormalize=True)
    torch.testing.assert_close(w_renorm.sum(), torch.tensor(1.0, dtype=torch.float64))
    # unseen tasks (> cur_tasks) never enter the normaliser
    w1 = adab2n_sample_weights(torch.tensor([0, 1]), torch.zeros(5, dtype=torch.float64), torch.tensor(1))
    torch.testing.assert_close(w1, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("kappa", [0.1, 0.4, 0.7])
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_eta_schedule_matches_official_recursion(kappa, momentum):
    last = None
    for t in range(1, 60):
        last = momentum**kappa if last is None else last / (last + (1 - momentum) ** kappa)
        got = float(adab2n_eta(kappa, momentum, torch.tensor(t), torch.tensor(t + 7)))
        assert got == pytest.approx(last, rel=1e-12)
    far = float(adab2n_eta(kappa, momentum, torch.tensor(100_000), torch.tensor(1)))
    assert far == pytest.approx(1 - (1 - momentum) ** kappa, rel=1e-9)  # the fixed point of the recursion


def test_eta_end_cases():
    for t in (1, 5, 40):
        assert float(adab2n_eta(0.0, 0.1, torch.tensor(t), torch.tensor(t + 3))) == pytest.approx(1 / (t + 3))
        assert adab2n_eta(1.0, 0.1, torch.tensor(t), torch.tensor(t)) == 0.1
    assert float(adab2n_eta(0.5, 0.0, torch.tensor(3), torch.tensor(3))) == 0.0


# --------------------------------------------------------------------------- regulariser and gradients


def test_regularizer_formula_and_gradient_reaches_task_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), BatchNorm2d(4))
    convert_adab2n(model, num_tasks=3, classes_per_task=2, kappa=0.7)
    end_task(model)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1])
    set_task_labels(model, labels)
    x = torch.randn(7, 1, 4, 4)
    layers = list(adab2n_layers(model))
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    eta = float(adab2n_eta(0.7, 0.1, torch.tensor(1), torch.tensor(1)))
    # recompute each layer's balanced statistics from its input by hand
    inputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0].detach())) for m in layers]
    model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for m, inp, (rm0, rv0) in zip(layers, inputs, before):
        tasks = (labels // 2).tolist()
        conc = [1.0 + tasks.count(0), 1.0 + tasks.count(1)]
        w = torch.tensor([conc[t] / sum(conc) / tasks.count(t) for t in tasks])
        mean = (w[:, None] * inp.mean((2, 3))).sum(0)
        var = (w[:, None] * (inp - mean[None, :, None, None]).square().mean((2, 3))).sum(0)
        rm = rm0 + eta * (mean - rm0)
        rv = (1 - eta) * rv0 + eta * var
        torch.testing.assert_close(m.running_mean, rm)
        torch.testing.assert_close(m.running_var, rv)
        reg = ((mean - rm) ** 2).mean() + ((var - rv) ** 2).mean()
        torch.testing.assert_close(m.loss.detach(), reg)
        total += float(reg)
    loss = adab2n_regularizer(model)
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    loss.backward()
    assert all(m.task_weight.grad is not None and m.task_weight.grad[:2].abs().sum() > 0 for m in layers)
    assert all(float(m.task_weight.grad[2:].abs().sum()) == 0.0 for m in layers)  # unseen task: no gradient


def test_gradcheck_float64():
    m = AdaB2N(3, 3, 1, kappa=0.4, dtype=torch.float64)
    m.end_task()
    m.end_task()
    ids = torch.tensor([0, 2, 2, 1, 0])
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor([0.1, -0.3, 0.2], dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in m.named_buffers()}

    def f(x, tw, w, b):
        params = {"task_weight": tw, "weight": w, "bias": b, **{k: v.clone() for k, v in state.items()}}
        return torch.func.functional_call(m, params, (x, ids))

    assert torch.autograd.gradcheck(f, (x, tw, w, b))


def test_regularizer_gradient_treats_running_stats_as_constants():
    """The official loss is MSE against the *updated* buffers, which were updated with detached
    statistics: the gradient flows through mu, var only (so it is not a gradcheck-able function)."""
    m = AdaB2N(3, 3, 1, kappa=0.4, dtype=torch.float64)
    m.end_task()
    ids = torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    m(x, ids)
    gx, gw = torch.autograd.grad(m.loss, (x, m.task_weight))
    # restatement: balanced mu/var as functions of x and task weights, buffers as constants
    tw = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    conc = torch.stack([tw[0].exp() + 2, tw[1].exp() + 3])
    pi = conc / conc.sum()
    w = torch.stack([pi[0] / 2, pi[1] / 3, pi[1] / 3, pi[0] / 2, pi[1] / 3])
    mean = (w[:, None] * x2.mean((2, 3))).sum(0)
    var = (w[:, None] * (x2 - mean[None, :, None, None]).square().mean((2, 3))).sum(0)
    loss = ((mean - m.running_mean) ** 2).mean() + ((var - m.running_var) ** 2).mean()
    rx, rw = torch.autograd.grad(loss, (x2, tw))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    assert float(rw[2]) == 0.0


# --------------------------------------------------------------------------- conversion and state


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.ModuleDict({"bn": BatchNorm(4), "conv": nn.Conv2d(4, 6, 1)})
        self.bn_last = normkit.BatchNorm2d(6, eps=1e-3, momentum=0.3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 9, 5), nn.BatchNorm1d(5, affine=False))

    def forward(self, x):
        x = self.stem(x)
        x = self.block["conv"](self.block["bn"](x))
        return self.head(self.bn_last(x))


def test_convert_replaces_every_bn_and_copies_state():
    torch.manual_seed(0)
    net = _Net()
    net.train()
    for _ in range(3):
        net(torch.randn(8, 2, 3, 3))
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.affine:
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
    net.stem[1].weight.requires_grad_(False)
    net.eval()
    x = torch.randn(4, 2, 3, 3)
    expected = net(x)
    olds = {n: copy.deepcopy(mod) for n, mod in net.named_modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)}
    out = convert_adab2n(net, num_tasks=5, classes_per_task=2, kappa=0.4)
    assert out is net
    new = dict(net.named_modules())
    assert len(olds) == 4
    for name, old in olds.items():
        m = new[name]
        assert type(m) is AdaB2N and m.kappa == 0.4 and m.num_tasks == 5 and not m.training
        assert m.eps == old.eps and m.momentum == old.momentum and m.affine == old.affine
        for k, v in old.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v)
    assert not new["stem.1"].weight.requires_grad and new["stem.1"].bias.requires_grad
    assert not any(type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d, BatchNorm, normkit.BatchNorm2d) for mod in net.modules())
    torch.testing.assert_close(net(x), expected)  # eval math is BN's
    # already-converted layers are kept; a bare BN returns a new module; dtype is preserved
    assert convert_adab2n(net, 5, 2) is net and new["stem.1"] is dict(net.named_modules())["stem.1"]
    bn64 = nn.BatchNorm2d(3).double()
    conv = convert_adab2n(bn64, 2, 2)
    assert isinstance(conv, AdaB2N) and conv.running_mean.dtype == torch.float64 and conv.task_weight.dtype == torch.float64
    assert isinstance(convert_adab2n(nn.BatchNorm1d(3), 2, 2), AdaB2N)


def test_convert_rejects_unsupported_bn():
    with pytest.raises(ValueError, match="track_running_stats"):
        convert_adab2n(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), 2, 2)
    with pytest.raises(ValueError, match="momentum=None"):
        convert_adab2n(nn.BatchNorm2d(3, momentum=None), 2, 2)
    with pytest.raises(ValueError, match="no AdaB2N layer"):
        set_task_labels(nn.Linear(2, 2), torch.tensor([0]))


def _train_steps(m, gen, steps, start=0):
    outs = []
    for s in range(start, start + steps):
        if s == 2:
            m.end_task()
        cur = int(m.cur_tasks)
        m.set_task_ids(torch.randint(0, cur + 1, (6,), generator=gen))
        outs.append(m(torch.randn(6, 3, 2, 2, generator=gen)))
    return outs


def test_state_dict_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    a = AdaB2N(3, 4, 2, kappa=0.4)
    _train_steps(a, gen, 4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = AdaB2N(3, 4, 2, kappa=0.4)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert set(a.state_dict()) >= {"task_weight", "cur_tasks", "eta_steps", "running_mean", "running_var", "num_batches_tracked"}
    g_a, g_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for ya, yb in zip(_train_steps(a, g_a, 5, start=4), _train_steps(b, g_b, 5, start=4)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_loads_official_checkpoint_without_eta_steps():
    a = AdaB2N(3, 2, 2, kappa=0.4)
    _train_steps(a, torch.Generator().manual_seed(0), 3)
    sd = {k: v for k, v in a.state_dict().items() if k != "eta_steps"}
    b = AdaB2N(3, 2, 2, kappa=0.4)
    b.load_state_dict(sd)  # strict: the missing key is filled (official reload: eta restarts at m^kappa)
    assert int(b.eta_steps) == 0 and int(b.cur_tasks) == 1


# --------------------------------------------------------------------------- errors, shapes, compile


def test_bad_inputs_raise_clear_errors():
    m = AdaB2N(4, 3, 2)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 0\]"):
        m.set_task_ids(torch.tensor([0, 1]))  # task 1 before end_task()
    m.end_task()
    with pytest.raises(TypeError, match="integer tensor"):
        m.set_task_ids(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        m(torch.randn(5, 4, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="4 channels"):
        m(torch.randn(5, 3, 2))
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        m(torch.randn(4))
    with pytest.raises(TypeError, match="integer tensor of shape"):
        m.set_task_labels(torch.tensor([0.5]))
    for kw, msg in [({"kappa": 1.5}, "kappa"), ({"momentum": None}, "momentum"), ({"eps": -1.0}, "eps")]:
        with pytest.raises(ValueError, match=msg):
            AdaB2N(4, 3, 2, **kw)
    with pytest.raises(ValueError, match="num_tasks"):
        AdaB2N(4, 0)
    with pytest.raises(RuntimeError, match="no training forward"):
        AdaB2N(4).regularizer()


def test_channels_last_and_2d_input():
    x = torch.randn(6, 5, 4)
    a = AdaB2N(4, 2, 1, channels_last=True)
    b = AdaB2N(4, 2, 1)
    a.end_task(), b.end_task()
    ids = torch.tensor([0, 1, 1, 0, 1, 1])
    torch.testing.assert_close(a(x, ids), b(x.movedim(-1, 1), ids).movedim(1, -1))
    y = AdaB2N(4, 2, 1)(torch.randn(6, 4))  # (N, C)
    assert y.shape == (6, 4) and torch.isfinite(y).all()


def test_registered_and_half_precision():
    info = normkit.norm_info("adab2n")
    assert info.cls is AdaB2N and info.layout == "channels_first" and info.batch_dependent and info.train_eval_differ
    assert info.paper.arxiv == "2310.08855"
    m = normkit.registry.sample_norm("adab2n", 8).to(torch.bfloat16)
    m.end_task()
    m.set_task_ids(torch.tensor([0, 1, 1, 0]))
    y = m(torch.randn(4, 8, 3, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.slow
def test_compiled_balanced_path_matches_eager():
    m = AdaB2N(4, 3, 2, kappa=0.4)
    m.end_task()
    ref = copy.deepcopy(m)
    ids = torch.tensor([0, 1, 1, 0, 0])
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x, ids)
    (y.square().sum() + m.loss).backward()
    g = x.grad.clone()
    x.grad = None
    y_ref = ref(x, ids)
    (y_ref.square().sum() + ref.loss).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.task_weight.grad, ref.task_weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.running_var, ref.running_var)


# --------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 9))
def test_balanced_statistics_are_permutation_invariant(seed, n):
    """Shuffling the samples (with their task ids) permutes the output and leaves the statistics unchanged."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 3, (n,), generator=gen)
    perm = torch.randperm(n, generator=gen)
    a, b = AdaB2N(3, 3, 1, kappa=0.4, dtype=torch.float64), AdaB2N(3, 3, 1, kappa=0.4, dtype=torch.float64)
    for m in (a, b):
        m.end_task(), m.end_task()
    torch.testing.assert_close(a(x, ids)[perm], b(x[perm], ids[perm]))
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)
    # all seen tasks present: the weights sum to one
    if len(set(ids.tolist())) == 3:
        w = adab2n_sample_weights(ids, a.task_weight.detach(), a.cur_tasks)
        assert float(w.sum()) == pytest.approx(1.0)


def test_convert_keeps_synchronization_and_the_fast_path_equals_eager():
    from normkit.backend import set_backend

    model = convert_adab2n(nn.Sequential(nn.SyncBatchNorm(3), BatchNorm(3, process_group="world"), nn.BatchNorm2d(3)), 3, 2)
    assert [m.process_group for m in adab2n_layers(model)] == ["world", "world", None]
    assert "process_group='world'" in repr(model[0])
    a = AdaB2N(3, 3, 1, kappa=0.7, dtype=torch.float64)
    a.end_task()
    b = copy.deepcopy(a)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 0, 1])
    with set_backend("eager"):
        want = b(x, ids)
    torch.testing.assert_close(a(x, ids), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.regularizer(), b.regularizer(), rtol=1e-12, atol=1e-12)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-12, atol=1e-12)
