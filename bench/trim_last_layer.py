"""`training.trim_last_layer` on against off, as one A/B in one process: the bench model and data
(bench/spec.py, bench/data.py), packed micro-batches as sft_scale collates them, the fused LoRA
node, the chunked loss; one forward + backward per micro-batch with the trimmed model and one
with an identical untrimmed copy, back to back, in alternating order. Whole-run rounds
(bench/run.py) see this effect through +-8% of drift between runs; here both sides of each pair
run within seconds of each other on the same batch, so the ratio is the effect itself.

    python -m bench.trim_last_layer --rounds 6 --threads 1 --out docs/TRIM_LAST_LAYER.md

Reports the median [min-max] of per-round ratios (untrimmed time / trimmed time over all
micro-batches of the round), next to what the FLOP count predicts (bench/flops.py with and
without `trained_only_last_layer`, the LoRA epoch's GEMM work).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.rounds import fmt, stats
from bench.spec import default_spec, quick_spec


def micro_batches(spec):
    from bench.data import encode, load_tokenizer
    from sft_scale.data.collate import collate_packed

    tok = load_tokenizer(spec.model_dir)
    examples = [encode(tok, json.loads(line))
                for line in Path(spec.data_file).read_text().splitlines() if line.strip()]
    m = spec.train.micro_batch_size
    return [collate_packed(examples[i:i + m]) for i in range(0, len(examples), m)]


def models(spec):
    """(untrimmed, trimmed): the bench's LoRA model as sft_scale builds it, twice."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_scale.config import load_config
    from sft_scale.training import attention, lora_kernel, trained_rows
    from sft_scale.training.model import wrap_lora

    attention.register_packed_sdpa()
    cfg = load_config(spec.sft_config)
    torch.manual_seed(spec.train.seed)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32,
                                                 attn_implementation=attention.PACKED_SDPA,
                                                 use_safetensors=True)
    model = wrap_lora(model, cfg, kernel=lora_kernel.FUSED)
    model.train()
    trimmed = copy.deepcopy(model)
    names, _ = trained_rows.install(trimmed.get_base_model())
    return model, trimmed, names


def step_seconds(model, batch) -> float:
    from sft_scale.training.attention import packed_forward
    from sft_scale.training.loss import summed_loss

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with packed_forward(batch):
        loss = summed_loss(model, batch, "chunked")
    loss.backward()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trim_last_layer",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the tiny --quick bench model")
    ap.add_argument("--out", default=None, help="markdown report (default: print)")
    args = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    import torch

    from bench.data import prepare
    from bench.flops import workload_for
    from bench.sft import write_config

    torch.set_num_threads(args.threads)
    spec = quick_spec() if args.quick else default_spec()
    work = Path(tempfile.mkdtemp(prefix="sft_trim_"))
    spec, _ = prepare(spec, work)
    spec.sft_config = str(write_config(spec, work / "bench.yaml"))
    batches = micro_batches(spec)
    full, trimmed, names = models(spec)
    for b in batches:  # warm-up: allocations, lazy init
        step_seconds(full, b), step_seconds(trimmed, b)
    per_round = []
    for r in range(args.rounds):
        t_full = t_trim = 0.0
        for i, b in enumerate(batches):
            pair = (full, trimmed) if (r + i) % 2 == 0 else (trimmed, full)
            for model in pair:
                s = step_seconds(model, b)
                if model is full:
                    t_full += s
                else:
                    t_trim += s
        per_round.append((t_full, t_trim))
        print(f"[round {r + 1}] untrimmed {t_full:.2f} s, trimmed {t_trim:.2f} s: "
              f"{t_full / t_trim:.3f}x", flush=True)
    w_trim, w_full = workload_for(spec), workload_for(spec, trained_only_last_layer=False)
    model_cfg = json.loads((Path(spec.model_dir) / "config.json").read_text())
    predicted = w_full.flops / w_trim.flops
    command = "python -m bench.trim_last_layer " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    s = stats([a / b for a, b in per_round])
    text = "\n".join([
        "# trim_last_layer: on against off (one process, back-to-back pairs)\n",
        f"Command: `.venv/bin/{command}` (torch {torch.__version__}, {args.threads} thread(s); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n",
        f"Model: the bench's {spec.parameters:,}-parameter Llama ({model_cfg['num_hidden_layers']} "
        f"layers), LoRA r={spec.train.lora_r} all-linear, fused node, chunked loss; data: the "
        f"bench's {len(batches)} packed micro-batches of {spec.train.micro_batch_size} examples "
        f"({spec.real_tokens:,} tokens, {w_trim.trained_tokens:,} trained). Trimmed modules: "
        f"{', '.join(names)}.\n",
        "| round | untrimmed s | trimmed s | speed-up |", "|---|---|---|---|",
        *[f"| {i + 1} | {a:.2f} | {b:.2f} | {a / b:.3f}x |" for i, (a, b) in enumerate(per_round)],
        "",
        f"**Speed-up, median [min–max] over rounds: {fmt(s)}.** The FLOP count "
        f"predicts {predicted:.3f}x for the LoRA epoch's GEMM work ({w_full.flops / 1e9:.1f} "
        f"against {w_trim.flops / 1e9:.1f} GFLOP).\n"])
    if args.out:
        Path(args.out).write_text(text)
        print(f"bench.trim_last_layer: wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
