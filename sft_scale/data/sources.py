"""Load raw records from files, save_to_disk folders or the hub, each record tagged with where it
came from (file:line) so every later error can point at it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sft_scale.config import DatasetSource
from sft_scale.errors import DataError  # noqa: F401  (re-exported)


SOURCE_COLUMN = "_source"


def load_source(src: DatasetSource):
    """A `datasets.Dataset` of the source's records plus a `_source` column ("file:line")."""
    import datasets

    p = Path(src.path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises several types here
            raise DataError(f"{p}: not a datasets.save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{p}: has splits {list(ds)}, not {src.split!r}; set split:")
            ds = ds[src.split]
        return _tag(ds, [f"{p.name}[{i}]" for i in range(len(ds))])
    if p.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not p.is_file():
            raise DataError(f"{p}: data file not found (relative paths are resolved against the "
                            "config file's folder)")
        if p.suffix == ".jsonl":
            lines = _validate_jsonl(p)
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
            return _tag(ds, [f"{p}:{n}" for n in lines])
        if p.suffix == ".json":
            _validate_json_array(p)
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(p.suffix[1:], data_files=str(p), split="train")
        # CSV rows start at line 2 (after the header); JSON arrays and parquet have no lines.
        label = (lambda i: f"{p}:{i + 2}") if p.suffix == ".csv" else (lambda i: f"{p}[{i}]")
        return _tag(ds, [label(i) for i in range(len(ds))])
    if "/" in src.path and not p.exists():
        try:
            ds = datasets.load_dataset(src.path, src.name, split=src.split)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{src.path}: could not load it as a hub dataset ({e}). Offline? "
                            "Use a local file or a save_to_disk folder.") from None
        return _tag(ds, [f"{src.path}[{i}]" for i in range(len(ds))])
    raise DataError(f"{src.path}: not found, and not a .jsonl/.json/.csv/.parquet file, a "
                    "save_to_disk folder or a hub dataset id")


def _tag(ds, sources: list[str]):
    if len(ds) == 0:
        raise DataError(f"{sources[0] if sources else ds}: the dataset is empty")
    return ds.add_column(SOURCE_COLUMN, sources)


def _validate_jsonl(p: Path) -> list[int]:
    """Parse every line once ourselves: pyarrow's errors name no line. Returns the line number
    of each record. Also catches a file whose records switch schema."""
    lines, first_keys, first_line = [], None, 0
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}); each "
                                "line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
            keys = frozenset(rec)
            if first_keys is None:
                first_keys, first_line = keys, n
            elif not (keys & first_keys):
                raise DataError(f"{p}:{n}: this record's fields {sorted(keys)} share nothing with "
                                f"line {first_line}'s {sorted(first_keys)}: a file must hold one "
                                "format; split it into one file per format")
            lines.append(n)
    if not lines:
        raise DataError(f"{p}: the file holds no records")
    return lines


def _validate_json_array(p: Path) -> None:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: a .json file must hold an array of objects (use .jsonl for one "
                        "object per line)")
    if not data:
        raise DataError(f"{p}: the file holds no records")


def apply_weight(ds, src: DatasetSource, seed: int):
    """Sub- or up-sample a source for mixing: `count` records, or `weight` x its size."""
    if src.count is None and src.weight is None:
        return ds
    n = src.count if src.count is not None else int(round(src.weight * len(ds)))
    if n <= 0:
        raise DataError(f"{src.path}: weight/count leaves no records (count={src.count}, "
                        f"weight={src.weight})")
    rng = random.Random(seed)
    idx = []
    while len(idx) < n:  # whole passes first, then a seeded sample of the remainder
        perm = list(range(len(ds)))
        rng.shuffle(perm)
        idx += perm[: n - len(idx)]
    return ds.select(idx)
