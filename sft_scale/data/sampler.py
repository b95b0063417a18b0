"""Which examples each rank trains on at each optimizer step.

We lay out batches ourselves instead of letting `accelerator.prepare(dataloader)` shard them
(deliberately: Accelerate's sharding is fine, but) the position in the data must be a pure
function of the global step for exact resume, and the same global batch must be split the same way
whether it runs as 2 ranks x 1 micro-batch or 1 rank x 2 micro-batches.
"""

from __future__ import annotations

import random


class GlobalBatchSampler:
    """An endless stream of seeded per-epoch permutations, cut into global batches.

    Global batch g holds stream positions [g*G, (g+1)*G) with G = micro * accum * world. Its k-th
    micro-batch of size `micro` (k = 0 .. accum*world-1) goes to rank k % world as that rank's
    micro-step k // world, so ranks see disjoint examples.
    """

    def __init__(self, n_examples: int, micro: int, accum: int, world: int, rank: int, seed: int):
        if n_examples < 1:
            raise ValueError("no examples to sample from")
        self.n, self.micro, self.accum, self.world, self.rank = n_examples, micro, accum, world, rank
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _index(self, pos: int) -> int:
        epoch, off = divmod(pos, self.n)
        if epoch not in self._perms:
            perm = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms = {epoch: perm}  # keep one epoch: memory stays O(n)
        return self._perms[epoch][off]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's `accum` micro-batches (lists of example indices) for optimizer step `step`."""
        start = step * self.global_batch
        out = []
        for m in range(self.accum):
            k = m * self.world + self.rank
            s = start + k * self.micro
            out.append([self._index(p) for p in range(s, s + self.micro)])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.n
