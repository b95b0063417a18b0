"""GGUF export through llama.cpp's own converter, checked from outside: the file is read back with
the `gguf` reader (metadata, tensor names, shapes and values) and run by llama.cpp itself
(xllamacpp, a prebuilt llama.cpp), whose tokens and greedy answers must equal transformers'."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_scale.errors import ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.tools.gguf_export import SAMPLE_TEXTS, LlamaCpp, convert, export_gguf, verify
from tests.families import FAMILY
from tests.helpers import ROOT, run_train

pytestmark = pytest.mark.slow


def fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def tensor(reader, name) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t.data, t.tensor_type)


@pytest.mark.parametrize("name,outtype,arch,tok_model,pre", [
    ("llama", "f32", "llama", "gpt2", "llama-bpe"),     # Llama-3's tiktoken-derived BPE
    ("mistral", "q8_0", "llama", "llama", "default"),   # Mistral v3 SentencePiece
])
def test_real_tokenizer_family_exports_a_gguf_that_llama_cpp_reads_as_transformers_does(
        family_model, tmp_path, name, outtype, arch, tok_model, pre):
    model_dir = family_model(name)
    fam = FAMILY[name]
    out = convert(model_dir, tmp_path / f"{name}.gguf", outtype)
    meta, reader = fields(out)  # read once, here, and handed to verify (25 s for 128k tokens)
    report = verify(model_dir, out, outtype, meta={**meta, "__tensors__": {
        t.name: [int(x) for x in t.shape] for t in reader.tensors}})
    equal, total = map(int, report["sample_texts_tokenised_equal"].split("/"))
    # A SentencePiece family may differ from transformers only where SentencePiece itself does.
    assert total - equal == len(report["differ_from_transformers_as_sentencepiece_does"])
    assert fam.sentencepiece or equal == total
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())

    assert meta["general.architecture"] == arch
    assert meta["tokenizer.ggml.model"] == tok_model
    assert meta.get("tokenizer.ggml.pre", "default") == pre
    assert meta["tokenizer.ggml.tokens"][:len(tok)] == tok.convert_ids_to_tokens(range(len(tok)))
    assert meta["tokenizer.ggml.bos_token_id"] == tok.convert_tokens_to_ids(fam.bos)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids(fam.eos)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(
        cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    assert meta[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert meta[f"{arch}.block_count"] == cfg["num_hidden_layers"]

    weights = load_file(str(model_dir / "model.safetensors"))
    n_layers = cfg["num_hidden_layers"]
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{p}.weight" for i in range(n_layers) for p in per_layer}
    assert {t.name for t in reader.tensors} == expected
    # Values: tensors llama.cpp does not permute, dequantized, against the safetensors.
    tol = 0 if outtype == "f32" else 0.01
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")]:
        hf = weights[hf_name].numpy()
        np.testing.assert_allclose(tensor(reader, gguf_name).reshape(hf.shape), hf, atol=tol)

    # llama.cpp's own tokenizer, with special tokens: BOS exactly where the tokenizer adds one.
    # The reference for a SentencePiece family is its tokenizer.model itself: transformers'
    # converted tokenizer differs from it on runs of spaces (measured, docs/GGUF.md).
    cpp = LlamaCpp(out, n_ctx=512, threads=1)
    if fam.sentencepiece:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        want = [[tok.bos_token_id] + sp.encode(t) for t in SAMPLE_TEXTS]
    else:
        want = [tok(t)["input_ids"] for t in SAMPLE_TEXTS]
    assert [cpp.tokenize(t) for t in SAMPLE_TEXTS] == want
    # The rendered chat: equal for Llama-3; for the SentencePiece family llama.cpp puts a
    # word-start marker after each special token and transformers (legacy=False) does not.
    assert report["chat_tokenised_equal"] is (not fam.sentencepiece)


def test_demo_model_exports_as_gpt2_pre_tokenizer_and_llama_cpp_answers_like_transformers(
        tmp_path):
    model_dir = resolve_model_path("builtin:tiny-llama")
    out = tmp_path / "demo.gguf"
    report = export_gguf(model_dir, "f32", out=out)
    assert report["pre_tokenizer"] == "gpt-2"
    assert report["max_abs_logprob_diff"] <= report["tolerance"] == 0.02
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cpp = LlamaCpp(out, n_ctx=256, threads=1)
    prompts = [json.loads(x)["prompt"] for x in
               (ROOT / "sft_scale" / "assets" / "demo_eval.jsonl").read_text().splitlines()[:10]]
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert cpp.tokenize(p) == ids
        cpp_new, first = cpp.complete(ids, 6, top_k=5)
        with torch.no_grad():
            x = torch.tensor([ids])
            lp = torch.log_softmax(hf(x).logits[0, -1], -1)
            gen = hf.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_new = [t for t in gen[0, len(ids):].tolist() if t != tok.eos_token_id]
        assert cpp_new[:len(hf_new)] == hf_new
        assert max(abs(v - lp[i].item()) for i, v in first.items()) < 0.02


def test_unknown_bpe_tokenizer_is_refused_with_what_to_do(tmp_path):
    """A byte-level BPE that is not exactly GPT-2's split (here: with a prefix space) is neither
    in llama.cpp's list nor guessed: the error says why and names the option."""
    import shutil
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConfigError, match="does not recognise this BPE tokenizer.*"
                       "--gguf-pre-tokenizer NAME"):
        export_gguf(model_dir, "f16", out=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and list(tmp_path.iterdir()) == [model_dir]


def test_export_format_gguf_merges_a_lora_run_and_writes_a_verified_gguf(tmp_path):
    run = tmp_path / "run"
    run_train(run, "training.max_steps=4", "training.warmup_steps=1",
              "training.micro_batch_size=4")
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "sft_scale.cli", "export", "--run", str(run),
                           "--out", str(out), "--format", "gguf", "--gguf-type", "q8_0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "GGUF written" in proc.stdout
    # A model folder llama.cpp's converter takes, the merge report, and the GGUF with its report.
    for f in ("config.json", "model.safetensors", "merge_report.json", "model-q8_0.gguf",
              "model-q8_0.gguf.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "model-q8_0.gguf.json").read_text())
    assert report["max_abs_logprob_diff"] <= report["tolerance"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
