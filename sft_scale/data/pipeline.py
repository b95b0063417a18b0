"""Sources -> formats -> tokens + masks -> length policy -> train/eval datasets, with statistics.

Preprocessing runs through `datasets.map`, so it is cached by the datasets fingerprint and runs
in parallel with `data.num_proc`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import datasets
from jinja2.exceptions import TemplateError

from sft_scale.config import Config, ConfigError, DatasetSource
from sft_scale.data.formats import (
    MODALITY_COLUMNS,
    PROMPT_KEYS,
    detect_format,
    to_example,
    unused_columns,
)
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
    # Reported, never dropped: a user may mean them (and upsampling by weight/count is not
    # counted). Records whose canonical example equals an earlier record's, and eval examples
    # that are also training records.
    duplicates: int = 0
    eval_in_train: int = 0
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
    parts, total = [], 0
    for i, src in enumerate(sources):
        ds = load_source(src)
        fmt = src.format if src.format != "auto" else cfg.data.format
        if fmt == "auto":
            fmt = detect_format([c for c in ds.column_names if c != SOURCE_COLUMN],
                                f"{src.path} (first record)")
        d = cfg.data
        _check_columns(ds, fmt, src, (d.prompt_field, d.answer_field))
        ds = apply_weight(ds, src, cfg.training.seed + i)
        total += len(ds)
        if per_source is not None and len(ds) > per_source:
            ds = ds.shuffle(seed=cfg.training.seed).select(range(per_source))
        # Stored as JSON text: chats and completions have different shapes, one arrow column each.
        # map runs the function now, but bind this iteration's values anyway (B023).
        ds = ds.map(lambda r, fmt=fmt, d=d, src=src: {"example": json.dumps(to_example(
                        r, fmt, d.prompt_field, d.answer_field, d.system_prompt, cfg.task, src,
                        d.train_tool_calls))},
                    remove_columns=[c for c in ds.column_names if c != SOURCE_COLUMN],
                    num_proc=_procs(cfg, ds), desc=f"format {fmt}: {src.path}")
        log.info("data: %s -> %d records, format %s", src.path, len(ds), fmt)
        parts.append(ds)
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), total


def _check_columns(ds, fmt: str, src: DatasetSource, fields: tuple) -> None:
    """Refuse images/audio/video (we would train on the text around them as if they were not
    there); name any other column the format does not read, once per source."""
    for col in MODALITY_COLUMNS:
        if col in ds.column_names:
            used = next((i for i, v in enumerate(ds[col]) if v), None)
            if used is not None:
                raise DataError(f"{ds[used][SOURCE_COLUMN]}: column {col!r} holds {col} "
                                f"({str(ds[used][col])[:60]}); sft_scale trains text-only "
                                "models, and the text would be trained without them. Drop the "
                                "column (or these records)")
    extra = unused_columns([c for c in ds.column_names if c not in MODALITY_COLUMNS], fmt,
                           tuple(f for f in fields if f) + PROMPT_KEYS)
    if extra:
        log.warning("data: %s: columns %s are not used by format %s (map them with the "
                    "source's columns: if they hold data you meant to train on)", src.path,
                    extra, fmt)


def check_max_seq_len(cfg: Config, model_config) -> None:
    """data.max_seq_len beyond the model's positions would train on positions it never had
    (and fails or degrades silently, depending on the architecture)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.max_seq_len > limit:
        raise ConfigError(f"{cfg.source or '<config>'}: 'data.max_seq_len' is "
                          f"{cfg.data.max_seq_len} but the model has {limit} positions "
                          f"(max_position_embeddings); set data.max_seq_len <= {limit}")


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


