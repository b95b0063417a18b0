"""GGUF export (llama.cpp, Ollama): llama.cpp's own converter, pinned, then verified.

The converter is `convert_hf_to_gguf.py` with its `conversion` package and `gguf-py`, taken from
the source package of llama-cpp-python (PyPI), which vendors a fixed llama.cpp. `sft-scale gguf
setup` (run by `make install`) downloads that package once and keeps only those files, outside
the repository; exporting then needs no network. The converter runs in a child process
(`sft_scale/tools/gguf_convert.py` says why and what it adjusts).

What is verified before the file is kept, against the Hugging Face model folder it came from:
- metadata through the `gguf` reader: tokenizer model and pre-tokenizer, the token list, BOS/EOS
  ids, whether llama.cpp will add a BOS (as the transformers tokenizer does), the chat template,
  RoPE theta, context length;
- run by llama.cpp itself (xllamacpp, a prebuilt llama.cpp from PyPI): tokenisation of sample
  texts (and of a rendered chat, where the model has a template) equal to the folder's
  tokenizer; next-token log-probabilities of probe prompts within a tolerance per output type;
  greedy continuations (a difference is reported, not fatal, as near-ties flip under rounding).
`bench/gguf_llama_cpp.py` runs the same comparison on 100 demo prompts (docs/GGUF.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from sft_scale.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

# The llama-cpp-python release whose sdist vendors the llama.cpp converter we run.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_KEEP_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
_KEEP_DIRS = ("conversion/", "gguf-py/")
_MARKER = "SOURCE.json"

OUTTYPES = ("f32", "f16", "q8_0")
# Max |log p(llama.cpp) - log p(transformers)| over llama.cpp's top-10 next-token candidates of
# the probe prompts. f32 differs by llama.cpp's f16 KV cache and order of additions only; f16 and
# q8_0 round every weight matrix too (q8_0: 8-bit blocks of 32 with an f16 scale). Measured on
# the demo and the real-tokenizer fixtures, with a wide margin (docs/GGUF.md).
TOLERANCE = {"f32": 0.02, "f16": 0.05, "q8_0": 0.5}
SAMPLE_TEXTS = ["Review: the soup was awful\nSentiment:", "Hello, my name is",
                "The capital of France is", "  leading spaces, tabs\tand\n\nnewlines  ",
                "Numbers 3 33 333 3333, 3.14 and 1e-5; code: def f(x): return x**2",
                "Unicode: naïve café, Grüße, 日本語, emoji 🦙🚀"]
PROBE_PROMPTS = SAMPLE_TEXTS[:3]
PROBE_NEW_TOKENS = 8
SAMPLE_CHAT = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": "4"},
               {"role": "user", "content": "And 3+3?"}]
# llama.cpp's default when a GGUF has no tokenizer.ggml.add_bos_token, per tokenizer model.
_LLAMA_CPP_ADDS_BOS = {"llama": True, "gemma": True}


def converter_dir() -> Path:
    """Where `gguf setup` puts the converter: beside the installed package (inside the venv)."""
    default = Path(sys.prefix) / "share" / "sft_scale" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    return Path(os.environ.get("SFT_SCALE_GGUF_CONVERTER", default))


def require_converter() -> Path:
    path = converter_dir()
    if not (path / _MARKER).is_file():
        raise ConfigError(f"llama.cpp's GGUF converter is not installed (looked in {path}). "
                          "Install it once with `sft-scale gguf setup` (make install does this): "
                          f"it downloads llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}'s source "
                          "package from PyPI and keeps only the converter.")
    return path


def install_converter(dest: Path | None = None, sdist: Path | None = None) -> Path:
    """Extract the converter from llama-cpp-python's sdist (downloaded with pip unless given)."""
    dest = Path(dest or converter_dir())
    if (dest / _MARKER).is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise ConfigError("could not download llama-cpp-python=="
                                  f"{LLAMA_CPP_PYTHON_VERSION}'s source package with pip "
                                  f"(needs network once): {proc.stderr.strip()[-500:]}")
            sdist = found[0]
        digest = hashlib.sha256(Path(sdist).read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ConfigError(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} (the pinned "
                              f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source package)")
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=_mkdir(dest.parent)))
        try:
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if _wanted(m)]
                if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                    raise ConfigError(f"{sdist}: no {_VENDOR}convert_hf_to_gguf.py inside")
                for m in members:
                    target = staging / m.name[len(_VENDOR):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
            (staging / _MARKER).write_text(json.dumps(
                {"package": "llama-cpp-python", "version": LLAMA_CPP_PYTHON_VERSION,
                 "sdist_sha256": SDIST_SHA256, "path_in_sdist": _VENDOR}, indent=2) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _wanted(m: tarfile.TarInfo) -> bool:
    # Regular files under the vendored llama.cpp only: no links, no paths that climb out.
    if not m.isfile() or not m.name.startswith(_VENDOR) or ".." in Path(m.name).parts:
        return False
    rel = m.name[len(_VENDOR):]
    return rel in _KEEP_FILES or rel.startswith(_KEEP_DIRS)


def gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """True when the tokenizer splits text exactly as GPT-2 does before BPE: byte-level with
    GPT-2's regex, no prefix space, no normaliser. The embedded demo tokenizer is such a one (a
    byte-level BPE trained on the demo's text), which llama.cpp calls `gpt-2`."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tok = json.loads(path.read_text())
    pre = tok.get("pre_tokenizer") or {}
    return (tok.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def convert(model_dir: str | Path, outfile: str | Path, outtype: str = "f16",
            pre_tokenizer: str | None = None) -> Path:
    """Run llama.cpp's converter on a Hugging Face model folder; the file appears only whole."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF type {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: no config.json, so llama.cpp's converter cannot take it. "
                          "A LoRA adapter folder must be merged first: `sft-scale merge --adapter "
                          "DIR --out MERGED --gguf TYPE`, or `sft-scale export --run RUN --out DIR "
                          "--format gguf` from a checkpoint.")
    converter = require_converter()
    fallback = pre_tokenizer
    if fallback is None and gpt2_pre_tokenizer(model_dir):
        fallback = "gpt-2"
    tmp = outfile.with_name(f".{outfile.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, str(Path(__file__).with_name("gguf_convert.py")), str(converter)]
    cmd += ["--fallback-pre", fallback] if fallback else []
    cmd += ["--", str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    log.info("llama.cpp converter (llama-cpp-python %s): %s", LLAMA_CPP_PYTHON_VERSION,
             " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 64:
            raise ConfigError(
                f"{model_dir}: llama.cpp does not recognise this BPE tokenizer. Its converter "
                "names a tokenizer's pre-tokenizer (how text is split before BPE) by hashing the "
                "ids it gives for a fixed text, and this vocabulary is not in its list (a "
                "self-trained or modified tokenizer). If you know which pre-tokenizer it uses, "
                "pass --gguf-pre-tokenizer NAME (llama.cpp's names, e.g. llama-bpe for Llama-3, "
                "qwen2, gpt-2); the export then checks tokenisation against transformers.")
        if proc.returncode != 0 or not tmp.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise MergeError(f"llama.cpp's converter failed on {model_dir} (exit "
                             f"{proc.returncode}); nothing was written. Its last lines:\n{tail}")
        if fallback and "as requested" in proc.stderr:
            log.warning("%s: tokenizer not in llama.cpp's list; exported with pre-tokenizer %r "
                        "(%s)", model_dir, fallback, "given" if pre_tokenizer else
                        "its pre-tokenizer is exactly GPT-2's byte-level split")
        os.chmod(tmp, 0o644)
        os.replace(tmp, outfile)
    finally:
        tmp.unlink(missing_ok=True)
    return outfile


def read_metadata(gguf_path: Path) -> dict:
    """The GGUF's key/value metadata (arrays of tokens included) through the `gguf` reader."""
    from gguf import GGUFReader  # 0.3 s with numpy: not at CLI start (cli imports this module)

    reader = GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    meta["__tensors__"] = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    return meta


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def check_metadata(meta: dict, tokenizer, config) -> list[str]:
    """Differences between what llama.cpp will read and what transformers does."""
    problems = []
    arch = meta.get("general.architecture")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    n = min(len(tokens), len(tokenizer))
    hf_tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    bad = [i for i in range(n) if tokens[i] != hf_tokens[i]]
    if bad:
        i = bad[0]
        problems.append(f"{len(bad)} token strings differ from the tokenizer's, first id {i}: "
                        f"{tokens[i]!r} vs {hf_tokens[i]!r}")
    for name in ("bos", "eos"):
        hf_id = getattr(tokenizer, f"{name}_token_id")
        g_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if hf_id is not None and g_id != hf_id:
            problems.append(f"{name} id {g_id} in the GGUF, {hf_id} in the tokenizer")
    probe = tokenizer("a")["input_ids"]
    hf_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    g_bos = meta.get("tokenizer.ggml.add_bos_token",
                     _LLAMA_CPP_ADDS_BOS.get(meta.get("tokenizer.ggml.model"), False))
    if bool(g_bos) != hf_bos:
        problems.append(f"llama.cpp will {'add' if g_bos else 'not add'} a BOS token, the "
                        f"transformers tokenizer does {'' if hf_bos else 'not '}add one")
    template = tokenizer.chat_template
    if isinstance(template, str) and meta.get("tokenizer.chat_template") != template:
        problems.append("the chat template in the GGUF differs from the tokenizer's")
    theta = _rope_theta(config)
    g_theta = meta.get(f"{arch}.rope.freq_base")
    if theta is not None and (g_theta is None or abs(g_theta - theta) > 1e-6 * theta):
        problems.append(f"rope theta {g_theta} in the GGUF, {theta} in config.json")
    ctx = getattr(config, "max_position_embeddings", None)
    if ctx is not None and meta.get(f"{arch}.context_length") != ctx:
        problems.append(f"context length {meta.get(f'{arch}.context_length')} in the GGUF, "
                        f"{ctx} in config.json")
    return problems


class LlamaCpp:
    """A GGUF loaded by llama.cpp itself, in this process: xllamacpp, a prebuilt llama.cpp CPU
    build from PyPI (its server engine; the HTTP side listens on 127.0.0.1 only)."""

    def __init__(self, gguf: Path, n_ctx: int = 512, threads: int = 2):
        import xllamacpp  # 100 MB native library: loaded when a GGUF is checked, not at CLI start

        params = xllamacpp.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.cpuparams.n_threads = threads
        self.server = xllamacpp.Server(params)
        self.address = self.server.listening_address

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        # parse_special: the text of a special token ("<|eot_id|>") becomes that token, as a
        # transformers tokenizer does by default.
        req = urllib.request.Request(
            self.address + "/tokenize", headers={"Content-Type": "application/json"},
            data=json.dumps({"content": text, "add_special": add_special,
                             "parse_special": True}).encode())
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.load(resp)["tokens"]

    def complete(self, ids: list[int], n_new: int, top_k: int) -> tuple[list[int], dict]:
        """Greedy continuation of `ids`, and the log-probabilities of llama.cpp's top-k
        candidates for the first new token (before sampling)."""
        out = self.server.handle_completions({
            "prompt": ids, "n_predict": n_new, "temperature": 0.0, "top_k": 1,
            "n_probs": top_k, "post_sampling_probs": False, "cache_prompt": False, "seed": 0})
        content = out["choices"][0]["logprobs"]["content"]
        return ([c["id"] for c in content],
                {c["id"]: c["logprob"] for c in content[0]["top_logprobs"]})


def verify(model_dir: str | Path, gguf_path: str | Path, outtype: str,
           meta: dict | None = None) -> dict:
    """Compare the GGUF, as llama.cpp reads and runs it, with the model folder it was made from;
    raise MergeError on a mismatch. `meta`: the file's metadata if already read (the reader
    takes ~25 s for a 128k-token vocabulary)."""
    # torch and transformers load here only: the CLI imports this module at start-up.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    meta = meta or read_metadata(gguf_path)
    problems = check_metadata(meta, tokenizer, config)

    cpp = LlamaCpp(gguf_path)
    texts = list(SAMPLE_TEXTS)
    differ = [t for t in texts if cpp.tokenize(t) != tokenizer(t)["input_ids"]]
    spm_only = _sentencepiece_agrees(model_dir, cpp, tokenizer, differ)
    if spm_only:
        log.warning("%d sample text(s) tokenise differently in transformers than in the model's "
                    "own SentencePiece model, which llama.cpp follows exactly (e.g. %r): the "
                    "transformers tokenizer differs from SentencePiece there, not the GGUF",
                    len(spm_only), spm_only[0])
    if len(differ) > len(spm_only):
        bad = [t for t in differ if t not in spm_only]
        problems.append(f"{len(bad)}/{len(texts)} sample texts tokenise differently in "
                        f"llama.cpp, e.g. {bad[0]!r}")
    chat_equal = None
    if isinstance(tokenizer.chat_template, str):
        # A rendered chat holds its BOS as text already: no special tokens added.
        chat = tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=False,
                                             add_generation_prompt=True)
        chat_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        chat_equal = cpp.tokenize(chat, add_special=False) == chat_ids
        if not chat_equal:
            # Seen with SentencePiece tokenizers saved with legacy=False: llama.cpp starts the
            # text after every special token with a word-start marker, transformers does not.
            # The model then reads slightly different ids in llama.cpp than in training.
            log.warning("the rendered chat template tokenises differently in llama.cpp than in "
                        "transformers (text right after special tokens): served prompts will "
                        "differ slightly from the training ones; see docs/GGUF.md")

    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    diff, greedy_equal = 0.0, True
    for text in PROBE_PROMPTS:
        ids = tokenizer(text)["input_ids"]
        cpp_new, cpp_first = cpp.complete(ids, PROBE_NEW_TOKENS, top_k=10)
        with torch.no_grad():
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(ref(x).logits[0, -1].float(), -1)
            gen = ref.generate(x, max_new_tokens=PROBE_NEW_TOKENS, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        diff = max(diff, *(abs(lp - logprobs[i].item()) for i, lp in cpp_first.items()))
        greedy_equal &= _until(gen[0, len(ids):].tolist(), eos) == _until(cpp_new, eos)
    if diff > TOLERANCE[outtype]:
        problems.append(f"llama.cpp's next-token log-probabilities differ from transformers' by "
                        f"up to {diff:.3g} > {TOLERANCE[outtype]} ({outtype})")
    report = {"gguf": str(gguf_path), "model": str(model_dir), "outtype": outtype,
              "converter": f"llama.cpp via llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}",
              "architecture": meta.get("general.architecture"),
              "tokenizer_model": meta.get("tokenizer.ggml.model"),
              "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
              "chat_template": "tokenizer.chat_template" in meta,
              "tensors": len(meta["__tensors__"]),
              "sample_texts_tokenised_equal": f"{len(texts) - len(differ)}/{len(texts)}",
              "chat_tokenised_equal": chat_equal,
              "differ_from_transformers_as_sentencepiece_does": spm_only,
              "max_abs_logprob_diff": diff, "tolerance": TOLERANCE[outtype],
              "greedy_generations_equal": greedy_equal, "problems": problems}
    log.info("GGUF verification: %s", report)
    if problems:
        raise MergeError(f"{gguf_path.name} does not match {model_dir}: " + "; ".join(problems)
                         + "; the GGUF was not kept")
    if not greedy_equal:
        log.warning("greedy generations differ between llama.cpp (%s) and transformers, with "
                    "log-probabilities within tolerance (near-tied tokens)", outtype)
    return report


def _sentencepiece_agrees(model_dir: Path, cpp: LlamaCpp, tokenizer, texts: list[str]) -> list:
    """Of plain `texts` (no special tokens inside), those whose llama.cpp ids equal the ids of
    the folder's SentencePiece `tokenizer.model` itself: the official tokenizer, which
    llama.cpp implements and which transformers' converted fast tokenizer can differ from."""
    path = model_dir / "tokenizer.model"
    if not path.is_file() or not texts:
        return []
    # Not at the top: the CLI imports this module, and it must start (and model.open_tokenizer
    # name the missing package) where sentencepiece is missing.
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    bos = tokenizer("a")["input_ids"][:1] if tokenizer.bos_token_id is not None else []
    bos = bos if bos == [tokenizer.bos_token_id] else []
    return [t for t in texts if t in SAMPLE_TEXTS and cpp.tokenize(t) == bos + sp.encode(t)]


def _until(ids: list[int], stop: set) -> list[int]:
    """Tokens before the first stop token (transformers returns it, llama.cpp does not)."""
    return ids[:next((i for i, t in enumerate(ids) if t in stop), len(ids))]


def export_gguf(model_dir: str | Path, outtype: str = "f16", out: str | Path | None = None,
                pre_tokenizer: str | None = None) -> dict:
    """Convert, verify, keep: `model_dir/model-<outtype>.gguf` unless `out` names the file."""
    model_dir = Path(model_dir)
    outfile = Path(out) if out else model_dir / f"model-{outtype}.gguf"
    # A folder of its own, so that transformers reads the GGUF alone and not the model's files.
    staging = Path(tempfile.mkdtemp(prefix=f".{outfile.name}.", dir=_mkdir(outfile.parent)))
    try:
        staged = convert(model_dir, staging / outfile.name, outtype, pre_tokenizer)
        report = verify(model_dir, staged, outtype)
        os.replace(staged, outfile)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["gguf"] = str(outfile)
    (outfile.with_suffix(".gguf.json")).write_text(json.dumps(report, indent=2) + "\n")
    return report
