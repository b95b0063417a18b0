"""metrics.jsonl: one JSON line per logged step, written by the main process only."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path | None):
        self.path = path
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