def _label_index(label, names: list[str], multi: bool, where: str = ""):
    def idx(x):
        if str(x) not in names:
            raise DataError(f"{where}: label {x!r} is not one of the labels {names} (the "
                            "training data's labels, or classification.labels); an eval label "
                            "must also occur in the training data")
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
            ex["label_index"] = _label_index(ex["label"], labels, multi, r[SOURCE_COLUMN])
            return encode_example(tokenizer, ex, d.max_seq_len)
        return ds.map(enc, remove_columns=["example"], num_proc=_procs(cfg, ds),
                      desc="tokenize")

    def enc_causal(r):
        try:
            return encode_example(tokenizer, json.loads(r["example"]), d.max_seq_len, template,
                                  d.train_on_inputs, d.truncation)
        except DataError:
            raise
        except (ValueError, TemplateError) as e:  # the template cannot render this record
            raise DataError(f"{r[SOURCE_COLUMN]}: {e}") from None
    return ds.map(enc_causal, remove_columns=["example"], num_proc=_procs(cfg, ds),
                  desc="tokenize")


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
    duplicates, in_train = repeated_examples(train, eval_ds)
    chat = cfg.task != "classification" and has_chat(train)
    train, stats = _finish(encode_dataset(train, tokenizer, cfg, labels), "training")
    stats.labels = labels
    stats.duplicates, stats.eval_in_train = len(duplicates), len(in_train)
    stats.chat = chat
    stats.bos = tokenizer.bos_token_id is not None and \
        train[0]["input_ids"][0] == tokenizer.bos_token_id
    if eval_ds is not None:
        eval_ds, _ = _finish(encode_dataset(eval_ds, tokenizer, cfg, labels), "eval")
        stats.eval_examples = len(eval_ds)
    if duplicates:
        log.warning("training data: %d records repeat an earlier record exactly (e.g. %s); kept "
                    "(deduplicate the files if that is not meant)", len(duplicates),
                    ", ".join(duplicates[:3]))
    if in_train:
        log.warning("eval data: %d examples are also in the training data (e.g. %s): the eval "
                    "loss is optimistic", len(in_train), ", ".join(in_train[:3]))
    return train, eval_ds, stats


def _digest(example: str) -> bytes:
    return hashlib.blake2b(example.encode(), digest_size=16).digest()


def repeated_examples(train, eval_ds) -> tuple[list[str], list[str]]:
    """(training records that repeat an earlier one, eval records also in training), as
    sources. Copies made by a source's weight/count share their record's source: not counted."""
    seen: dict[bytes, str] = {}
    duplicates = []
    for src, ex in zip(train[SOURCE_COLUMN], train["example"], strict=True):
        h = _digest(ex)
        first = seen.setdefault(h, src)
        if first != src:
            duplicates.append(src)
    if eval_ds is None:
        return sorted(set(duplicates)), []
    in_train = [src for src, ex in zip(eval_ds[SOURCE_COLUMN], eval_ds["example"], strict=True)
                if _digest(ex) in seen]
    return sorted(set(duplicates)), in_train


def _finish(ds, what: str):
    stats = DataStats(truncated=sum(ds["truncated"]))
    too_long = [s for s, n in zip(ds[SOURCE_COLUMN], ds["length"], strict=True) if n == 0]
    untrainable = [s for s, n, t in zip(ds[SOURCE_COLUMN], ds["length"], ds["n_trained"],
                                        strict=True)
                   if n > 0 and t == 0]
    if too_long or untrainable:
        ds = ds.filter(lambda r: r["n_trained"] > 0, desc="drop over-long / untrainable")
    stats.dropped_too_long, stats.dropped_no_trainable = len(too_long), len(untrainable)
    if len(ds) == 0:
        raise DataError(f"the {what} data is empty after filtering ({stats.dropped_too_long} "
                        f"dropped as too long, {stats.dropped_no_trainable} with no trainable "
                        "token left after truncation). Raise data.max_seq_len or check the data.")
    stats.examples = len(ds)
    stats.tokens = sum(ds["length"])
    stats.trained_tokens = sum(ds["n_trained"])
    if stats.dropped_no_trainable or stats.dropped_too_long or stats.truncated:
        log.warning("%s data: %d truncated, %d dropped as too long%s, %d dropped with no "
                    "trainable token%s%s", what, stats.truncated - stats.dropped_too_long,
                    stats.dropped_too_long, _first(too_long), stats.dropped_no_trainable,
                    _first(untrainable), " (data.truncation: proportional keeps part of each "
                    "prompt and answer)" if untrainable else "")
    return ds, stats


def _first(sources: list[str], n: int = 3) -> str:
    return f" ({', '.join(sources[:n])}{', ...' if len(sources) > n else ''})" if sources else ""
