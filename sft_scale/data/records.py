"""Read training records from JSONL files, failing loudly with file:line on bad input."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad training data; the message names the file, the line and the fix."""


def read_records(paths: list[str], required: tuple[str, ...]) -> list[dict]:
    """Every record of every file, each checked for the fields the format needs."""
    rows: list[dict] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: data file not found (check data.train_files / "
                            "data.eval_files; relative paths are resolved against the config file)")
        if p.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: expected a .jsonl file of records with fields "
                            f"{list(required)}")
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                    f"{e.colno}); each line must be one JSON object") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got "
                                    f"{type(rec).__name__}")
                missing = [k for k in required if not isinstance(rec.get(k), str)]
                if missing:
                    raise DataError(f"{path}:{lineno}: record lacks string field(s) {missing}; "
                                    f"the prompt/answer format needs {list(required)} "
                                    f"(set data.prompt_field / data.answer_field if yours differ). "
                                    f"Keys found: {sorted(rec)}")
                rows.append({"prompt": rec[required[0]], "answer": rec[required[1]],
                             "source": f"{p.name}:{lineno}"})
    if not rows:
        raise DataError(f"no records in {paths}: the dataset is empty")
    return rows
