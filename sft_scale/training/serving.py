"""What a saved adapter or merged model needs so that whoever serves it sees what training saw.

Written next to the weights (adapter/, best_adapter/, model/, and by `sft-scale merge`):
- the tokenizer with the chat template training rendered with (also when `chat_template: auto`
  fell back to ChatML), BOS added by plain tokenization exactly when training sequences began
  with it (llama.cpp and Ollama read this as `add_bos_token`), right padding;
- the base's own tokenizer files that transformers does not re-save (SentencePiece's
  `tokenizer.model`: converters and llama.cpp prefer it to tokenizer.json), copied unchanged;
- `generation_config.json` whose `eos_token_id` holds the template's end-of-turn token(s) next to
  EOS, so `generate` stops where the trained answers stop (Llama-3's <|eot_id|>, Qwen's
  <|im_end|>) instead of running on to a base model's end-of-text.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import GenerationConfig

from sft_scale.data.templates import end_of_turn_tokens

log = logging.getLogger(__name__)

# Vocabulary files some tokenizers keep besides tokenizer.json; save_pretrained of a fast
# tokenizer (transformers 5) writes none of them.
VOCAB_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
               "merges.txt", "vocab.txt", "tokenizer.tiktoken")


def adds_bos(tokenizer) -> bool:
    """Whether tokenizer(text) puts BOS first."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def serving_tokenizer(tokenizer, template: str | None, bos: bool | None):
    """A copy of `tokenizer` set up to be saved: `template` as its chat template, BOS added by
    plain tokenization iff `bos` (None: as it is), right padding and no padding baked into
    tokenizer.json (it would override padding_side on reload)."""
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    if bos is not None and adds_bos(tok) != bos:
        if not hasattr(tok, "update_post_processor"):
            log.warning("cannot make the saved tokenizer %s BOS (no post-processor to update); "
                        "prepend it yourself when serving", "add" if bos else "stop adding")
        else:
            tok.add_bos_token = bos
            if adds_bos(tok) != bos:
                log.warning("the saved tokenizer still does not match training's BOS (%s)", bos)
    tok.padding_side = "right"
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and backend.padding is not None:
        backend.no_padding()
    return tok


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, plus `padding_side` in tokenizer_config.json: transformers 5 does not
    write it, and some classes (LlamaTokenizer) reload as left-padding by default."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("padding_side") != tokenizer.padding_side:
        config["padding_side"] = tokenizer.padding_side
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def generation_eos(base_eos, tokenizer, template: str | None) -> list[int]:
    """EOS ids for generation: the base's, the tokenizer's EOS, the template's end of turn."""
    ids = base_eos if isinstance(base_eos, list) else ([base_eos] if base_eos is not None else [])
    extra = [tokenizer.eos_token_id]
    if template:
        extra += tokenizer.convert_tokens_to_ids(end_of_turn_tokens(tokenizer, template))
    return list(dict.fromkeys([i for i in ids + extra if i is not None]))


def local_dir(name_or_path: str) -> Path | None:
    """The local folder of a model: the path itself, or a hub id's cached snapshot (offline)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached, or not a hub id: nothing to copy from
        return None


def copy_vocab_files(src: Path | None, dest: Path) -> list[str]:
    """Copy, unchanged, the base's vocabulary files that `dest` lacks; returns their names."""
    if src is None:
        return []
    copied = []
    for name in VOCAB_FILES:
        if (Path(src) / name).is_file() and not (dest / name).exists():
            shutil.copy2(Path(src) / name, dest / name)
            copied.append(name)
    return copied


@dataclass
class Serving:
    """The tokenizer and generation settings saved with every model a run writes."""
    tokenizer: object
    generation_config: object | None
    base_dir: Path | None

    def save(self, folder: Path, with_tokenizer: bool = True) -> None:
        if with_tokenizer:
            save_tokenizer(self.tokenizer, folder)
            copy_vocab_files(self.base_dir, Path(folder))
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)


def for_training(tokenizer, base_dir: str, template: str | None, bos: bool | None) -> Serving:
    """`template`: the chat template training rendered with (None when no chat was trained);
    `bos`: whether training sequences began with BOS (None when unknown)."""
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except (OSError, ValueError):
        gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    eos = generation_eos(gen.eos_token_id, tokenizer, template)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    log.info("saved models: chat template %s, BOS %s, generation stops at %s",
             "set" if template else "as the tokenizer has it",
             "added" if bos else "not added", tokenizer.convert_ids_to_tokens(eos))
    return Serving(serving_tokenizer(tokenizer, template, bos), gen, local_dir(base_dir))
