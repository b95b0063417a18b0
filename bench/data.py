"""The shared inputs, built once per bench run: the model folder (a random-init Llama with the
project's builtin tokenizer) and an Alpaca-like prompt/completion data set, deterministic by seed.

No network: the tokenizer is `builtin:tiny-llama`'s (built offline by sft_scale under
`$SFT_SCALE_HOME`), given a BOS post-processor like Llama tokenizers have, so that TRL's own
tokenization (`tokenizer(prompt + completion)`) yields exactly the ids sft_scale builds
(`BOS + prompt + completion + EOS`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from bench.spec import Spec

# Words for the generated text: the demo corpus's (cheap for this tokenizer) and generic English
# (split into several tokens each), so lengths in tokens vary as they do in real text.
WORDS = """the a an of to and in is was for on that with as it by at from this be are or
have not which one all were when we there can been has more if will would their so what about
up out into than them some could time only other new these two may first then do any like my
now over such our man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good
very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used
take three soup pasta service staff room movie plot music screen battery hotel waiter coffee
bread phone book actors game ending price garden train lesson concert great excellent lovely
wonderful fantastic delightful superb pleasant brilliant charming fresh friendly awful terrible
horrible dreadful bland rude boring broken poor disappointing stale noisy explain describe list
summarize write translate classify rewrite generate suggest compare identify calculate create
answer question sentence paragraph story poem email letter recipe example reason step
""".split()
PUNCT = [",", ".", ".", ";", ":", "?"]
TEMPLATE_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def cache_root() -> Path:
    return Path(os.environ.get("SFT_SCALE_BENCH_CACHE",
                               Path.home() / ".cache" / "sft_scale_bench"))


def builtin_tokenizer_dir() -> str:
    """The project's builtin tokenizer, built offline by sft_scale (once per cache)."""
    os.environ.setdefault("SFT_SCALE_HOME", str(cache_root() / "home"))
    from sft_scale.model_source import resolve_model_path
    return resolve_model_path("builtin:tiny-llama")


def load_tokenizer(path: str | None = None):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or builtin_tokenizer_dir())
    tok.model_max_length = 1 << 20  # lengths are the bench's max_seq_len, set in every trainer
    if path is None:
        bos = tok.bos_token
        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return tok


def build_model_dir(spec: Spec) -> Path:
    """A random-init Llama (seeded) + tokenizer as a plain Hugging Face folder, cached by shape."""
    key = hashlib.sha256(json.dumps(asdict(spec.model), sort_keys=True).encode()
                         + str(spec.data.seed).encode() + b"v1").hexdigest()[:12]
    target = cache_root() / f"llama-{spec.name}-{key}"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import LlamaForCausalLM

    tok = load_tokenizer()
    config = llama_config(spec, tok)
    torch.manual_seed(spec.data.seed)
    model = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(median * math.exp(rng.gauss(0.0, sigma))))))


def make_records(spec: Spec, tok, n: int) -> list[dict]:
    """`n` Alpaca-like prompt/completion records whose encoded length fits max_seq_len."""
    d = spec.data
    rng = random.Random(d.seed)
    cache: dict[str, int] = {}

    def count(s: str) -> int:
        if s not in cache:
            cache[s] = len(tok(s, add_special_tokens=False)["input_ids"])
        return cache[s]

    def words(k: int, first: bool) -> str:
        out, total = [], 0
        while total < k:
            w = rng.choice(WORDS)
            if rng.random() < 0.12:
                w += rng.choice(PUNCT)
            piece = w if (first and not out) else " " + w
            out.append(piece)
            total += count(piece)
        return "".join(out)

    def one() -> dict | None:
        instr = words(_lognormal(rng, d.instruction_median, d.instruction_sigma, 3, 80), True)
        inp = words(_lognormal(rng, d.input_median, d.input_sigma, 3, 160), True) \
            if rng.random() < d.input_probability else ""
        prompt = (TEMPLATE_INPUT.format(instruction=instr, input=inp) if inp
                  else TEMPLATE.format(instruction=instr))
        room = d.max_seq_len - 2 - len(tok(prompt, add_special_tokens=False)["input_ids"])
        if room < 4:
            return None  # the prompt alone does not fit: draw again
        completion = words(min(_lognormal(rng, d.output_median, d.output_sigma, 2, 10_000),
                               room), True)
        # Trim whole words until BOS + prompt + completion + EOS fits.
        while 2 + len(tok(prompt + completion, add_special_tokens=False)["input_ids"]) \
                > d.max_seq_len:
            if " " not in completion:
                return None
            completion = completion.rsplit(" ", 1)[0]
        return {"prompt": prompt, "completion": completion}

    recs = []
    while len(recs) < n:
        r = one()
        if r is not None:
            recs.append(r)
    return recs


def encode(tok, rec: dict) -> dict:
    """sft_scale's encoding of a prompt/completion record (sft_scale/data/tokenize.py):
    BOS + prompt + completion + EOS, loss on completion + EOS."""
    p = [tok.bos_token_id] + tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    a = tok(rec["completion"], add_special_tokens=False)["input_ids"]
    ids = p + a + [tok.eos_token_id]
    return {"input_ids": ids, "labels": [-100] * len(p) + a + [tok.eos_token_id]}


def prepare(spec: Spec, work: Path, model_dir: Path | None = None) -> tuple[Spec, list[int]]:
    """Model folder (built unless given) + data file; fills the spec's derived fields and checks
    that TRL's tokenization equals sft_scale's on every record."""
    model_dir = Path(model_dir) if model_dir else build_model_dir(spec)
    tok = load_tokenizer(str(model_dir))
    recs = make_records(spec, tok, spec.train.n_examples)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / "train.jsonl"
    with open(data_file, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    lengths = []
    for r in recs:
        ours = encode(tok, r)["input_ids"]
        trl_way = tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]
        if ours != trl_way:
            raise RuntimeError(f"tokenizations differ for {r!r}: {ours} vs {trl_way}")
        lengths.append(len(ours))
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as st:
        n_params = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    spec.model_dir, spec.data_file = str(model_dir), str(data_file)
    spec.pad_token_id = tok.pad_token_id
    spec.parameters = n_params
    spec.real_tokens = sum(lengths)
    micro_batches = spec.train.steps * spec.train.gradient_accumulation_steps
    spec.packed_row_len = round(spec.real_tokens / micro_batches)
    spec.mean_example_len = round(spec.real_tokens / len(lengths))
    return spec, lengths


def length_summary(lengths: list[int]) -> dict:
    s = sorted(lengths)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "mean": round(sum(s) / len(s), 1), "p50": q(0.5), "p90": q(0.9),
            "max": s[-1], "min": s[0]}


def llama_config(spec, tok):
    """The bench model's LlamaConfig: the spec's shape over the builtin tokenizer's vocabulary."""
    from transformers import LlamaConfig

    m = spec.model
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
