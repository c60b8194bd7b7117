"""RepBN / PRepBN (SLAB, Guo et al. 2024, arXiv:2405.11582) against plain re-statements and the official code.

Equations (official ``classification/models/prepbn.py``), tokens x of shape (B, T, C):

  RepBN, training:  mu, var = mean / biased variance of x over (B, T) per channel
                    y = (x - mu) / sqrt(var + eps) * gamma + beta + alpha * x
                    running_mean <- 0.9 running_mean + 0.1 mu
                    running_var  <- 0.9 running_var  + 0.1 var * n / (n - 1)      (n = B*T)
  RepBN, eval:      y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta + alpha * x

  PRepBN, training: if warm > 0:  y = LN(x);  warm -= 1                          (RepBN not run)
                    else:         lam = r0 * iter / total_step;  iter -= 1 if iter > 0
                                  y = lam * LN(x) + (1 - lam) * RepBN(x)
  PRepBN, eval:     y = RepBN(x)   (running statistics; the schedule is ignored)
"""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional.rep_batch_norm import rep_batch_norm
from normkit.nn.rep_batch_norm import PRepBN, RepBN, fuse_rep_batch_norm

D = torch.float64


# ---- plain re-statements ---------------------------------------------------------------------


def ref_repbn(x, gamma, beta, alpha, mean, var, eps=1e-5):
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta + alpha * x


def batch_stats(x):
    flat = x.reshape(-1, x.shape[-1])
    mu = flat.mean(0)
    var = ((flat - mu) ** 2).mean(0)
    return mu, var, flat.shape[0]


def ref_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


