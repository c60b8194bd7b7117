"""Split-Digits and an online class-incremental training loop with experience replay.

Split-Digits cuts scikit-learn's digits (:func:`normkit.data.load_digits`, the bench's
fixed 80/20 split) into 5 tasks of 2 classes ({0, 1}, {2, 3}, …). The loop follows the online
setting of the AdaB²N paper (mammoth framework): each task's stream is seen once in small
batches (10), every incoming batch is concatenated with a batch drawn from a reservoir
buffer, plain SGD, and evaluation is class-incremental (argmax over all classes seen or not,
no task id at test time). It works with any classifier; AdaB²N layers in the model are
detected and driven (task labels before each forward, the regulariser, ``end_task``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit.continual.replay import ReservoirBuffer
from normkit.data import DataSplit, load_digits
from normkit.nn.adab2n import adab2n_layers, adab2n_regularizer, end_task, set_task_ids, set_task_labels

Strategy = Literal["er", "er_ace"]


@dataclass(frozen=True)
class TaskData:
    """One task of a class-incremental split; labels are already global class indices."""

    task: int
    classes: tuple[int, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_split_digits(
    num_tasks: int = 5,
    classes_per_task: int = 2,
    *,
    class_order: Sequence[int] | None = None,
    data: DataSplit | None = None,
) -> list[TaskData]:
    """Split a 10-class data set (default: the bench's digits) into class-incremental tasks.

    Task t holds the classes ``class_order[t·k : (t+1)·k]`` (k = ``classes_per_task``; natural
    order by default). Labels are relabelled to their position in ``class_order`` so that
    ``label // classes_per_task`` is the task id, as AdaB²N's task counts assume.
    """
    data = data if data is not None else load_digits()
    order = list(range(data.num_classes)) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != list(range(data.num_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{data.num_classes - 1}, got {list(class_order or [])}")
    if num_tasks < 1 or classes_per_task < 1 or num_tasks * classes_per_task > data.num_classes:
        raise ValueError(f"split_digits: {num_tasks} tasks x {classes_per_task} classes need at most {data.num_classes} classes")
    relabel = torch.empty(data.num_classes, dtype=torch.long)
    relabel[torch.tensor(order)] = torch.arange(data.num_classes)
    y_train, y_test = relabel[data.y_train], relabel[data.y_test]
    tasks = []
    for t in range(num_tasks):
        lo, hi = t * classes_per_task, (t + 1) * classes_per_task
        tr = (y_train >= lo) & (y_train < hi)
        te = (y_test >= lo) & (y_test < hi)
        tasks.append(TaskData(t, tuple(range(lo, hi)), data.x_train[tr], y_train[tr], data.x_test[te], y_test[te]))
    return tasks


@dataclass
class ContinualResult:
    """Outcome of :func:`train_online`.

    ``acc_matrix[i][j]`` is the accuracy on task j's test set after training on tasks 0..i
    (j ≤ i). ``final_accs = acc_matrix[-1]``; ``avg_acc`` is their mean (final average accuracy);
    ``forgetting`` is the mean over the first T−1 tasks of (best earlier accuracy − final accuracy).
    """

    acc_matrix: list[list[float]]
    steps: int
    train_loss: float
    train_time_s: float
    ms_per_step: float
    losses: list[float] = field(default_factory=list, repr=False)

    @property
    def final_accs(self) -> list[float]:
        return self.acc_matrix[-1]

    @property
    def avg_acc(self) -> float:
        return statistics.fmean(self.final_accs)

    @property
    def forgetting(self) -> float:
        t = len(self.acc_matrix)
        if t < 2:
            return 0.0
        return statistics.fmean(
            max(self.acc_matrix[i][j] for i in range(j, t - 1)) - self.acc_matrix[-1][j] for j in range(t - 1)
        )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Class-incremental accuracy (argmax over all outputs) in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def _ace_mask(logits: Tensor, present: Tensor, seen_max: int, num_classes: int) -> Tensor:
    """ER-ACE's asymmetric mask (official ``er_ace_ada.py``): the incoming batch's logits keep the
    classes present in it plus every class from the largest seen so far on."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, present] = True
    if seen_max < num_classes - 1:
        mask[:, seen_max:] = True
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)


