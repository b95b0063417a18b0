"""Data tokenized once, before the job: `sft-scale data prepare --config X`.

Without it every training job tokenizes at start-up: rank 0 inside `main_process_first()` while
every other rank waits in a barrier, which on a large dataset outlasts the process group's timeout.
`prepare` runs the same pipeline (sources -> formats -> tokens + masks -> length filter; the
`length` column is what packing and length grouping size batches by) in one process and writes

    DIR/train/, DIR/eval/   datasets.save_to_disk folders (memory-mapped by every rank)
    DIR/prepared.json       the fingerprint (below) and the data statistics

DIR is `data.prepared_dir`, else OUTPUT_DIR/prepared_data. Training reads DIR when it exists,
after checking the fingerprint: every config key the tokenized data depends on, a digest of the
tokenizer, and the size and modification time of every local data file. A mismatch is refused
with the keys that changed; nothing is re-tokenized behind the user's back. With
`data.prepared_dir` unset and no OUTPUT_DIR/prepared_data, training tokenizes as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import datasets

from sft_scale.config import Config, ConfigError
from sft_scale.data.pipeline import DataStats, build_datasets, eval_sources, train_sources
from sft_scale.training.rundir import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "prepared.json"
DEFAULT_NAME = "prepared_data"
# data.* keys that change how batches are formed or how fast data is read, not the tokens.
_NOT_CONTENT = {"packing", "group_by_length", "num_proc", "num_workers", "pin_memory",
                "prepared_dir"}


def prepared_dir(cfg: Config) -> Path:
    return Path(cfg.data.prepared_dir) if cfg.data.prepared_dir \
        else Path(cfg.output.dir) / DEFAULT_NAME


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the token ids: vocabulary, merges, normalizer and pre-tokenizer
    (the fast tokenizer's full JSON, else the vocabulary), special tokens, BOS/EOS flags and the
    chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "special": tokenizer.all_special_tokens,
             "pad": tokenizer.pad_token, "eos": tokenizer.eos_token, "bos": tokenizer.bos_token,
             "add_bos": getattr(tokenizer, "add_bos_token", None),
             "add_eos": getattr(tokenizer, "add_eos_token", None),
             "chat_template": tokenizer.chat_template}
    h = hashlib.sha256(body.encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _files_state(cfg: Config) -> dict:
    """path -> [size, mtime_ns] of each local data file (every file of a save_to_disk folder);
    hub datasets are named by id, split and config in the data keys instead. Contents are not
    hashed: that would read the whole corpus on every start."""
    state = {}
    for src in train_sources(cfg) + eval_sources(cfg):
        p = Path(src.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() \
            else [p] if p.is_file() else []
        for f in files:
            st = f.stat()
            state[str(f)] = [st.st_size, st.st_mtime_ns]
    return state


def fingerprint(cfg: Config, tokenizer) -> dict:
    d = cfg.to_dict()
    fp = {"task": d["task"], "training.seed": d["training"]["seed"]}  # seed: shuffle, eval split
    fp.update({f"data.{k}": v for k, v in d["data"].items() if k not in _NOT_CONTENT})
    if cfg.task == "classification":
        fp.update({f"classification.{k}": v for k, v in d["classification"].items()})
    fp["tokenizer"] = tokenizer_digest(tokenizer)
    fp["data files"] = _files_state(cfg)
    return json.loads(json.dumps(fp, default=str))  # the form it takes once read back


def differences(saved: dict, current: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "tokenizer":
            out.append("the tokenizer (vocabulary, special tokens or chat template)")
        elif key == "data files":
            a, b = a or {}, b or {}
            changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            out.append("data file(s) changed since: " + ", ".join(changed[:3])
                       + (f" and {len(changed) - 3} more" if len(changed) > 3 else ""))
        else:
            out.append(f"{key}: {a!r} when prepared, {b!r} now")
    return out


def prepare(cfg: Config, tokenizer, force: bool = False) -> tuple[Path, DataStats, bool]:
    """Tokenize the config's data into prepared_dir(cfg). Returns (folder, stats, written);
    written is False when the folder was already up to date (and `force` is off)."""
    out = prepared_dir(cfg)
    fp = fingerprint(cfg, tokenizer)
    if (out / MANIFEST).is_file() and not force:
        saved = json.loads((out / MANIFEST).read_text())
        if not differences(saved["fingerprint"], fp):
            return out, DataStats(**saved["stats"]), False
    train, eval_ds, stats = build_datasets(cfg, tokenizer)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train.save_to_disk(str(tmp / "train"))
    if eval_ds is not None:
        eval_ds.save_to_disk(str(tmp / "eval"))
    atomic_write_json(tmp / MANIFEST, {"fingerprint": fp, "stats": stats.as_dict(),
                                       "datasets_version": datasets.__version__})
    # Swap in whole: a reader sees the old folder or the new one, never half of one.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out, stats, True


def find_prepared(cfg: Config) -> Path | None:
    """The prepared-data folder training must use, or None to tokenize in the job."""
    path = prepared_dir(cfg)
    if (path / MANIFEST).is_file():
        return path
    if cfg.data.prepared_dir:
        raise ConfigError(f"data.prepared_dir={cfg.data.prepared_dir}: no prepared data there "
                          f"({MANIFEST} missing). Run `sft-scale data prepare --config "
                          f"{cfg.source or 'CONFIG'}` first, or unset data.prepared_dir to "
                          "tokenize in the job.")
    return None


def load_prepared(path: Path, cfg: Config, tokenizer):
    """(train, eval or None, stats) from a prepared folder whose fingerprint matches `cfg` and
    `tokenizer`; ConfigError naming what changed otherwise."""
    saved = json.loads((path / MANIFEST).read_text())
    changed = differences(saved["fingerprint"], fingerprint(cfg, tokenizer))
    if changed:
        raise ConfigError(
            f"{path}: the prepared data does not match this config: " + "; ".join(changed)
            + f". Run `sft-scale data prepare --config {cfg.source or 'CONFIG'}` again (it "
            "replaces the folder), or delete it to tokenize in the job.")
    train = datasets.load_from_disk(str(path / "train"))
    eval_ds = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    return train, eval_ds, DataStats(**saved["stats"])
