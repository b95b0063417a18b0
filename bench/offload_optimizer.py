"""The ZeRO-2 offloaded optimizer step on CPU: DeepSpeed's CPU Adam against torch AdamW.

    .venv/bin/python -m bench.offload_optimizer [--rounds 3] [--steps 6] [--out FILE.md]

`ds_configs/zero2_offload.json` used to say `"zero_force_ds_cpu_optimizer": false`, which keeps
Accelerate from swapping our torch AdamW for DeepSpeedCPUAdam; it now says "auto" (CPU Adam where
its op builds). Each variant runs as sft_scale trains (make_accelerator + build_optimizer +
accelerator.prepare under the resolved offload config, one process, gloo) on a random-init Llama,
full fine-tuning in fp32, so every parameter goes through the offloaded step. A fresh process per
variant and round, the variants interleaved (A B A B ...), so a change in the machine's load hits
both; the ratio of the medians is the result, with the load average recorded before and after.
The CPU Adam op must be built (JIT, cached in TORCH_EXTENSIONS_DIR); the first variant that
needs it pays the build, outside the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1408,
         "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8000}
SEQ, MICRO = 128, 2


def worker(force: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sft_scale.config import load_config
    from sft_scale.preflight.deepspeed import DS_CONFIG_DIR, load_ds_config, resolve_ds_config
    from sft_scale.training.distributed import make_accelerator
    from sft_scale.training.loop import build_optimizer

    cfg = load_config(ROOT / "examples" / "demo.yaml",
                      ["lora.enabled=false", f"training.micro_batch_size={MICRO}",
                       "distributed.zero=2", "distributed.offload=true"])
    ds = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / "zero2_offload.json")), cfg, 1,
                           SHAPE["hidden_size"])
    ds["zero_force_ds_cpu_optimizer"] = force
    ds["zero_optimization"]["offload_optimizer"]["pin_memory"] = False  # no CUDA to pin for
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
    accelerator = make_accelerator(cfg, ds)
    started = time.time()
    model, _ = accelerator.prepare(model, build_optimizer(model, cfg))
    prepare_s = time.time() - started
    engine = accelerator.deepspeed_engine_wrapped.engine
    base = type(engine.optimizer.optimizer).__name__  # what runs the offloaded step
    ids = torch.randint(SHAPE["vocab_size"], (MICRO, SEQ))
    fwd_bwd, opt = [], []
    for i in range(steps + 1):  # the first step is warm-up
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if i:
            fwd_bwd.append(t1 - t0)
            opt.append(t2 - t1)
    params = sum(p.numel() for p in model.parameters())
    accelerator.end_training()
    return {"force": force, "optimizer": base, "params": params, "prepare_s": prepare_s,
            "fwd_bwd_s": statistics.median(fwd_bwd), "opt_s": statistics.median(opt),
            "step_s": statistics.median(a + b for a, b in zip(fwd_bwd, opt, strict=True)),
            "loss": float(loss)}


def run_variant(force: bool, steps: int) -> dict:
    code = (f"import json, bench.offload_optimizer as b; "
            f"print('RESULT ' + json.dumps(b.worker({force}, {steps})))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          check=False, text=True, timeout=3600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"variant force={force} failed:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per process")
    ap.add_argument("--out", default=None, help="also write the markdown section here")
    args = ap.parse_args(argv)
    load0, t0 = loadavg(), time.time()
    runs = {True: [], False: []}
    for _ in range(args.rounds):
        for force in (True, False):
            r = run_variant(force, args.steps)
            runs[force].append(r)
            print(json.dumps(r), flush=True)
    load1 = loadavg()
    med = {f: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "opt_s", "fwd_bwd_s")}
           for f, rs in runs.items()}
    ds_opt, torch_opt = runs[True][0]["optimizer"], runs[False][0]["optimizer"]
    rows = [(f"{'DeepSpeed CPU Adam' if f else 'torch AdamW'} ({runs[f][0]['optimizer']})", f)
            for f in (True, False)]
    lines = [
        "## ZeRO-2 offload: the optimizer step in DeepSpeed's CPU Adam vs torch AdamW (CPU)",
        "",
        "Written by `bench/offload_optimizer.py` (not by bench/run.py):",
        "",
        "```bash",
        f".venv/bin/python -m bench.offload_optimizer --rounds {args.rounds} --steps {args.steps}",
        "```",
        "",
        f"Random-init Llama, {runs[True][0]['params']:,} parameters (hidden "
        f"{SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers), full fine-tuning in "
        f"fp32, micro-batch {MICRO} x {SEQ} tokens, one process under ZeRO-2 with the optimizer "
        "offloaded (`ds_configs/zero2_offload.json`), as sft_scale trains. Each variant in a "
        f"fresh process per round, interleaved, {args.rounds} rounds x {args.steps} timed steps; "
        "medians. " + f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads default; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}.",
        "",
        f"> Shared machine: load average {load0} at the start, {load1} at the end, on "
        f"{os.cpu_count()} cores (other jobs ran). Absolute times are inflated by that load; the "
        "ratio, taken from interleaved runs in the same window, is the result.",
        "",
        "| offloaded optimizer | step s (median) | optimizer step s | forward+backward s |",
        "|---|---|---|---|",
    ]
    for name, f in rows:
        lines.append(f"| {name} | {med[f]['step_s']:.3f} | {med[f]['opt_s']:.3f} | "
                     f"{med[f]['fwd_bwd_s']:.3f} |")
    lines += ["",
              f"CPU Adam's optimizer step is **{med[False]['opt_s'] / med[True]['opt_s']:.2f}x** "
              f"as fast as torch AdamW's ({ds_opt} vs {torch_opt}); the whole step "
              f"**{med[False]['step_s'] / med[True]['step_s']:.2f}x**.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
