"""A reservoir-sampling replay buffer for experience replay (as mammoth's ``utils/buffer.py``)."""

from __future__ import annotations

import torch
from torch import Tensor


class ReservoirBuffer:
    """Fixed-capacity memory of past ``(x, y)`` examples filled by reservoir sampling.

    Vitter's algorithm R, as mammoth's ``reservoir()`` (used by the AdaB²N code): the first
    ``capacity`` examples fill the buffer; the n-th example after that (``n`` = number seen
    before it) replaces slot ``r ~ U{0, …, n}`` if ``r < capacity`` and is dropped otherwise.
    After a stream of N ≥ capacity examples, every example is in the buffer with probability
    ``capacity / N``, whatever its position in the stream. :meth:`sample` draws a minibatch
    without replacement (``min(size, len(self))`` examples), like mammoth's ``get_data``.

    Randomness comes from ``generator`` (a ``torch.Generator``), so a run is reproducible and
    does not disturb the global RNG.
    """

    def __init__(self, capacity: int, *, generator: torch.Generator | None = None) -> None:
        if not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"ReservoirBuffer: capacity must be a non-negative int, got {capacity!r}")
        self.capacity = capacity
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.num_seen = 0
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def is_empty(self) -> bool:
        return len(self) == 0

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def add(self, x: Tensor, y: Tensor) -> None:
        """Offer each example of the batch ``x`` ``(B, *)``, ``y`` ``(B,)`` to the reservoir."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"ReservoirBuffer.add: x and y must have the same batch size, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.capacity == 0:
            self.num_seen += x.shape[0]
            return
        if self.x is None:
            self.x = x.new_empty((self.capacity, *x.shape[1:]))
            self.y = y.new_empty((self.capacity, *y.shape[1:]))
        elif x.shape[1:] != self.x.shape[1:]:
            raise ValueError(
                f"ReservoirBuffer.add: examples of shape {tuple(x.shape[1:])}, buffer holds {tuple(self.x.shape[1:])}"
            )
        for i in range(x.shape[0]):
            slot = self.num_seen if self.num_seen < self.capacity else self._randint(self.num_seen + 1)
            if slot < self.capacity:
                self.x[slot] = x[i]
                self.y[slot] = y[i]
            self.num_seen += 1

    def sample(self, size: int) -> tuple[Tensor, Tensor]:
        """``min(size, len(self))`` distinct stored examples, uniformly at random."""
        if self.x is None or self.is_empty():
            raise ValueError("ReservoirBuffer.sample: the buffer is empty")
        idx = torch.randperm(len(self), generator=self.generator)[: min(size, len(self))]
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, object]:
        """Contents and counters (for checkpointing a continual run)."""
        return {"capacity": self.capacity, "num_seen": self.num_seen, "x": self.x, "y": self.y, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.capacity = int(state["capacity"])
        self.num_seen = int(state["num_seen"])
        self.x, self.y = state["x"], state["y"]
        self.generator.set_state(state["rng"])
