"""Load raw records from files, save_to_disk folders or the hub, each record tagged with where it
came from (file:line) so every later error can point at it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from sft_scale.config import DatasetSource
from sft_scale.errors import DataError  # noqa: F401  (re-exported)

SOURCE_COLUMN = "_source"


def load_source(src: DatasetSource):
    """A `datasets.Dataset` of the source's records plus a `_source` column ("file:line"), its
    columns renamed by the source's `columns` mapping."""
    return _map_columns(_load(src), src)


def _load(src: DatasetSource):
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
    if p.suffix in FILE_SUFFIXES:
        if not p.is_file():
            raise DataError(f"{p}: data file not found (relative paths are resolved against the "
                            "config file's folder)")
        if p.suffix == ".txt":
            texts, lines = _read_txt(p, src.sample_by)
            return _tag(datasets.Dataset.from_dict({"text": texts}), [f"{p}:{n}" for n in lines])
        if p.suffix == ".jsonl":
            lines = _validate_jsonl(p)
            return _tag(_load_file("json", p), [f"{p}:{n}" for n in lines])
        if p.suffix == ".json":
            _validate_json_array(p)
            ds = _load_file("json", p)
        elif p.suffix == ".csv":
            _read_text(p)  # encoding and permissions, with a line number, before pandas
            ds = _load_file("csv", p)
        else:
            _read_bytes(p)
            ds = _load_file("parquet", p)
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
    if p.exists():
        raise DataError(f"{src.path}: a {p.suffix or 'suffix-less'} file is not a data format "
                        f"sft_scale reads; use {'/'.join(FILE_SUFFIXES)} or a save_to_disk folder")
    raise DataError(f"{src.path}: not found, and not a {'/'.join(FILE_SUFFIXES)} file, a "
                    "save_to_disk folder or a hub dataset id")


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# pyarrow refuses deeper records (its schema import stops at 64 levels); refused here first,
# with the line, instead of as a DatasetGenerationError from inside datasets.
MAX_DEPTH = 60


def _load_file(kind: str, p: Path):
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train")
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(f"{p}: datasets could not read it as {kind} "
                        f"({type(cause).__name__}: {cause})") from None


def _map_columns(ds, src: DatasetSource):
    if not src.columns:
        return ds
    cols = set(ds.column_names)
    missing = {ours: theirs for ours, theirs in src.columns.items() if theirs not in cols}
    if missing:
        raise DataError(f"{src.path}: columns mapping {missing} names fields the data does not "
                        f"have; its fields are {sorted(c for c in cols if c != SOURCE_COLUMN)}")
    renames = {theirs: ours for ours, theirs in src.columns.items() if theirs != ours}
    clash = [o for t, o in renames.items() if o in cols and o not in renames]
    if clash:
        raise DataError(f"{src.path}: columns mapping renames onto {clash}, which the data already "
                        "has; map that field too, or drop it from the data")
    return ds.rename_columns(renames)


def _tag(ds, sources: list[str]):
    if len(ds) == 0:
        raise DataError(f"{sources[0] if sources else ds}: the dataset is empty")
    return ds.add_column(SOURCE_COLUMN, sources)


def _read_bytes(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except PermissionError:
        raise DataError(f"{p}: cannot be read: permission denied; make it readable "
                        "(chmod a+r) or copy it somewhere you can read") from None
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror or e})") from None


def _read_text(p: Path) -> str:
    raw = _read_bytes(p)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                        f"{p.name} > fixed{p.suffix}") from None


def _read_txt(p: Path, sample_by: str) -> tuple[list[str], list[int]]:
    """A text corpus: (records, the line each starts at)."""
    text = _read_text(p)
    texts, starts = [], []
    if sample_by == "document":
        texts, starts = ([text], [1]) if text.strip() else ([], [])
    else:
        cur, start = [], 0
        for n, line in enumerate(text.splitlines(), 1):
            if sample_by == "line":
                if line.strip():
                    texts.append(line)
                    starts.append(n)
            elif line.strip():
                cur, start = cur + [line], start or n
            elif cur:
                texts.append("\n".join(cur))
                starts.append(start)
                cur, start = [], 0
        if cur:
            texts.append("\n".join(cur))
            starts.append(start)
    if not texts:
        raise DataError(f"{p}: the file holds no text")
    return texts, starts


def _depth(obj) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def _validate_jsonl(p: Path) -> list[int]:
    """Parse every line once ourselves: pyarrow's errors name no line. Returns the line number
    of each record. Also catches a file whose records switch schema."""
    lines, first_keys, first_line = [], None, 0
    for n, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}); each "
                            "line must be one JSON object") from None
        except RecursionError:
            raise DataError(f"{p}:{n}: JSON nested too deeply to read; flatten the record") \
                from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        if _depth(rec) > MAX_DEPTH:
            raise DataError(f"{p}:{n}: JSON nested {_depth(rec)} levels deep; at most "
                            f"{MAX_DEPTH} are supported (Arrow's limit); flatten the record")
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
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to read; flatten the records") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: a .json file must hold an array of objects (use .jsonl for one "
                        "object per line)")
    if not data:
        raise DataError(f"{p}: the file holds no records")
    deep = next(((i, d) for i, r in enumerate(data) if (d := _depth(r)) > MAX_DEPTH), None)
    if deep:
        raise DataError(f"{p}[{deep[0]}]: JSON nested {deep[1]} levels deep; at most {MAX_DEPTH} "
                        "are supported (Arrow's limit); flatten the record")


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
