"""normkit.convert.ln_removal: FakeLayerNorm, the official schedule, fine-tune and export (arXiv:2507.02559)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normkit.convert.ln_removal import (
    FakeLayerNorm,
    RemovalEvent,
    apply_removal_event,
    export_layernorm_free,
    finetune_lm,
    lm_loss,
    removal_schedule,
    remove_layernorm,
    to_fake_layernorm,
)

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def plain_ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def plain_fake(x, w, b, s):
    return (x - x.mean(-1, keepdim=True)) / s * w + b


def per_token_std_mean(x, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    return torch.sqrt(((x - mu) ** 2).mean(-1) + eps).mean()


def test_fake_layernorm_modes_and_running_std():
    torch.manual_seed(0)
    ln = FakeLayerNorm(8, momentum=0.9)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x1, x2, x3 = torch.randn(3, 5, 8) * 3, torch.randn(3, 5, 8) * 0.5, torch.randn(3, 5, 8)
    ln.train()
    torch.testing.assert_close(ln(x1), plain_ln(x1, ln.weight, ln.bias, 1e-5))
    s1 = per_token_std_mean(x1)
    torch.testing.assert_close(ln.running_std, s1)  # first batch initialises
    ln(x2)
    s2 = 0.9 * s1 + 0.1 * per_token_std_mean(x2)
    torch.testing.assert_close(ln.running_std, s2)
    ln.eval()
    ln(x3)  # evaluation never changes the estimate
    torch.testing.assert_close(ln.running_std, s2)
    ln.train()
    ln.set_fake()
    torch.testing.assert_close(ln(x3), plain_fake(x3, ln.weight, ln.bias, s2))
    ln(x1 * 10)  # frozen once fake
    torch.testing.assert_close(ln.std, s2)


def test_fake_layernorm_special_first_position_and_gradcheck():
    torch.manual_seed(1)
    ln = FakeLayerNorm(6, special_first_position=True).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    x[:, 0] *= 20  # a "BOS" position with a much larger norm
    ln.train()
    ln(x)
    sd = torch.sqrt(x.var(-1, unbiased=False) + 1e-5)
    torch.testing.assert_close(ln.std_first, sd[:, 0].mean())
    torch.testing.assert_close(ln.std, sd.mean())
    ln.set_fake()
    y = ln(x)
    torch.testing.assert_close(y[:, 0], plain_fake(x[:, 0], ln.weight, ln.bias, sd[:, 0].mean()))
    torch.testing.assert_close(y[:, 1:], plain_fake(x[:, 1:], ln.weight, ln.bias, sd.mean()))
    ln.disable_first_position()
    torch.testing.assert_close(ln(x), plain_fake(x, ln.weight, ln.bias, sd.mean()))
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ln(t), (xg,))


def test_schedule_is_the_official_gpt2_small_one():
    ev = removal_schedule(12, special_first_position=True)
    steps = {(e.target, e.layer): e.step for e in ev}
    # config.py make_gpt2_standard: start_ln2=20, gaps 2/2/3, lnf after 12*3, bos = lnf + 2 + 10
    assert [steps["ln_2", i] for i in range(12)] == list(range(20, 44, 2))
    assert [steps["ln_1_qk", i] for i in range(12)] == list(range(44, 68, 2))
    assert [steps["ln_1_v", i] for i in range(12)] == list(range(68, 104, 3))
    assert steps["ln_f", None] == 104 and steps["first_position", None] == 116
    assert [e.step for e in ev] == sorted(e.step for e in ev) and len(ev) == 38
    assert {e.step for e in removal_schedule(3, gap_ln2=0) if e.target == "ln_2"} == {20}
    with pytest.raises(ValueError, match="gap_ln1v must be an int >= 0"):
        removal_schedule(2, gap_ln1v=-1)


def test_conversion_is_identity_and_ln1_paths_split():
    model = tiny_gpt2()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model.eval()(ids).logits
    fake = to_fake_layernorm(model, inplace=False).model
    with torch.no_grad():
        torch.testing.assert_close(fake.eval()(ids).logits, ref)
    assert isinstance(fake.transformer.h[1].ln_2, FakeLayerNorm) and type(model.transformer.ln_f) is nn.LayerNorm
    # ln_1's Q/K path fake, V path still real: c_attn's Q,K from the fake norm, V from the real one
    block = fake.transformer.h[0]
    x = torch.randn(2, 16, 32)
    block.ln_1.train()(x)  # one training forward sets the std estimate
    s = float(block.ln_1.std)
    apply_removal_event(fake, RemovalEvent(0, "ln_1_qk", 0))
    block.ln_1.eval()
    w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: (C, 3C)
    ln_w, ln_b = block.ln_1.weight, block.ln_1.bias
    with torch.no_grad():
        out = block.attn.c_attn(block.ln_1(x))
        qk = plain_fake(x, ln_w, ln_b, s) @ w[:, :64] + b[:64]
        v = plain_ln(x, ln_w, ln_b, 1e-5) @ w[:, 64:] + b[64:]
    torch.testing.assert_close(out, torch.cat([qk, v], -1))
    apply_removal_event(fake, RemovalEvent(0, "ln_1_v", 0))
    with torch.no_grad():
        out = block.attn.c_attn(block.ln_1(x))
    torch.testing.assert_close(out, plain_fake(x, ln_w, ln_b, s) @ w + b)


def _fully_fake(model: nn.Module) -> nn.Module:
    fake = to_fake_layernorm(model, inplace=False).model
    fake.train()(torch.randint(0, 256, (4, 16)))  # std estimates
    for e in removal_schedule(len(fake.transformer.h)):
        apply_removal_event(fake, e)
    return fake.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_export_is_exact_and_a_stock_gpt2(dtype, tol, tmp_path):
    fake = _fully_fake(tiny_gpt2(dtype=dtype))
    vanilla = export_layernorm_free(fake)
    assert not any(isinstance(m, FakeLayerNorm) for m in vanilla.modules())
    assert vanilla.config.layer_norm_epsilon == 1e12 and vanilla.transformer.h[0].ln_2.eps == 1e12
    s = float(fake.transformer.h[0].ln_2.std)
    torch.testing.assert_close(vanilla.transformer.h[0].ln_2.weight, fake.transformer.h[0].ln_2.weight * 1e6 / s)
    ids = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        a, b = fake(ids).logits, vanilla.eval()(ids).logits
    assert (a - b).abs().max() <= tol * a.abs().max()
    vanilla.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=dtype).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, b)


def test_bad_input_is_refused():
    model = tiny_gpt2()
    with pytest.raises(TypeError, match="GPT-2-structured models"):
        to_fake_layernorm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    with pytest.raises(TypeError, match="call to_fake_layernorm first"):
        export_layernorm_free(model)
    fake = to_fake_layernorm(model, inplace=False).model
    with pytest.raises(ValueError, match="still real or special: ln_1.0"):
        export_layernorm_free(fake)
    with pytest.raises(RuntimeError, match="saw no training forward"):
        ln = FakeLayerNorm(4)
        ln.set_fake()
        ln(torch.randn(2, 4))
    with pytest.raises(ValueError, match="give steps > 34"):
        remove_layernorm(model, iter(()), steps=30)
    with pytest.raises(ValueError, match="needs a layer in \\[0, 2\\)"):
        apply_removal_event(fake, RemovalEvent(0, "ln_2", 5))
    with pytest.raises(TypeError, match="normalized_shape must be an int"):
        FakeLayerNorm((4, 4))


def test_tiny_end_to_end_on_the_text_corpus():
    from normkit.data.text import lm_batches, load_text

    corpus = load_text()
    model = tiny_gpt2(seed=3)
    val = list(lm_batches(corpus, 8, 32, split="val", shuffle=False, num_batches=4))
    before = lm_loss(model, val)
    finetune_lm(model, lm_batches(corpus, 8, 32, seed=0), steps=40, lr=3e-3, min_lr=1e-3, warmup_steps=5)
    trained = lm_loss(model, val)
    assert trained < before - 1.0  # it learnt something (uniform over 256 bytes is 5.55)
    sched = removal_schedule(2, start=2, gap_ln2=1, gap_ln1qk=1, gap_ln1v=1)
    original = copy.deepcopy(model.state_dict())
    res = remove_layernorm(model, lm_batches(corpus, 8, 32, seed=1), steps=15, schedule=sched, lr=1e-3, warmup_steps=2)
    assert torch.equal(model.state_dict()["lm_head.weight"], original["lm_head.weight"])  # inplace=False
    assert all(m.fully_fake for m in res.model.modules() if isinstance(m, FakeLayerNorm))
    removed = lm_loss(res.model, val)
    exported = lm_loss(export_layernorm_free(res.model), val)
    assert removed < trained + 0.5 and abs(exported - removed) < 1e-4
