"""Split-Digits, the reservoir buffer, the online replay loop and the ``continual`` bench suite."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from normkit.bench import SUITES, Job, register_suite, run
from normkit.bench.models import SmallCNN
from normkit.bench.suites_continual import _continual_claims
from normkit.continual.replay import ReservoirBuffer
from normkit.continual.split_digits import load_split_digits, train_online
from normkit.nn.adab2n import AdaB2N, convert_adab2n


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny CNNs on 8x8 images: one thread is fastest and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- data


def test_split_digits_tasks_and_labels():
    tasks = load_split_digits()
    assert len(tasks) == 5 and [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.x_train) for t in tasks) == 1438 and sum(len(t.x_test) for t in tasks) == 359
    for t in tasks:
        assert set((t.y_train // 2).tolist()) == {t.task} and set(t.y_test.tolist()) == set(t.classes)
        assert t.x_train.shape[1:] == (1, 8, 8)
    # a class order relabels so that label // classes_per_task is still the task id
    order = [3, 7, 0, 9, 1, 2, 4, 5, 6, 8]
    re_tasks = load_split_digits(class_order=order)
    assert len(re_tasks[0].y_train) == len(tasks[1].y_train[tasks[1].y_train == 3]) + len(tasks[3].y_train[tasks[3].y_train == 7])
    with pytest.raises(ValueError, match="permutation"):
        load_split_digits(class_order=[0, 0, 1])
    with pytest.raises(ValueError, match="at most 10 classes"):
        load_split_digits(6, 2)


# --------------------------------------------------------------------------- reservoir buffer


def test_reservoir_fills_then_keeps_capacity():
    buf = ReservoirBuffer(5, generator=torch.Generator().manual_seed(0))
    assert buf.is_empty()
    buf.add(torch.arange(3.0).reshape(3, 1), torch.arange(3))
    assert len(buf) == 3 and buf.y[:3].tolist() == [0, 1, 2]  # the first `capacity` examples fill in order
    buf.add(torch.arange(3.0, 40.0).reshape(-1, 1), torch.arange(3, 40))
    assert len(buf) == 5 and buf.num_seen == 40
    assert len(set(buf.y.tolist())) == 5 and all(0 <= v < 40 for v in buf.y.tolist())
    torch.testing.assert_close(buf.x[:, 0], buf.y.float())  # x and y stay paired
    x, y = buf.sample(3)
    assert len(set(y.tolist())) == 3 and set(y.tolist()) <= set(buf.y.tolist())
    assert len(buf.sample(10)[1]) == 5  # at most len(buffer), without replacement
    with pytest.raises(ValueError, match="empty"):
        ReservoirBuffer(3).sample(1)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(-1)


def test_reservoir_keeps_every_stream_position_with_equal_probability():
    """Reservoir property: after N examples each is stored with probability capacity / N."""
    n, capacity, trials = 30, 6, 1500
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(n)
    stream = torch.arange(n)
    for _ in range(trials):
        buf = ReservoirBuffer(capacity, generator=gen)
        for i in range(0, n, 4):  # batches of 4 (the last is partial)
            buf.add(stream[i : i + 4].float().reshape(-1, 1), stream[i : i + 4])
        hits[buf.y] += 1
    freq = hits / trials
    sd = math.sqrt(0.2 * 0.8 / trials)
    assert (freq - capacity / n).abs().max() < 5 * sd, freq  # early and late positions alike
    assert abs(freq[:capacity].mean() - freq[-capacity:].mean()) < 4 * sd


def test_reservoir_state_round_trip():
    a = ReservoirBuffer(4, generator=torch.Generator().manual_seed(1))
    a.add(torch.randn(9, 2), torch.arange(9))
    b = ReservoirBuffer(4, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(a.state_dict())
    more = torch.randn(6, 2), torch.arange(9, 15)
    a.add(*more)
    b.add(*more)
    assert a.y.tolist() == b.y.tolist() and a.sample(3)[1].tolist() == b.sample(3)[1].tolist()


# --------------------------------------------------------------------------- online loop


TINY = 0.1  # fraction of each task's stream


def _model(ada: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = SmallCNN("batchnorm", width=4)
    return convert_adab2n(m, 5, 2, kappa=0.4) if ada else m


def test_train_online_accuracy_matrix_and_steps():
    tasks = load_split_digits()
    res = train_online(_model(False), tasks, stream_fraction=TINY, seed=0)
    assert [len(row) for row in res.acc_matrix] == [1, 2, 3, 4, 5]
    assert all(0.0 <= a <= 1.0 for row in res.acc_matrix for a in row)
    assert res.steps == sum(math.ceil(math.ceil(len(t.x_train) * TINY) / 10) for t in tasks)
    assert res.final_accs == res.acc_matrix[-1] and res.avg_acc == pytest.approx(sum(res.final_accs) / 5)
    assert res.forgetting == pytest.approx(
        sum(max(res.acc_matrix[i][j] for i in range(j, 4)) - res.acc_matrix[4][j] for j in range(4)) / 4
    )
    # reproducible from the seed and the initial weights
    again = train_online(_model(False), tasks, stream_fraction=TINY, seed=0)
    assert again.acc_matrix == res.acc_matrix and again.losses == res.losses
    with pytest.raises(ValueError, match="strategy"):
        train_online(_model(False), tasks, strategy="der")


def test_train_online_drives_adab2n_task_ids_and_task_counter():
    tasks = load_split_digits()
    model = _model(True)
    seen = []

    def hook(mod, args):
        if mod.training:
            seen.append((int(mod.cur_tasks), mod.task_ids.clone()))

    first = next(m for m in model.modules() if isinstance(m, AdaB2N))
    first.register_forward_pre_hook(hook)
    train_online(model, tasks, stream_fraction=TINY, seed=1, strategy="er")
    assert all(int(m.cur_tasks) == 5 for m in model.modules() if isinstance(m, AdaB2N))  # end_task after each task
    curs = [c for c, _ in seen]
    assert curs == sorted(curs) and set(curs) == {0, 1, 2, 3, 4}
    for cur, ids in seen:
        assert ids.max() <= cur and ids[0] == cur  # incoming samples come first: they are the current task
    assert any(len(ids) > 10 and ids[10:].min() < cur for cur, ids in seen)  # replayed old tasks


def test_regularizer_weight_changes_adab2n_training_only():
    tasks = load_split_digits()
    kw = dict(stream_fraction=TINY, seed=2, strategy="er_ace")
    a = train_online(_model(True), tasks, lambd=0.0, **kw)
    b = train_online(_model(True), tasks, lambd=5.0, **kw)
    assert a.losses[:3] == b.losses[:3]  # task 0 has no replay step in ER-ACE: no regulariser yet
    assert a.losses != b.losses
    c = train_online(_model(False), tasks, lambd=0.0, **kw)
    d = train_online(_model(False), tasks, lambd=5.0, **kw)
    assert c.losses == d.losses  # no AdaB2N layer: lambda is unused


# --------------------------------------------------------------------------- bench suite


def test_runner_uses_a_jobs_own_run_function(tmp_path):
    calls = []

    def custom(job, seed, *, scale, on_step):
        calls.append((job.norm, seed, scale))
        on_step(1)
        return {"test_acc": 0.5, "status": "ok", "error": "", "steps": 1, "train_loss": 0.1, "ms_per_step": 1.0,
                "train_time_s": 0.0, "params": 0, "extra_field": 7}  # fmt: skip

    name = "_test_custom_run"
    register_suite(name)(lambda cfg: [Job("t", "m", "batchnorm", lambda n: nn.Identity(), 8, 1.0, 0.1, run=custom)])
    try:
        rows = run(name, out_dir=tmp_path, progress=False, scale=0.5, threads=1, seeds=1, workers=1)
    finally:
        SUITES.pop(name, None)
    assert calls == [("batchnorm", 0, 0.5)]
    assert rows[0]["status"] == "ok" and rows[0]["test_acc"] == 0.5 and rows[0]["extra_field"] == 7


def test_continual_suite_tiny_run_prints_claims(tmp_path, capsys):
    rows = run("continual", out_dir=tmp_path, progress=False, scale=0.05, threads=1, workers=1)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert {(r["model"], r["norm"]) for r in rows} == {(f"cnn+{s}", n) for s in ("er", "er_ace") for n in ("batchnorm", "adab2n")}
    for r in rows:
        assert len(r["per_task_acc"]) == 5 and len(r["acc_replicates"]) == 1 and 0.0 <= r["test_acc"] <= 1.0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "Lyu et al. 2023 (AdaB2N" in line]
    assert len(lines) == 2 and all(re.search(r"\[(supported|contradicted|inconclusive)\]", line) for line in lines)


def _row(norm, strategy, accs, seeds):
    return {"status": "ok", "norm": norm, "strategy": strategy, "acc_replicates": accs, "replicate_seeds": seeds}


def test_claims_compare_paired_seeds():
    # paired differences: ER-ACE +5, +6, +4, +5, +5 pt (interval excludes 0 above); ER −4, −5, −3, −4 pt
    results = [
        _row("batchnorm", "er_ace", [0.60, 0.70, 0.65, 0.62, 0.68], [0, 1, 2, 3, 4]),
        _row("adab2n", "er_ace", [0.65, 0.76, 0.69, 0.67, 0.73], [0, 1, 2, 3, 4]),
        _row("batchnorm", "er", [0.70, 0.72, 0.68, 0.71], [0, 1, 2, 3]),
        _row("adab2n", "er", [0.66, 0.67, 0.65, 0.67], [0, 1, 2, 3]),
        _row("adab2n", "er", [0.99], [9]),  # a seed without its BN partner is not paired
    ]
    ace, er = _continual_claims(results)
    assert ace.startswith("[supported] Lyu et al. 2023 (AdaB2N") and "BN 65.0% vs AdaB2N 70.0%" in ace, ace
    assert "5 seeds" in ace, ace
    assert er.startswith("[contradicted]") and "4 seeds" in er, er
    assert _continual_claims([r for r in results if r["norm"] == "batchnorm"]) == []
