"""Synchronized statistics over torch.distributed (gloo, CPU, float64): every batch-dependent layer on k
ranks equals the single-process layer on the concatenated batch — forward, input gradient, parameter
gradients summed over ranks and running buffers after several steps — with equal and uneven batches, a
rank with no samples and per-rank masks; eval never communicates; a 20-step DDP run equals
single-process training. Each world size spawns its processes once (``distributed_cases.worker``)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import distributed_cases  # noqa: E402

TOL = 1e-10
OFFSET_TOL = 1e-8  # relative to the values' scale (1e6 for the inputs and running means)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, out: Path) -> list[dict[str, float]]:
    mp.spawn(fn, args=(world, _port(), str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def results(request, tmp_path_factory) -> tuple[int, list[dict[str, float]]]:
    world = request.param
    return world, _spawn(distributed_cases.worker, world, tmp_path_factory.mktemp(f"dist{world}"))


def test_every_layer_equals_single_process_on_the_concatenated_batch(results):
    world, per_rank = results
    names = [n for n, _, _ in distributed_cases.cases()]
    checked = 0
    for r, res in enumerate(per_rank):
        for name in names:
            for split in distributed_cases.SPLITS[world]:
                for what in ("forward", "input_grad", "param_grad", "buffers"):
                    err = res[f"{name}/{split}/{what}"]
                    assert err <= TOL, f"rank {r}/{world}, {name}, {split} batches: {what} differs by {err:.3g}"
                    checked += 1
    assert checked == world * len(names) * 3 * 4
    worst = {w: max(res[k] for res in per_rank for k in res if k.endswith("/" + w) and "/offset/" not in k)
             for w in ("forward", "input_grad", "param_grad", "buffers")}
    print(f"\n{world} ranks, {len(names)} layers x 3 splits, largest differences: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def _offset_errors(per_rank: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    return {name: max(res[f"{name}/offset/{w}"] for res in per_rank for w in ("forward", "input_grad", "param_grad",
                                                                             "buffers")) for name in names}


def test_no_cancellation_at_a_large_offset(results):
    """x = 1e6 + noise (float64): raw sums about 0 lose ~12 digits (E[x²] − E[x]²) and fail by ~1e-4; the
    shifted sums lose none (relative differences ~1e-10, the rounding of x − μ itself)."""
    world, per_rank = results
    names = [n for n, _, _ in distributed_cases.cases()]
    worst = _offset_errors(per_rank, names)
    print(f"\n{world} ranks, offset 1e6, largest relative difference per layer: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    bad = {k: v for k, v in worst.items() if not v <= OFFSET_TOL}
    assert not bad, f"relative differences at offset 1e6 above {OFFSET_TOL}: {bad}"


def test_eval_never_communicates_and_training_is_one_collective(results):
    world, per_rank = results
    for res in per_rank:
        assert res["eval_collectives"] == 0
        assert res["train_collectives_per_bn_call"] == 1
        assert res["world_sum"] == world


def test_ddp_training_equals_single_process(results):
    _, per_rank = results
    for res in per_rank:
        assert res["ddp_params"] <= TOL and res["ddp_buffers"] <= TOL, res


def test_test_time_adaptation_uses_the_whole_distributed_batch(results):
    _, per_rank = results
    for res in per_rank:
        for method in ("tbn", "alpha_bn", "ema_bn", "robust_bn"):
            assert res[f"tta/{method}"] <= 1e-5, (method, res[f"tta/{method}"])  # float32 model
            assert res[f"tta/{method}/vs_local"] > 1e-4, method  # per-rank statistics would differ


def test_buffer_utilities(results):
    _, per_rank = results
    for res in per_rank:
        for key in ("avg/mean", "avg/var", "avg/counter", "avg/phi", "bcast"):
            assert res[key] <= TOL, (key, res[key])


@pytest.mark.slow
def test_compiled_fullgraph_equals_eager(tmp_path):
    for res in _spawn(distributed_cases.worker_compile, 2, tmp_path):
        for key in ("compile/forward", "compile/input_grad", "compile/buffers"):
            assert res[key] <= OFFSET_TOL, (key, res[key])
        # one recompile once the first synchronized mean is kept; all_reduce nodes (forward + backward):
        # first call 2 + 1 (exact two-pass start), then 1 + 1 per call
        assert res["compile/graphs"] == 2, res
        assert (res["compile/first_collectives"], res["compile/steady_collectives"]) == (3, 2), res


def test_without_a_process_group_training_raises_a_clear_error():
    import normkit as nk

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    bn = nk.BatchNorm2d(3, process_group="world")
    with pytest.raises(ValueError, match="init_process_group"):
        bn(torch.randn(2, 3, 4, 4))
    bn.eval()
    assert bn(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)  # eval never needs the group
    with pytest.raises(TypeError, match="ProcessGroup, 'world' or None"):
        nk.PowerNorm(4, process_group=3)
    with pytest.raises(TypeError, match="ProcessGroup, 'world' or None"):
        nk.BatchNorm2d(4, process_group="everyone")


class _CountingSum:
    """A one-process stand-in for a layer's reducer: identity sum, counts its calls, carries a ShiftMemory."""

    def __init__(self, memory) -> None:
        self.memory, self._slot, self.calls = memory, 0, 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return t.clone()

    def next_slot(self) -> int:
        self._slot += 1
        return self._slot - 1


def test_synced_sums_shift_memory_and_gram_against_plain_formulas():
    """stats.synced_sums: first call = exact two-pass start (2 reductions), then 1; the kept shift is the last
    mean; moments and GDWCT's cross products equal torch's var / cov at offset 1e6; NaN means are not kept."""
    from normkit.stats import SumSpec, moments_from_sums, synced_sums
    from normkit.sync import ShiftMemory

    g = torch.Generator().manual_seed(0)
    memory = ShiftMemory()
    for step in range(3):
        x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64) + 1e6
        v = torch.randn(3, 2, 2, 7, generator=g, dtype=torch.float64) * 2 + 1e6  # (N, G, n, L)
        red = _CountingSum(memory)
        a, b = synced_sums([SumSpec(x, (0, 2)), SumSpec(v, (0, 3), gram=True)], red)
        assert red.calls == (2 if step == 0 else 1)
        r = moments_from_sums(a)
        torch.testing.assert_close(r.mean.reshape(-1), x.mean((0, 2)), rtol=0, atol=1e-9)
        torch.testing.assert_close(r.var.reshape(-1), x.permute(1, 0, 2).reshape(4, -1).var(1, correction=0),
                                   rtol=1e-10, atol=0)
        n = b.count.reshape(())
        d = (b.s1 / n).reshape(2, 2, 1)
        cov = (b.s2 - n * d @ d.transpose(-1, -2)) / (n - 1)
        for grp in range(2):
            want = torch.cov(v[:, grp].permute(1, 0, 2).reshape(2, -1))  # (n, M), unbiased
            torch.testing.assert_close(cov[grp], want, rtol=1e-9, atol=0)
        torch.testing.assert_close(memory.means[0].reshape(-1), x.mean((0, 2)), rtol=0, atol=1e-9)
    # a NaN batch: its mean is not kept (the previous shift stays), later calls are unaffected
    kept = memory.means[0].clone()
    nan_x = torch.full((2, 4, 3), float("nan"), dtype=torch.float64)
    synced_sums([SumSpec(nan_x, (0, 2))], _CountingSum(memory))
    assert torch.equal(memory.means[0], kept)
