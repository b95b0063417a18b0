"""Runs llama.cpp's own `convert_hf_to_gguf.py` in this (child) process, with two adjustments made
through its Python API instead of by editing its file.

Started by `sft_scale.tools.gguf_export` as `python -m sft_scale.tools.gguf_convert CONVERTER_DIR
[--fallback-pre NAME] -- <the converter's own arguments>`. A child process keeps the converter's
modules (its bundled `gguf-py`, its `conversion` package) out of the process that verifies the
result with the pip-installed `gguf` reader.

1. The converter names a BPE tokenizer's pre-tokenizer (`tokenizer.ggml.pre`, which llama.cpp uses
   to split text before BPE) by hashing the ids the tokenizer gives for a fixed text and looking
   the hash up in a list of published models. A vocabulary trained by the user (the embedded demo
   tokenizer) can never be in that list, although its pre-tokenizer may be a standard one. With
   `--fallback-pre NAME`, a tokenizer that the list does not know is exported with that name;
   one that the list knows keeps llama.cpp's own answer. Without it, an unknown tokenizer exits
   with `UNKNOWN_PRE_TOKENIZER` so the caller can say what to do.
2. transformers 5 writes `rope_parameters: {"rope_type": "default", ...}`. "default" means no
   RoPE scaling, which the converter expresses by the key's absence; it warns "Unknown RoPE type:
   default" but writes the same file. The entry is dropped so that warning only appears when a
   scaling type really is unknown.
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

# Exit status meaning "the BPE pre-tokenizer was not recognised" (distinct from the converter's 1).
UNKNOWN_PRE_TOKENIZER = 64

log = logging.getLogger("sft_scale.tools.gguf_convert")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft_scale.tools.gguf_convert")
    ap.add_argument("converter_dir", type=Path)
    ap.add_argument("--fallback-pre", default=None)
    split = argv.index("--") if "--" in argv else len(argv)
    args, converter_args = ap.parse_args(argv[:split]), argv[split + 1:]
    script = args.converter_dir / "convert_hf_to_gguf.py"
    # The converter imports `conversion` from its own folder and `gguf` from its gguf-py.
    sys.path[:0] = [str(args.converter_dir), str(args.converter_dir / "gguf-py")]
    from conversion import base  # importable only with the path above

    original_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original_pre(self, tokenizer)
        except NotImplementedError:
            if args.fallback_pre is None:
                raise SystemExit(UNKNOWN_PRE_TOKENIZER) from None
            log.warning("tokenizer not in llama.cpp's list of known pre-tokenizers; exporting "
                        "it with tokenizer.ggml.pre=%s as requested", args.fallback_pre)
            return args.fallback_pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    original_load = base.ModelBase.load_hparams

    def load_hparams(dir_model, *rest, **kw):
        hparams = original_load(dir_model, *rest, **kw)
        for key in ("rope_parameters", "rope_scaling"):
            rope = hparams.get(key)
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "default":
                rope = {k: v for k, v in rope.items() if k not in ("rope_type", "type")}
                hparams[key] = rope or None
        return hparams

    base.ModelBase.load_hparams = staticmethod(load_hparams)

    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