def train_online(
    model: nn.Module,
    tasks: Sequence[TaskData],
    *,
    batch_size: int = 10,
    replay_batch_size: int = 10,
    buffer_size: int = 100,
    lr: float = 0.1,
    strategy: Strategy = "er",
    lambd: float = 1.0,
    ada_t0: int = 0,
    passes: int = 1,
    stream_fraction: float = 1.0,
    seed: int = 0,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> ContinualResult:
    """Train ``model`` on ``tasks`` in order, online, with experience replay; evaluate after each task.

    Per step (``passes`` = 1: every training example is seen once, in a random order per task):

    * ``strategy="er"`` (mammoth ``er.py``): the incoming batch is concatenated with
      ``replay_batch_size`` examples from a :class:`ReservoirBuffer` of ``buffer_size`` (once it
      is non-empty) and the loss is the cross-entropy over the concatenation.
    * ``strategy="er_ace"`` (official ``er_ace_ada.py``): replay from the second task on; loss =
      CE of the incoming batch with ER-ACE's asymmetric logit mask + CE of the replay batch.
    * With AdaB²N layers in the model: before each forward the labels of the whole batch set the
      layers' task ids (:func:`set_task_labels`); on replay steps from task ``ada_t0`` on the loss
      gets ``lambd · adab2n_regularizer(model)``; after each task :func:`end_task`. (The official
      loops add the regulariser on their replay steps only; ``ada_t0`` ∈ {0, 1}, λ ∈ {0.01, …, 10}.)
    * Then the incoming batch (not the replayed one) is offered to the buffer.

    The optimizer defaults to plain SGD at ``lr`` (the official setting); build the model (and
    convert it with :func:`convert_adab2n`) before calling. ``stream_fraction`` < 1 trains on that
    fraction of each task's stream (for smoke tests). Reproducible given ``seed`` and the
    model's initial weights (the stream order and the buffer use their own generator).
    """
    if strategy not in ("er", "er_ace"):
        raise ValueError(f"strategy must be 'er' or 'er_ace', got {strategy!r}")
    if batch_size < 1 or replay_batch_size < 0 or passes < 1 or not 0.0 < stream_fraction <= 1.0:
        raise ValueError(
            f"train_online: need batch_size >= 1, replay_batch_size >= 0, passes >= 1 and 0 < stream_fraction <= 1, got "
            f"{batch_size}, {replay_batch_size}, {passes}, {stream_fraction}"
        )
    if not tasks:
        raise ValueError("train_online: no tasks")
    classes_per_task = len(tasks[0].classes)
    num_classes = sum(len(t.classes) for t in tasks)
    ada = next(adab2n_layers(model), None) is not None
    gen = torch.Generator().manual_seed(seed)
    buffer = ReservoirBuffer(buffer_size, generator=gen)
    opt = optimizer(model) if optimizer is not None else torch.optim.SGD(model.parameters(), lr=lr)
    seen = torch.zeros(num_classes, dtype=torch.bool)
    acc_matrix: list[list[float]] = []
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    t_first = None
    for k, task in enumerate(tasks):
        n = max(1, math.ceil(len(task.x_train) * stream_fraction))
        for _ in range(passes):
            perm = torch.randperm(len(task.x_train), generator=gen)[:n]
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                x, y = task.x_train[idx], task.y_train[idx]
                # ER replays as soon as the buffer holds something, ER-ACE from the second task on.
                replay = replay_batch_size > 0 and not buffer.is_empty() and (strategy == "er" or k > 0)
                if replay:
                    bx, by = buffer.sample(replay_batch_size)
                    xx, yy = torch.cat([x, bx]), torch.cat([y, by])
                else:
                    xx, yy = x, y
                if ada:
                    set_task_labels(model, yy, classes_per_task)
                out = model(xx)
                if strategy == "er_ace":  # ER-ACE's logit mask needs the classes seen so far
                    present = y.unique()
                    seen[present] = True
                if strategy == "er_ace" and replay:
                    seen_max = int(seen.nonzero().max())
                    logits = _ace_mask(out[: len(y)], present, seen_max, num_classes)
                    loss = F.cross_entropy(logits, y) + F.cross_entropy(out[len(y) :], by)
                else:
                    loss = F.cross_entropy(out, yy)
                if ada and replay and k >= ada_t0:
                    loss = loss + lambd * adab2n_regularizer(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                buffer.add(x, y)
                value = float(loss.detach())
                losses.append(value)
                if t_first is None:
                    t_first = time.perf_counter()
                if on_step is not None:
                    on_step(1)
                if not math.isfinite(value):
                    raise FloatingPointError(f"non-finite loss at step {len(losses)} (task {k})")
        if ada:
            end_task(model)
            set_task_ids(model, None)  # no stale ids (of the last batch's size) left on the layers
        acc_matrix.append([accuracy(model, t.x_test, t.y_test) for t in tasks[: k + 1]])
    t1 = time.perf_counter()
    steps = len(losses)
    tail = losses[-max(1, steps // 10) :]
    ms = (t1 - t_first) / (steps - 1) * 1e3 if steps > 1 and t_first is not None else (t1 - t0) * 1e3
    return ContinualResult(acc_matrix, steps, statistics.fmean(tail), t1 - t0, ms, losses)
