"""A resumable stream of dataset rows: seeded shuffles per epoch, a position to save.

Every process computes the same global sequence of rows (it depends only on the
seed, the epoch and the dataset), so a step's global batch is identical whatever the
number of processes; each process then takes its own slice. The state is a single
integer, the number of rows consumed, which a checkpoint stores.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RowStream:
    def __init__(self, dataset, *, seed: int, shuffle: bool = True, name: str = "train"):
        if len(dataset) == 0:
            raise ValueError(f"the {name} dataset is empty: nothing to train on")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def indices(self, count: int) -> list[int]:
        """The next ``count`` dataset indices (crossing epochs), advancing the position."""
        n = len(self.dataset)
        orders: dict[int, np.ndarray] = {}
        out = []
        for pos in range(self.position, self.position + count):
            epoch, offset = divmod(pos, n)
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            out.append(int(orders[epoch][offset]))
        self.position += count
        return out

    def next_rows(self, count: int) -> list[dict[str, Any]]:
        return [self.dataset[i] for i in self.indices(count)]

    @property
    def epoch(self) -> float:
        return self.position / len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's contiguous share of a global list (sizes differ by at most one)."""
    per, extra = divmod(len(items), world_size)
    start = rank * per + min(rank, extra)
    return items[start : start + per + (1 if rank < extra else 0)]
