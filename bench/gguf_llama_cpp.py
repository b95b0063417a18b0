"""llama.cpp's own inference on our GGUF export vs transformers on the model folder it came from.

    python bench/gguf_llama_cpp.py --model MERGED_DIR [--types f32 f16 q8_0] [--n 100]
                                   [--json docs/GGUF.json]

For each GGUF type, `sft-scale gguf convert` (llama.cpp's converter, verified on a few probes)
writes the file, then llama.cpp runs it in this process through xllamacpp (a prebuilt llama.cpp
CPU build on PyPI; nothing is compiled here). On the first N prompts of the demo's evaluation set
(or --prompts FILE.jsonl with a "prompt" field), it compares:
- tokens: llama.cpp's /tokenize (with special tokens, as llama.cpp adds them) vs the tokenizer;
- greedy continuations (--max-new-tokens, temperature 0) token by token;
- next-token log-probabilities of llama.cpp's top-K candidates vs log_softmax of transformers'
  logits at the same ids: logprobs, not raw logits, because llama.cpp's server reports those
  (a shift common to a whole row cancels; the differences measured are the model's).
Results go to stdout and, with --json, to a file (docs/GGUF.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# After the sys.path line above: run as a script, bench/ is on the path but the repo root is not.
from sft_scale.tools.gguf_export import LLAMA_CPP_PYTHON_VERSION, LlamaCpp, export_gguf  # noqa: E402


def load_prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["prompt"] for r in rows[:n]]


def compare(model_dir: Path, outtype: str, prompts: list[str], n_new: int, top_k: int,
            threads: int, tmp: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t0 = time.time()
    report = export_gguf(model_dir, outtype, out=tmp / f"model-{outtype}.gguf")
    convert_s = time.time() - t0
    cpp = LlamaCpp(Path(report["gguf"]), n_ctx=512, threads=threads)
    eos = set(hf.generation_config.eos_token_id if isinstance(
        hf.generation_config.eos_token_id, list) else [hf.generation_config.eos_token_id])
    tok_equal = greedy_equal = 0
    max_lp = 0.0
    first_diff = None
    for p in prompts:
        ids = tok(p)["input_ids"]
        tok_equal += cpp.tokenize(p) == ids
        cpp_new, cpp_first = cpp.complete(ids, n_new, top_k)
        with torch.no_grad():
            x = torch.tensor([ids])
            logprobs = torch.log_softmax(hf(x).logits[0, -1].float(), -1)
            gen = hf.generate(x, max_new_tokens=n_new, do_sample=False,
                              pad_token_id=tok.pad_token_id or tok.eos_token_id)
        hf_new = gen[0, len(ids):].tolist()
        # transformers keeps the EOS it stopped at; llama.cpp's server does not report it.
        hf_cut = hf_new[:next((i for i, t in enumerate(hf_new) if t in eos), len(hf_new))]
        cpp_cut = cpp_new[:next((i for i, t in enumerate(cpp_new) if t in eos), len(cpp_new))]
        same = hf_cut == cpp_cut
        greedy_equal += same
        if not same and first_diff is None:
            first_diff = {"prompt": p, "transformers": tok.decode(hf_cut),
                          "llama.cpp": tok.decode(cpp_cut)}
        max_lp = max(max_lp, max(abs(lp - logprobs[i].item()) for i, lp in cpp_first.items()))
    return {"outtype": outtype, "prompts": len(prompts),
            "tokenisation_equal": tok_equal, "greedy_equal": greedy_equal,
            "max_new_tokens": n_new, "top_k_logprobs": top_k,
            "max_abs_next_token_logprob_diff": max_lp, "first_greedy_difference": first_diff,
            "verification_max_abs_logprob_diff": report["max_abs_logprob_diff"],
            "pre_tokenizer": report["pre_tokenizer"], "convert_and_verify_s": round(convert_s, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder (merged)")
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    ap.add_argument("--prompts", default=str(ROOT / "sft_scale" / "assets" / "demo_eval.jsonl"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import xllamacpp

    prompts = load_prompts(Path(args.prompts), args.n)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.types:
            r = compare(Path(args.model), outtype, prompts, args.max_new_tokens, args.top_k,
                        args.threads, Path(tmp))
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "converter": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist",
             "llama_cpp": f"xllamacpp {xllamacpp.__version__}", "results": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