class OfficialRepBN(torch.nn.Module):
    """The official RepBN, restated (xinghaochen/SLAB classification/models/prepbn.py)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.ones(1))
        self.bn = torch.nn.BatchNorm1d(channels)

    def forward(self, x):
        x = x.transpose(1, 2)
        x = self.bn(x) + self.alpha * x
        return x.transpose(1, 2)


class OfficialLinearNorm(torch.nn.Module):
    """The official LinearNorm(norm1=LayerNorm(eps=1e-6), norm2=RepBN), restated."""

    def __init__(self, dim, warm=0, step=300000, r0=1.0):
        super().__init__()
        self.register_buffer("warm", torch.tensor(warm))
        self.register_buffer("iter", torch.tensor(step))
        self.register_buffer("total_step", torch.tensor(step))
        self.r0 = r0
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = OfficialRepBN(dim)

    def forward(self, x):
        if self.training:
            if self.warm > 0:
                self.warm.copy_(self.warm - 1)
                x = self.norm1(x)
            else:
                lamda = self.r0 * self.iter / self.total_step
                if self.iter > 0:
                    self.iter.copy_(self.iter - 1)
                x = lamda * self.norm1(x) + (1 - lamda) * self.norm2(x)
        else:
            x = self.norm2(x)
        return x


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand_like(p) + 0.5)


# ---- RepBN -----------------------------------------------------------------------------------


def test_repbn_train_and_eval_against_equations_step_by_step():
    m = RepBN(6).double()
    _randomize(m)
    rm, rv = torch.zeros(6, dtype=D), torch.ones(6, dtype=D)
    for _ in range(3):
        x = torch.randn(3, 5, 6, dtype=D) * 2 + 1
        mu, var, n = batch_stats(x)
        y = m(x)
        torch.testing.assert_close(y, ref_repbn(x, m.bn.weight, m.bn.bias, m.alpha, mu, var))
        rm = 0.9 * rm + 0.1 * mu
        rv = 0.9 * rv + 0.1 * var * n / (n - 1)
        torch.testing.assert_close(m.bn.running_mean, rm)
        torch.testing.assert_close(m.bn.running_var, rv)
    assert int(m.bn.num_batches_tracked) == 3
    m.eval()
    x = torch.randn(2, 4, 6, dtype=D)
    torch.testing.assert_close(m(x), ref_repbn(x, m.bn.weight, m.bn.bias, m.alpha, rm, rv))
    a, c = m.scale_shift()
    torch.testing.assert_close(m(x), x * a + c)


def test_repbn_matches_official_code_and_loads_its_state_dict():
    off, ours = OfficialRepBN(8), RepBN(8)
    _randomize(off)
    ours.load_state_dict(off.state_dict(), strict=True)
    assert ours.alpha.shape == (1,) and RepBN(8).alpha.item() == 1.0
    for mode in (True, True, False):
        off.train(mode)
        ours.train(mode)
        x = torch.randn(4, 7, 8)
        torch.testing.assert_close(ours(x), off(x))
    for k, v in off.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)


def test_repbn_mask_keeps_padding_out_of_statistics():
    m = RepBN(4).double()
    x = torch.randn(2, 6, 4, dtype=D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 5:] = False
    y = m(x, mask)
    real = x[mask]  # (n_real, C)
    mu, var, n = batch_stats(real)
    torch.testing.assert_close(y[mask], ref_repbn(real, 1.0, 0.0, 1.0, mu, var))
    torch.testing.assert_close(m.bn.running_var, 0.9 + 0.1 * var * n / (n - 1))
    with pytest.raises(TypeError, match="bool"):
        m(x, mask.float())
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\)"):
        m(x, mask[:, :5])


def test_repbn_gradcheck_float64():
    x = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    w, b = (torch.rand(5, dtype=D) + 0.5).requires_grad_(), torch.randn(5, dtype=D, requires_grad=True)
    alpha = torch.tensor([0.7], dtype=D, requires_grad=True)

    def f(x, w, b, alpha):
        return rep_batch_norm(x, None, None, w, b, alpha, training=True)

    assert torch.autograd.gradcheck(f, (x, w, b, alpha))
    rm, rv = torch.randn(5, dtype=D), torch.rand(5, dtype=D) + 0.5
    assert torch.autograd.gradcheck(lambda x, w, b, a: rep_batch_norm(x, rm, rv, w, b, a, training=False), (x, w, b, alpha))


def test_fuse_into_next_linear_equals_eval_forward():
    for norm in (RepBN(6), PRepBN(6, total_step=2)):
        norm.double()
        _randomize(norm)
        for _ in range(3):
            norm(torch.randn(4, 3, 6, dtype=D) * 3 + 2)
        norm.eval()
        lin = torch.nn.Linear(6, 5).double()
        fused = fuse_rep_batch_norm(norm, lin)
        x = torch.randn(2, 3, 6, dtype=D)
        torch.testing.assert_close(fused(x), lin(norm(x)))
    with pytest.raises(ValueError, match="in_features"):
        fuse_rep_batch_norm(RepBN(6), torch.nn.Linear(5, 2))


def test_repbn_zero_init_llama_variant_and_errors():
    m = RepBN(4, alpha_init=0.0, zero_init=True)
    assert m.alpha.item() == 0 and torch.all(m.bn.weight == 0) and torch.all(m.bn.bias == 0)
    with pytest.raises(ValueError, match=r"\(N, \*, 8\)"):
        RepBN(8)(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="momentum"):
        RepBN(8, momentum=None)
    with pytest.raises(TypeError, match="floating"):
        RepBN(8)(torch.ones(2, 3, 8, dtype=torch.long))


# ---- PRepBN ----------------------------------------------------------------------------------


def expected_lambdas(warm, total, r0, calls):
    """lam used at each training call (1 during warm-up, i.e. LN alone)."""
    out, it = [], total
    for n in range(calls):
        if n < warm:
            out.append(1.0)
        else:
            out.append(r0 * it / total)
            it = max(it - 1, 0)
    return out


def test_prepbn_schedule_step_by_step_against_equations():
    m = PRepBN(6, warm=2, total_step=4, r0=0.5).double()
    _randomize(m)
    lams = [1.0, 1.0, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    assert expected_lambdas(2, 4, 0.5, 8) == lams
    rm, rv = torch.zeros(6, dtype=D), torch.ones(6, dtype=D)
    for step, lam in enumerate(lams):
        assert float(m.current_lambda(D)) == lam
        x = torch.randn(3, 4, 6, dtype=D) + 1
        y = m(x)
        ln = ref_ln(x, m.norm1.weight, m.norm1.bias, 1e-6)
        if step < 2:  # warm-up: LN only, BatchNorm untouched
            torch.testing.assert_close(y, ln)
            assert int(m.norm2.bn.num_batches_tracked) == 0
        else:
            mu, var, n = batch_stats(x)
            rep = ref_repbn(x, m.norm2.bn.weight, m.norm2.bn.bias, m.norm2.alpha, mu, var)
            torch.testing.assert_close(y, lam * ln + (1 - lam) * rep)
            rm, rv = 0.9 * rm + 0.1 * mu, 0.9 * rv + 0.1 * var * n / (n - 1)
        torch.testing.assert_close(m.norm2.bn.running_mean, rm)
        torch.testing.assert_close(m.norm2.bn.running_var, rv)
    assert (int(m.warm), int(m.iter), int(m.total_step)) == (0, 0, 4)


def test_prepbn_matches_official_linear_norm_including_state_dict():
    off, ours = OfficialLinearNorm(8, warm=2, step=4), PRepBN(8, warm=2, total_step=4)
    _randomize(off)
    assert list(ours.state_dict()) == list(off.state_dict())
    ours.load_state_dict(off.state_dict(), strict=True)
    for step in range(8):
        mode = step != 5  # one eval call mid-schedule: RepBN only, counters unchanged
        off.train(mode)
        ours.train(mode)
        x = torch.randn(3, 5, 8)
        torch.testing.assert_close(ours(x), off(x))
        for k, v in off.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, msg=f"{k} at step {step}")


def test_prepbn_eval_semantics():
    m = PRepBN(6, total_step=10)
    for _ in range(3):
        m(torch.randn(4, 3, 6))
    m.eval()
    x = torch.randn(2, 3, 6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.testing.assert_close(m(x), m.norm2(x))  # official: RepBN only, even mid-schedule
    lam = float(m.current_lambda())
    assert lam == pytest.approx(0.7)
    m.eval_mix = True
    torch.testing.assert_close(m(x), lam * m.norm1(x) + (1 - lam) * m.norm2(x))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])  # eval never advances the schedule


def test_prepbn_accumulation_steps_advance_every_kth_call():
    m = PRepBN(4, warm=1, total_step=2, accumulation_steps=2)
    # official LLaMA LinearNorm (k = 16 there), restated with Python ints
    warm, it, total, num_step, k = 1, 2, 2, 0, 2
    for _ in range(9):
        lam = 1.0 if warm > 0 else it / total
        assert (int(m.warm), int(m.iter), float(m.current_lambda())) == (warm, it, lam)
        m(torch.randn(2, 3, 4))
        if warm > 0:
            warm -= num_step % k == 0
        elif it > 0 and num_step % k == 0:
            it -= 1
        num_step = (num_step + 1) % k
    assert (warm, it) == (0, 0)
    assert "num_step" in m.state_dict() and "num_step" not in PRepBN(4).state_dict()


def test_prepbn_checkpoint_resume_mid_schedule_is_identical():
    torch.manual_seed(1)
    xs = [torch.randn(3, 4, 6) for _ in range(7)]
    a = PRepBN(6, warm=1, total_step=5, accumulation_steps=2)
    _randomize(a)
    for x in xs[:4]:
        a(x)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PRepBN(6, warm=1, total_step=5, accumulation_steps=2)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert float(b.current_lambda(D)) == float(a.current_lambda(D)) == 0.8
    for x in xs[4:]:
        torch.testing.assert_close(b(x), a(x))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)


def test_prepbn_compiled_schedule_no_graph_break_no_recompile_and_exact_grads():
    torch._dynamo.reset()
    eager = PRepBN(6, warm=1, total_step=3)
    _randomize(eager)
    comp = PRepBN(6, warm=1, total_step=3)
    comp.load_state_dict(eager.state_dict())
    cm = torch.compile(comp, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(5):  # warm-up, lam = 1, 2/3, 1/3, 0
            x = torch.randn(3, 4, 6, requires_grad=True)
            y, y_ref = cm(x), eager(x)
            torch.testing.assert_close(y, y_ref)
            grads = torch.autograd.grad(y.sin().sum(), [x, *comp.parameters()], allow_unused=True)
            refs = torch.autograd.grad(y_ref.sin().sum(), [x, *eager.parameters()], allow_unused=True)
            for g, r in zip(grads, refs):
                # compiled warm-up runs RepBN with weight 0: zero grads where eager has None
                torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, msg=f"step {step}")
            for k, v in eager.state_dict().items():
                torch.testing.assert_close(comp.state_dict()[k], v, msg=f"{k} at step {step}")


def test_prepbn_errors():
    with pytest.raises(ValueError, match="warm"):
        PRepBN(4, warm=-1)
    with pytest.raises(ValueError, match="total_step"):
        PRepBN(4, total_step=1.5)
    with pytest.raises(ValueError, match="r0"):
        PRepBN(4, r0=float("nan"))
    with pytest.raises(ValueError, match="accumulation_steps"):
        PRepBN(4, accumulation_steps=0)
    with pytest.raises(ValueError, match=r"\(N, \*, 4\)"):
        PRepBN(4)(torch.randn(2, 3, 5))
    m = PRepBN(4, total_step=0)  # LN -> RepBN immediately (official: 0/0)
    assert float(m.current_lambda()) == 0.0


@settings(max_examples=25, deadline=None)
@given(warm=st.integers(0, 4), total=st.integers(0, 5), r0=st.sampled_from([0.25, 0.5, 1.0]), calls=st.integers(1, 12))
def test_prepbn_lambda_closed_form(warm, total, r0, calls):
    m = PRepBN(2, warm=warm, total_step=total, r0=r0)
    x = torch.randn(2, 2, 2)
    for n in range(calls):
        # closed form: 1 during warm-up, then r0 * max(total - (n - warm), 0) / total
        want = 1.0 if n < warm else (r0 * max(total - (n - warm), 0) / total if total else 0.0)
        assert float(m.current_lambda(D)) == pytest.approx(want)
        m(x)
