"""Collated micro-batches per optimizer step, optionally made ahead in DataLoader workers.

Item k of `StepBatches` is everything the loop needs for optimizer step `start + k` on this rank:
the collated micro-batches and their counts. It is a pure function of (step, rank) through
`GlobalBatchSampler`, so a worker process builds exactly the batch the main process would have
built (exact resume and rank layout are unchanged by `data.num_workers`), and a resumed run
simply starts at its step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sft_scale.data.collate import padding_stats
from sft_scale.data.sampler import GlobalBatchSampler


def fetch_rows(dataset, indices: list[int]) -> list[dict]:
    """Rows of a datasets.Dataset (or a list of dicts) in `indices` order: one Arrow read for the
    whole micro-batch instead of one per row (4-6x cheaper for short rows)."""
    if not indices:
        return []
    if isinstance(dataset, list):
        return [dataset[i] for i in indices]
    batch = dataset[list(indices)]
    names = list(batch)
    return [dict(zip(names, values, strict=True))
            for values in zip(*(batch[n] for n in names), strict=True)]


class StepBatches(torch.utils.data.Dataset):
    def __init__(self, dataset, sampler: GlobalBatchSampler, collate: Callable, count: Callable,
                 pad_token_id: int, start: int, stop: int, columns: list[str] | None = None):
        if columns and hasattr(dataset, "select_columns"):
            # only what collation reads (once: select_columns makes a new Dataset object)
            dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
        self.dataset, self.sampler, self.collate, self.count = dataset, sampler, collate, count
        self.pad_token_id, self.start, self.stop = pad_token_id, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, k: int) -> dict:
        step = self.start + k
        micro = [self.collate(fetch_rows(self.dataset, idx), self.pad_token_id)
                 for idx in self.sampler.micro_batches(step)]
        pads = [padding_stats(b) for b in micro]
        # this rank's (trained items, real tokens, computed slots); the loop sums them over ranks
        counts = torch.tensor([sum(self.count(b) for b in micro), sum(r for r, _ in pads),
                               sum(s for _, s in pads)], dtype=torch.long)
        return {"step": step, "micro": micro, "counts": counts}


def step_loader(dataset, sampler: GlobalBatchSampler, collate: Callable, count: Callable,
                pad_token_id: int, start: int, stop: int, num_workers: int = 0,
                pin_memory: bool = False, columns: list[str] | None = None):
    """An iterable over steps start..stop-1 (see StepBatches); `num_workers` > 0 builds the next
    steps in worker processes while the current one trains. Pin only when copying to a GPU."""
    items = StepBatches(dataset, sampler, collate, count, pad_token_id, start, stop, columns)
    if num_workers == 0 and not pin_memory:
        return (items[k] for k in range(len(items)))  # no DataLoader machinery at all
    return torch.utils.data.DataLoader(
        items, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=_keep, prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
        # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from the
        # global torch RNG, shifting the dropout stream and breaking bit-exact resume.
        generator=torch.Generator().manual_seed(0))


def _keep(item):
    return item
