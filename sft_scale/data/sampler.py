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

    GROUP_STEPS = 32  # length grouping sorts within windows of this many global batches

    def __init__(self, n_examples: int, micro: int, accum: int, world: int, rank: int, seed: int,
                 lengths: list[int] | None = None):
        if n_examples < 1:
            raise ValueError("no examples to sample from")
        self.n, self.micro, self.accum = n_examples, micro, accum
        self.world, self.rank = world, rank
        self.seed = seed
        self.lengths = lengths  # given: batch examples of similar length together
        self._perms: dict[int, list[int]] = {}
        self._window: tuple[int, list[list[int]]] | None = None

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

    def global_batch_indices(self, step: int) -> list[int]:
        G = self.global_batch
        if self.lengths is None:
            return [self._index(p) for p in range(step * G, (step + 1) * G)]
        # Length grouping: sort a window of global batches by length, then shuffle the order of
        # the batches inside it, so batches are homogeneous but their order stays random.
        # Windows never cross an epoch: a window holding the same example twice (from two
        # epochs, or many times when the data is smaller than a window) would sort the copies
        # side by side into one batch. The few positions of the epoch's last step that fall into
        # the next epoch stay unsorted at the end of the window.
        e = step * G // self.n
        s0, s1 = -(-e * self.n // G), -(-(e + 1) * self.n // G)  # steps starting in epoch e
        w = (step - s0) // self.GROUP_STEPS
        if self._window is None or self._window[0] != (e, w):
            first = s0 + w * self.GROUP_STEPS
            last = min(first + self.GROUP_STEPS, s1)
            end = (e + 1) * self.n
            inside = [self._index(p) for p in range(first * G, min(last * G, end))]
            spill = [self._index(p) for p in range(end, max(end, last * G))]
            inside.sort(key=lambda i: -self.lengths[i])
            idx = inside + spill
            batches = [idx[j * G:(j + 1) * G] for j in range(last - first)]
            random.Random(self.seed * 7_919 + e * 100_003 + w).shuffle(batches)
            self._window = ((e, w), first, batches)
        return self._window[2][step - self._window[1]]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's `accum` micro-batches (lists of example indices) for optimizer step
        `step`."""
        batch = self.global_batch_indices(step)
        out = []
        for m in range(self.accum):
            k = m * self.world + self.rank
            out.append(batch[k * self.micro:(k + 1) * self.micro])
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.n
