"""An infinite, rank-sharded batch sampler that follows the training schedule.

Each batch carries its resolution, ``(index, resolution, flip)`` per item, so the schedule
changes resolution and batch size exactly when it says, prefetching workers never serve a
stale resolution, and no DataLoader worker is respawned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

Plan = Callable[[int], tuple[int, int]]  # images seen (global) -> (resolution, global batch)


class ScheduledBatchSampler(Sampler):
    """Yields, forever, one list of ``global_batch // world_size`` ``(index, resolution, flip)``
    per step for this rank, then advances the global image counter by ``global_batch``.

    The rank's k-th index: epoch ``e = k // shard_len`` permutes ``range(num_items)`` with seed
    ``(seed, e)``; rank ``r`` takes ``perm[r::world_size][:shard_len]``, ``shard_len =
    num_items // world_size``. Its flip is drawn from ``(seed, e, rank)`` (p = 0.5). The first
    k is ``start_images // world_size``, so a resumed run continues the exact stream.
    """

    def __init__(self, num_items: int, plan: Plan, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_images: int = 0, flip: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if num_items < world_size:
            raise ValueError(f"{num_items} items cannot be shared by {world_size} ranks")
        self.num_items, self.plan, self.rank, self.world_size = num_items, plan, rank, world_size
        self.seed, self.start_images, self.flip = seed, start_images, flip
        self.shard_len = num_items // world_size

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch`` (int64, length ``shard_len``)."""
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_items)
        return perm[self.rank::self.world_size][: self.shard_len]

    def flips(self, epoch: int) -> np.ndarray:
        """This rank's flips for ``epoch`` (bool, length ``shard_len``)."""
        if not self.flip:
            return np.zeros(self.shard_len, dtype=bool)
        return np.random.default_rng((self.seed, epoch, self.rank, 1)).random(self.shard_len) < 0.5

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        images = self.start_images
        k = images // self.world_size
        epoch, idx, flp = -1, None, None
        while True:
            resolution, global_batch = self.plan(images)
            local = global_batch // self.world_size
            if local <= 0:
                raise ValueError(f"global batch {global_batch} smaller than world_size {self.world_size}")
            batch = []
            for kk in range(k, k + local):
                e, j = divmod(kk, self.shard_len)
                if e != epoch:
                    epoch, idx, flp = e, self.shard(e), self.flips(e)
                batch.append((int(idx[j]), int(resolution), bool(flp[j])))
            yield batch
            k += local
            images += global_batch
