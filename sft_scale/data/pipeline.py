"""Sources -> formats -> tokens + masks -> length policy -> train/eval datasets, with statistics.

Preprocessing runs through `datasets.map`, so it is cached by the datasets fingerprint and runs
in parallel with `data.num_proc`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from sft_scale.config import Config, DatasetSource
from sft_scale.data.formats import detect_format, to_example
from sft_scale.data.sources import SOURCE_COLUMN, DataError, apply_weight, load_source
from sft_scale.data.templates import fallback_warning, resolve_template
from sft_scale.data.tokenize import encode_example

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trainable: int = 0
    eval_examples: int = 0
    labels: list | None = None  # classification: label names in head order
    chat: bool = False  # chat examples were trained (the chat template is saved with the model)
    bos: bool | None = None  # training sequences begin with BOS (the saved tokenizer adds it)

    def as_dict(self) -> dict:
        return asdict(self)


def train_sources(cfg: Config) -> list[DatasetSource]:
    return [DatasetSource(path=p) for p in cfg.data.train_files] + list(cfg.data.datasets)


def eval_sources(cfg: Config) -> list[DatasetSource]:
    return [DatasetSource(path=p) for p in cfg.data.eval_files] + list(cfg.data.eval_datasets)


def load_examples(sources: list[DatasetSource], cfg: Config):
    """Raw records of every source turned into canonical examples (one `example` column)."""
    return sample_examples(sources, cfg, None)[0]


def sample_examples(sources: list[DatasetSource], cfg: Config, per_source: int | None):
    """(canonical examples, record count of the whole mix): with `per_source`, only a seeded
    random sample of that many records of each source is formatted (`sft-scale check`)."""
    import datasets

    parts, total = [], 0
    for i, src in enumerate(sources):
        ds = load_source(src)
        fmt = src.format if src.format != "auto" else cfg.data.format
        if fmt == "auto":
            fmt = detect_format([c for c in ds.column_names if c != SOURCE_COLUMN],
                                f"{src.path} (first record)")
        ds = apply_weight(ds, src, cfg.training.seed + i)
        total += len(ds)
        if per_source is not None and len(ds) > per_source:
            ds = ds.shuffle(seed=cfg.training.seed).select(range(per_source))
        d = cfg.data
        # Stored as JSON text: chats and completions have different shapes, one arrow column each.
        ds = ds.map(lambda r: {"example": json.dumps(to_example(
                        r, fmt, d.prompt_field, d.answer_field, d.system_prompt, cfg.task))},
                    remove_columns=[c for c in ds.column_names if c != SOURCE_COLUMN],
                    num_proc=_procs(cfg, ds), desc=f"format {fmt}: {src.path}")
        log.info("data: %s -> %d records, format %s", src.path, len(ds), fmt)
        parts.append(ds)
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), total


def _procs(cfg: Config, ds) -> int | None:
    n = min(cfg.data.num_proc, max(1, len(ds) // 64))
    return n if n > 1 else None


def label_names(ds, cfg: Config) -> list[str]:
    """Classification labels in head order: configured, else sorted distinct training labels."""
    if cfg.classification.labels:
        return list(cfg.classification.labels)
    seen = set()
    for e in ds["example"]:
        lab = json.loads(e)["label"]
        seen.update(str(x) for x in lab) if isinstance(lab, list) else seen.add(str(lab))
    return sorted(seen)


def _label_index(label, names: list[str], multi: bool, binary: bool):
    def idx(x):
        if str(x) not in names:
            raise DataError(f"label {x!r} is not one of the labels {names} "
                            "(classification.labels)")
        return names.index(str(x))
    if multi:
        hot = [0] * len(names)
        for x in (label if isinstance(label, list) else [label]):
            hot[idx(x)] = 1
        return hot
    return idx(label)


def has_chat(ds) -> bool:
    return any('"kind": "chat"' in e for e in ds["example"])


def encode_dataset(ds, tokenizer, cfg: Config, labels: list[str] | None = None):
    template = resolve_template(tokenizer, cfg.data.chat_template)
    d = cfg.data
    warning = fallback_warning(tokenizer, d.chat_template)
    if warning and cfg.task != "classification" and has_chat(ds):
        log.warning(warning)
    if cfg.task == "classification":
        multi = cfg.classification.problem_type == "multi_label" or (
            cfg.classification.problem_type == "auto"
            and isinstance(json.loads(ds[0]["example"])["label"], list))

        def enc(r):
            ex = json.loads(r["example"])
            ex["label_index"] = _label_index(ex["label"], labels, multi, len(labels) == 2)
            return encode_example(tokenizer, ex, d.max_seq_len)
        return ds.map(enc, remove_columns=["example"], num_proc=_procs(cfg, ds),
                      desc="tokenize")
    return ds.map(lambda r: encode_example(tokenizer, json.loads(r["example"]), d.max_seq_len,
                                           template,
                                           d.train_on_inputs, d.truncation),
                  remove_columns=["example"], num_proc=_procs(cfg, ds), desc="tokenize")


def build_datasets(cfg: Config, tokenizer):
    """(train, eval or None, stats). Raises DataError, before anything is written, when the data
    is malformed or nothing trainable is left."""
    train = load_examples(train_sources(cfg), cfg).shuffle(seed=cfg.training.seed)
    evals = eval_sources(cfg)
    eval_ds = load_examples(evals, cfg) if evals else None
    if eval_ds is None and cfg.data.eval_fraction > 0:
        n_eval = max(1, int(round(len(train) * cfg.data.eval_fraction)))
        if n_eval >= len(train):
            raise DataError(f"data.eval_fraction={cfg.data.eval_fraction} leaves no training "
                            f"records of {len(train)}")
        eval_ds, train = train.select(range(n_eval)), train.select(range(n_eval, len(train)))
    labels = label_names(train, cfg) if cfg.task == "classification" else None
    chat = cfg.task != "classification" and has_chat(train)
    train, stats = _finish(encode_dataset(train, tokenizer, cfg, labels), "training")
    stats.labels = labels
    stats.chat = chat
    stats.bos = tokenizer.bos_token_id is not None and \
        train[0]["input_ids"][0] == tokenizer.bos_token_id
    if eval_ds is not None:
        eval_ds, _ = _finish(encode_dataset(eval_ds, tokenizer, cfg, labels), "eval")
        stats.eval_examples = len(eval_ds)
    return train, eval_ds, stats


def _finish(ds, what: str):
    stats = DataStats(truncated=sum(ds["truncated"]))
    n = len(ds)
    ds = ds.filter(lambda r: r["length"] > 0, desc="drop over-long")
    stats.dropped_too_long = n - len(ds)
    n = len(ds)
    ds = ds.filter(lambda r: r["n_trained"] > 0, desc="drop untrainable")
    stats.dropped_no_trainable = n - len(ds)
    if len(ds) == 0:
        raise DataError(f"the {what} data is empty after filtering ({stats.dropped_too_long} "
                        f"dropped as too long, {stats.dropped_no_trainable} with no trainable "
                        "token left after truncation). Raise data.max_seq_len or check the data.")
    stats.examples = len(ds)
    stats.tokens = sum(ds["length"])
    stats.trained_tokens = sum(ds["n_trained"])
    if stats.dropped_no_trainable or stats.dropped_too_long or stats.truncated:
        log.warning("%s data: %d truncated, %d dropped as too long, %d dropped with no trainable "
                    "token", what, stats.truncated - stats.dropped_too_long,
                    stats.dropped_too_long, stats.dropped_no_trainable)
    return ds, stats
