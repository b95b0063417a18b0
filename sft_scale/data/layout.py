"""`data.packing: auto` once the data is tokenized: packed rows, unless padded batches would
barely pad.

Packing removes pad slots; its price is attention run per example (training/attention.py: on
CPU one causal SDPA call per example and layer, the slices' gradients summed back into the row;
on GPU a scatter into per-example rows and a gather back). A padded micro-batch without a single
pad slot needs no attention mask, so transformers runs one batched causal SDPA for the whole
micro-batch: nothing is left for packing to save, and its price is all that remains. With a few pad
slots the padded batches carry a mask again, and pay for it. Measured (docs/PACKING.md,
`python -m bench.packing_layout`, two runs, tokens per CPU-second): at 100% padding efficiency
packed rows ran at 0.92-0.98x padded batches, at 99.1% at 0.93-1.00x, at 92.6% at 1.03-1.08x
(packing ahead, and further ahead below). So auto pads where the length-grouped padded batches
of this run, taken from the sampler itself over the tokenized lengths, would be at least 99%
real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from sft_scale.data.sampler import GlobalBatchSampler

# Padding efficiency (real tokens / slots) of the padded batches from which auto pads instead of
# packing (docs/PACKING.md): padded batches were as fast or faster at 99.1% and 100% in both
# runs, packed rows faster at 92.6%; the crossing lies in between, and below 99% packing's lower
# memory (no pad slots, no mask) tips an even race.
PADDED_FROM = 0.99
# Global batches the estimate walks: the first windows of length grouping are like the rest.
ESTIMATE_STEPS = 256


def padded_efficiency(lengths: Sequence[int], micro: int, accum: int = 1, world: int = 1,
                      seed: int = 0, grouped: bool = True) -> float:
    """Real tokens / computed slots of the padded micro-batches this run would train (the
    sampler's batches, length-grouped when `grouped`), over the first ESTIMATE_STEPS steps."""
    lengths = list(lengths)
    sampler = GlobalBatchSampler(len(lengths), micro, accum, world, 0, seed,
                                 lengths=lengths if grouped else None)
    steps = min(ESTIMATE_STEPS, max(1, -(-len(lengths) // sampler.global_batch)))
    real = slots = 0
    for step in range(steps):
        batch = sampler.global_batch_indices(step)
        for k in range(0, len(batch), micro):
            mb = [lengths[i] for i in batch[k:k + micro]]
            real, slots = real + sum(mb), slots + len(mb) * max(mb)
    return real / max(slots, 1)


def choose_layout(lengths: Sequence[int], micro: int, accum: int = 1, world: int = 1,
                  seed: int = 0, grouped: bool = True) -> tuple[bool, str]:
    """(pack?, why) for `data.packing: auto` where packing is possible (resolve_packing said
    on): pad when the padded batches would be at least PADDED_FROM real tokens, pack otherwise."""
    eff = padded_efficiency(lengths, micro, accum, world, seed, grouped)
    if eff >= PADDED_FROM:
        return False, (f"auto: off, the data pads only {1 - eff:.1%} (padded batches "
                       f"{eff:.1%} real tokens, >= {PADDED_FROM:.1%}): attention per "
                       "example would cost as much as the padding it saves, or more "
                       "(docs/PACKING.md)")
    return True, (f"auto: on, padding-free rows with attention per example (padded batches "
                  f"would be {eff:.1%} real tokens)")
