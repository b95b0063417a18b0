"""Where sft_scale's training step spends its time on this CPU: the real entry point
(`sft_scale.train.main`) on the bench model and data, each operator's time, the top operators,
and their sum by what limits the step (GEMMs, attention, optimizer, everything else).

    .venv/bin/python -m bench.profile --out docs/PROFILE.md [--threads 1] [--set KEY=VALUE ...]
                                      [--timer dispatch|profiler]

Two timers. `dispatch` (the default) times every aten operator where it runs, with a clock read
before and after it (a TorchDispatchMode): the operators' times are their own and add up to the
steps' time. `profiler` is torch.profiler's self CPU time. On 2026-12-02, minutes after this VM
booted (an Intel Xeon with AVX-512; memory the guest had never touched cost ~11 us per 4 KiB page
to fault in, against ~0.7 us once touched), a profiled run took 2.0 s per step against 0.75 s
unprofiled, and memory-bound operators (elementwise ops over [tokens, 1376] tensors) 10-30x their
unprofiled time, so its profile put 32% of the time in elementwise ops where the dispatch timer,
at the same moment, found about 15%. An hour later both timers agreed. The report states the
steps' time under the timer and what its operators add up to: steps far slower than an untimed
run's (bench.run's tokens/s) mean the timer changed what it measured.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict
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
                                           "aten::sigmoid", "aten::exp", "aten::sub", "aten::div",
                                           "aten::addcmul", "aten::sum")),
    ("memory (copies, new tensors)", ("aten::copy_", "aten::empty", "aten::zeros", "aten::clone",
                                      "aten::to", "aten::contiguous", "aten::fill_",
                                      "slice_backward", "aten::new_zeros")),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "nll_loss", "cross_entropy")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other (Python-side ops, indexing, views)"


def aten_name(func) -> str:
    """`aten.mm.default` (an OpOverload) -> `aten::mm`, the profiler's spelling."""
    packet = getattr(func, "overloadpacket", None)
    name = str(packet if packet is not None else func)
    return name.replace(".", "::", 1)


def op_timer():
    """A TorchDispatchMode that adds up each aten operator's time by (name, input shapes).

    `mode.ops` maps (name, shapes) -> [calls, seconds]. Timed where the operator runs, so the
    times are the operators' own; the mode's bookkeeping (a few microseconds per call) is outside
    them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpTimer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[tuple[str, tuple], list] = defaultdict(lambda: [0, 0.0])

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            dt = time.perf_counter() - t0
            shapes = tuple(tuple(a.shape) for a in args if hasattr(a, "shape"))
            entry = self.ops[(aten_name(func), shapes)]
            entry[0] += 1
            entry[1] += dt
            return out

    return OpTimer()


def dispatch_rows(ops: dict) -> list[tuple[str, str, int, float]]:
    """(operator, shapes, calls, seconds) rows from an op_timer's table."""
    return [(name, " ".join("x".join(map(str, sh)) for sh in shapes) or "-", n, sec)
            for (name, shapes), (n, sec) in ops.items()]


def profiler_rows(prof) -> list[tuple[str, str, int, float]]:
    return [(e.key, "", e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()
            if e.self_cpu_time_total > 0]


def report(rows, *, command: str, spec, threads: int, wall: float, steps_s: float | None,
           timer: str, top: int) -> str:
    """The markdown report: by kind, then the top operators (by name and input shapes for the
    dispatch timer)."""
    total = sum(r[3] for r in rows)
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, _, n, sec in rows:
        by_kind[kind_of(name)] += sec
        by_name[name][0] += n
        by_name[name][1] += sec
    what = ("every aten operator timed where it runs (dispatch timer)" if timer == "dispatch"
            else "torch.profiler's self CPU time")
    steps = f"; the training steps took {steps_s:.2f} s" if steps_s is not None else ""
    L = ["# Profile: where sft_scale's training time goes (CPU)\n",
         f"Command: `.venv/bin/{command}` ({spec.parameters:,}-parameter bench model, "
         f"{spec.train.steps} steps, {threads} thread(s)). Timer: {what}. The whole run (model "
         f"loading and saving included) took {wall:.1f} s{steps}; its operators' times add up to "
         f"{total:.2f} s.\n",
         "## By kind\n", "| kind | seconds | share |", "|---|---|---|"]
    for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        L.append(f"| {kind} | {sec:.2f} | {sec / total:.0%} |")
    L += ["", f"## Top {top} operators\n", "| operator | kind | calls | seconds | share |",
          "|---|---|---|---|---|"]
    for name, (n, sec) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        L.append(f"| `{name}` | {kind_of(name)} | {n} | {sec:.2f} | {sec / total:.0%} |")
    if timer == "dispatch":
        L += ["", f"## Top {top} operators by input shapes\n",
              "| operator | input shapes | calls | ms per call | seconds | share |",
              "|---|---|---|---|---|---|"]
        for name, shapes, n, sec in sorted(rows, key=lambda r: -r[3])[:top]:
            L.append(f"| `{name}` | {shapes} | {n} | {sec / n * 1e3:.3f} | {sec:.2f} | "
                     f"{sec / total:.0%} |")
    return "\n".join(L) + "\n"


def steps_seconds(out: Path) -> float | None:
    """The training steps' own time, from the run's metrics.jsonl (step_time_s per step)."""
    import json

    try:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    except OSError:
        return None
    times = [r["step_time_s"] for r in recs if "step_time_s" in r]
    return sum(times) if times else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="markdown report (default: print)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="the tiny --quick bench model")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--timer", choices=("dispatch", "profiler"), default="dispatch")
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
    timer = op_timer() if args.timer == "dispatch" else profile(activities=[ProfilerActivity.CPU])
    t0 = time.perf_counter()
    with timer:
        rc = train.main(argv_train)
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"bench.profile: training failed with exit code {rc}", file=sys.stderr)
        return rc
    rows = dispatch_rows(timer.ops) if args.timer == "dispatch" else profiler_rows(timer)
    command = "python -m bench.profile " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report(rows, command=command, spec=spec, threads=args.threads, wall=wall,
                  steps_s=steps_seconds(work / "out"), timer=args.timer, top=args.top)
    if args.out:
        Path(args.out).write_text(text)
        print(f"bench.profile: wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
