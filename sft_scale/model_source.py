"""The embedded base model: a tiny Llama and its tokenizer, built offline and deterministically.

`builtin:tiny-llama` resolves to a folder in the cache ($SFT_SCALE_HOME, default
~/.cache/sft_scale). Building it trains a byte-level BPE tokenizer on the demo's unlabelled text
and 'pretrains' the model on that text for a few seconds, so the demo really goes
pretrained base -> supervised fine-tune. The folder is a plain Hugging Face model folder
(safetensors), loadable by transformers without sft_scale.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import model_info, try_to_load_from_cache
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sft_scale.config import Config
from sft_scale.demo.data import make_examples, pretraining_corpus
from sft_scale.errors import ConfigError

BUILTIN_PREFIX = "builtin:"
TINY_LLAMA = "tiny-llama"
_VERSION = "v4"  # bump when the recipe below changes, so stale caches are not reused
# The hub's repo-id form: "name" or "owner/name". Anything else that does not exist is a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
HUB_TIMEOUT_S = 10


def cache_home() -> Path:
    return Path(os.environ.get("SFT_SCALE_HOME", Path.home() / ".cache" / "sft_scale"))


def resolve_model_path(name_or_path: str, revision: str | None = None,
                       key: str = "model.name_or_path") -> str:
    """Map `builtin:NAME` to its built folder (building it once); check that a local path exists
    and that a hub id is cached or downloadable, so a wrong name fails in seconds with a fix
    (transformers would retry the hub for a minute, then name the wrong cause). `key` is the
    setting the name came from, for the message."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX):]
        if name != TINY_LLAMA:
            raise ConfigError(f"{key}={name_or_path!r}: unknown builtin model; available: "
                              f"{BUILTIN_PREFIX}{TINY_LLAMA}")
        target = cache_home() / f"{TINY_LLAMA}-{_VERSION}"
        if not (target / "model.safetensors").exists():
            build_tiny_llama(target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return name_or_path
    if not HUB_ID.fullmatch(name_or_path):
        raise ConfigError(f"{key}={name_or_path!r}: the folder {path.absolute()} does not exist. "
                          f"Point {key} at a model folder (config.json, tokenizer, *.safetensors) "
                          "or a hub id such as Qwen/Qwen2.5-0.5B")
    check_hub_model(name_or_path, revision, key)
    return name_or_path


def check_hub_model(repo_id: str, revision: str | None, key: str) -> None:
    """A hub id must be in the local cache, or the hub must say it exists; one request, no
    retries."""
    # config.json for a model; tokenizer_config.json alone for a tokenizer-only repo.
    if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str)
           for f in ("config.json", "tokenizer_config.json")):
        return
    at = f" at revision {revision!r}" if revision else ""
    # "models/llama" may have been meant as a folder next to the config.
    nor = f" (nor is there a folder {Path(repo_id).absolute()})" if "/" in repo_id else ""
    try:
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise ConfigError(f"{key}={repo_id!r}: the hub has no revision {revision!r}; fix "
                          "model.revision") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}={repo_id!r}: no such model on the Hugging Face hub{nor} (or "
                          "it is private or gated: `huggingface-cli login` first). Check the id, "
                          "or point it at a local model folder") from None
    except Exception as e:  # offline mode, no network, DNS, proxy: it cannot be fetched now
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        folder = f"models/{repo_id.rsplit('/', 1)[-1]}"
        raise ConfigError(
            f"{key}={repo_id!r}: this hub model{at} is not in the local cache{nor} and cannot "
            f"be downloaded here ({reason}). Download it where there is network: "
            f"`huggingface-cli download {repo_id} --local-dir {folder}`"
            + (f" --revision {revision}" if revision else "")
            + f", copy the folder here if needed, and set {key}: /path/to/{folder}") from None


def build_tokenizer(corpus: list[str]):
    # torch and transformers load in the builders only: slurm.py imports this module, and the
    # CLI imports slurm.py to build its parser (start-up time of every command, login nodes).
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    # No pad token on purpose is a classic pitfall; the builtin model has one so the demo is clean,
    # and the model loader adds one for bases that lack it.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=256)


def build_tiny_llama(target: Path, pretrain_steps: int = 150) -> None:
    import torch  # see build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = pretraining_corpus()
    train, _ = make_examples()
    # The tokenizer sees the label words (as a real tokenizer would have); the model does not.
    tokenizer = build_tokenizer(corpus + [r["prompt"] + r["answer"] for r in train])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _pretrain(model, tokenizer, corpus, pretrain_steps, gen)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process (a second rank) built the same deterministic folder first.
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(model, tokenizer, corpus: list[str], steps: int, gen) -> None:
    """A few seconds of next-token training on unlabelled text; full precision, one process."""
    import torch  # see build_tokenizer

    ids = [[tokenizer.bos_token_id] + tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
           for t in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(ids), (32,), generator=gen).tolist()
        batch = [ids[i] for i in pick]
        width = max(len(b) for b in batch)
        inp = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, b in enumerate(batch):
            inp[r, :len(b)] = torch.tensor(b)
            labels[r, :len(b)] = torch.tensor(b)
            mask[r, :len(b)] = 1
        loss = model(input_ids=inp, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def read_model_config(cfg: Config, path: str | None = None,
                      required: bool = False):
    """The model's transformers config (no weights): the one place a run reads its config.json.
    None when transformers cannot read it here (training then leaves the model class to
    from_pretrained), or with `required` (planning needs the shapes) a ConfigError saying how to
    point at a config.json."""
    from transformers import AutoConfig  # see build_tokenizer

    name = cfg.model.name_or_path
    if path is None:
        try:
            path = resolve_model_path(name, cfg.model.revision)  # names what is missing, the fix
        except ConfigError as e:
            if not required:
                raise
            raise ConfigError(f"{e}. (Planning needs only the model's config.json: --set "
                              "model.name_or_path=/path/to/config.json also works)") from None
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        if not required:
            return None
        raise ConfigError(
            f"model.name_or_path={name!r}: cannot read its config.json ({str(e).splitlines()[0]})."
            " Planning needs only that file: pass a local model folder or a config.json path, "
            "e.g. --set model.name_or_path=/path/to/config.json, or log in / go online for a "
            "hub id") from None
