"""On a GPU: `sft-scale plan`'s estimate against torch.cuda.max_memory_allocated of real training
steps (issue 8, validation on GPU). A ~1B-parameter Llama built from its config (random init),
bf16, seq 1024: LoRA with and without gradient checkpointing, and full fine-tuning.

    python bench/plan_gpu_check.py --out $OUT/plan_gpu.md

Writes a markdown table (estimate, measured, ratio per case and micro-batch) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] == str(ROOT / "bench"):
    # Run as a script: bench/ is first on the path, and its profile.py would shadow the standard
    # library's (cProfile imports it, under transformers' modeling code); the repo root instead.
    sys.path[0] = str(ROOT)
LLAMA_1B = {  # Llama-3.2-1B's shape with a 32k vocabulary: 1.0B parameters
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
CASES = {
    "LoRA r=16, bf16": ["lora.r=16"],
    "LoRA r=16, bf16, grad. checkpointing": ["lora.r=16", "training.gradient_checkpointing=true"],
    "full fine-tuning, bf16": ["lora.enabled=false"],
}


def main() -> None:
    import torch

    from bench.plan_measure import measure_peak_cuda
    from sft_scale.config import load_config
    from sft_scale.preflight.plan import GiB, estimate

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="plan_gpu.md")
    ap.add_argument("--micro", default="1,2,4")
    args = ap.parse_args()
    micro = [int(m) for m in args.micro.split(",")]
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(LLAMA_1B))
    rows = ["| case | micro-batch | estimated GiB | measured GiB | measured / estimated |",
            "|---|---|---|---|---|"]
    for name, sets in CASES.items():
        cfg = load_config(ROOT / "examples" / "demo.yaml",
                          [f"model.name_or_path={model_dir}", "model.dtype=bf16",
                           "data.max_seq_len=1024", "model.attn_implementation=sdpa", *sets])
        for m in measure_peak_cuda(cfg, micro, steps=2):
            est = estimate(cfg, 1, 139 * GiB, micro_batch=m["micro_batch"],
                           overhead_bytes=0)["rows"][0]["total"]
            rows.append(f"| {name} | {m['micro_batch']} | {est / GiB:.2f} | "
                        f"{m['increase'] / GiB:.2f} | {m['increase'] / est:.2f} |")
            print(rows[-1], flush=True)
    text = (f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
            "`python bench/plan_gpu_check.py`\n\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
