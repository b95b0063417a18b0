"""Where sft_scale's training step spends its time on this CPU: torch.profiler around the real
entry point (`sft_scale.train.main`) on the bench model and data, the top operators by self CPU
time, grouped into what limits the step (GEMMs, attention, optimizer, everything else).

    .venv/bin/python -m bench.profile --out docs/PROFILE.md [--threads 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.spec import default_spec, quick_spec

# Operator name fragments -> what they are, for the summary by kind.
KINDS = [
    ("GEMM (linear layers, LoRA, LM head)", ("aten::mm", "aten::addmm", "aten::bmm",
                                             "aten::matmul", "aten::linear")),
    ("attention (SDPA kernels)",
     ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("optimizer (AdamW)", ("_foreach_", "adam", "Optimizer.step")),
    ("elementwise / norms / activations", ("aten::mul", "aten::add", "aten::silu", "aten::pow",
                                           "aten::rsqrt", "aten::mean", "aten::neg", "aten::cat",
                                           "aten::sigmoid", "aten::exp", "aten::sub", "aten::div")),
    ("memory (copies, new tensors)", ("aten::copy_", "aten::empty", "aten::zeros", "aten::clone",
                                      "aten::to", "aten::contiguous", "aten::fill_")),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other (Python-side ops, indexing, views)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="markdown report (default: print)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="the tiny --quick bench model")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.data import prepare
    from bench.sft import sft_argv, write_config
    from sft_scale import train

    torch.set_num_threads(args.threads)
    spec = quick_spec(args.steps) if args.quick else default_spec(args.steps)
    work = Path(tempfile.mkdtemp(prefix="sft_profile_"))
    spec, _ = prepare(spec, work)
    config = write_config(spec, work / "bench.yaml")
    argv_train = sft_argv(config, work / "out", args.sets)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rc = train.main(argv_train)
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"bench.profile: training failed with exit code {rc}", file=sys.stderr)
        return rc
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    command = "python -m bench.profile " + shlex.join(argv if argv is not None else sys.argv[1:])
    L = ["# Profile: where sft_scale's training time goes (CPU)\n",
         f"Command: `.venv/bin/{command}` ({spec.parameters:,}-parameter bench model, "
         f"{spec.train.steps} steps, {args.threads} thread(s); the whole run under "
         f"torch.profiler: {wall:.1f} s wall, {total / 1e6:.1f} s of profiled operator self "
         "time, model loading and saving included).\n",
         "## By kind\n", "| kind | self CPU s | share |", "|---|---|---|"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        L.append(f"| {kind} | {us / 1e6:.2f} | {us / total:.0%} |")
    L += ["", f"## Top {args.top} operators by self CPU time\n",
          "| operator | kind | calls | self CPU s | share |", "|---|---|---|---|---|"]
    for e in top:
        L.append(f"| `{e.key}` | {kind_of(e.key)} | {e.count} | "
                 f"{e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} |")
    text = "\n".join(L) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"bench.profile: wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
