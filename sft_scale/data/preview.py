"""`sft-scale data preview`: the tokenized examples as training will see them, with the trained
part marked, and the statistics of the whole set."""

from __future__ import annotations

from sft_scale.config import Config
from sft_scale.data.collate import collate, collate_packed, padding_stats
from sft_scale.data.pipeline import build_datasets
from sft_scale.data.sampler import GlobalBatchSampler
from sft_scale.data.tokenize import IGNORE_INDEX
from sft_scale.preflight.command import Layout
from sft_scale.preflight.resolve import resolve
from sft_scale.training.model import load_tokenizer

OPEN, CLOSE = "«", "»"  # around trained tokens


def mark_trained(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decoded text with every run of trained tokens wrapped in «...»."""
    out, run, trained = [], [], None
    for tok, lab in zip(input_ids, labels, strict=True):
        t = lab != IGNORE_INDEX
        if trained is not None and t != trained:
            out.append(_piece(tokenizer, run, trained))
            run = []
        run.append(tok)
        trained = t
    if run:
        out.append(_piece(tokenizer, run, trained))
    return "".join(out)


def _piece(tokenizer, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{OPEN}{text}{CLOSE}" if trained else text


def padding_efficiency(cfg: Config, dataset, packing: bool, world_size: int = 1,
                       max_steps: int = 200) -> float:
    """Real tokens / computed slots over the batches training would build (rank 0's view)."""
    grouped = cfg.data.group_by_length and not packing
    sampler = GlobalBatchSampler(len(dataset), cfg.training.micro_batch_size,
                                 cfg.training.gradient_accumulation_steps, world_size, 0,
                                 cfg.training.seed, list(dataset["length"]) if grouped else None)
    fn = collate_packed if packing else collate
    steps = min(max_steps, max(1, len(dataset) // sampler.global_batch))
    real = slots = 0
    for step in range(steps):
        for idx in sampler.micro_batches(step):
            r, s = padding_stats(fn([dataset[i] for i in idx], 0))
            real, slots = real + r, slots + s
    return real / max(slots, 1)


def preview(cfg: Config, n: int = 3) -> dict:
    resolved = resolve(cfg, Layout.for_config(cfg))
    tokenizer = load_tokenizer(cfg)
    train, _eval, stats = build_datasets(cfg, tokenizer)
    # what data.packing: auto means for these lengths, as training decides it
    packing = resolved.with_data(cfg, train["length"], 0).fast.packing
    for i in range(min(n, len(train))):
        row = train[i]
        print(f"--- example {i} ({row['_source']}, {row['length']} tokens, {row['n_trained']} "
              f"trained{', truncated' if row['truncated'] else ''}) ---")
        print(mark_trained(tokenizer, row["input_ids"], row["labels"]))
    result = stats.as_dict()
    result["padding_efficiency"] = round(padding_efficiency(cfg, train, packing), 4)
    print("--- statistics (trained tokens are marked " + OPEN + "like this" + CLOSE + ") ---")
    for k, v in result.items():
        print(f"{k:>22}: {v}")
    return result
