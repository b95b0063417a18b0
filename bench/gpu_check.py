"""GPU check for one device call (bench/gpu_check.sh runs it): bf16, 8-bit and 4-bit LoRA on a ~1B
Llama config (random init, the builtin tokenizer), sft_scale against TRL on the same model, data
and steps, with the model's bare training step as the ceiling.

    python -m bench.gpu_check --out $OUT                # on the GPU machine
    python -m bench.gpu_check --dry-run --out /tmp/g    # here: a tiny model on CPU, same code

Per method: real tokens/s over the timed steps; MFU the way the CPU bench computes it
(bench/flops.py): the model FLOPs a LoRA step must do per token, counted exactly for this model
and data, x tokens/s / the dense bf16 GEMM throughput measured on this device in this run, at the
model's own matrix shapes (before the first method and after the last; their mean), and "of
limit" against the least time those GEMMs take at the measured throughput; also 6 * N * tokens/s
against the H200's datasheet 989e12 bf16 dense, for comparison with published figures; and
torch.cuda.max_memory_allocated. Everything runs in this one process (the imports are paid once);
the CUDA peak-memory counter is reset before each method. Writes gpu_check.json and
gpu_check.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from bench.spec import DataSpec, ModelSpec, Spec, TrainSpec, quick_spec

PEAK_BF16 = 989e12  # H200 SXM dense bf16, datasheet (device docs H200.md)

# (name, kind, options). Order = priority: later ones are skipped when the time budget runs out.
METHODS = [
    ("bare_step_bf16", "bare", {}),
    ("sft_scale_bf16", "sft", {"set": ["model.dtype=bf16", "data.packing=true"]}),
    # The chunked loss (auto without liger-kernel) against the standard one under bf16. (The
    # chunked loss once crashed under bf16 + LoRA: float hidden states against a bf16 LM head.)
    ("sft_scale_bf16_standard_loss", "sft", {"set": ["model.dtype=bf16", "data.packing=true",
                                                     "training.loss=standard"]}),
    ("trl_packing_bf16", "trl", {"packing": True, "dtype": "bfloat16", "bf16": None}),
    ("sft_scale_8bit", "sft", {"set": ["model.dtype=bf16", "data.packing=true",
                                        "quantization.load_in_8bit=true"]}),
    ("sft_scale_4bit", "sft", {"set": ["model.dtype=bf16", "data.packing=true",
                                        "quantization.load_in_4bit=true"]}),
    ("trl_packing_8bit", "trl", {"packing": True, "dtype": "bfloat16", "bf16": None,
                                  "load_in_8bit": True}),
    ("trl_defaults_bf16", "trl", {"dtype": "bfloat16", "bf16": None}),
    ("sft_scale_bf16_default", "sft", {"set": ["model.dtype=bf16"]}),
]


def gpu_spec(dry_run: bool) -> Spec:
    if dry_run:  # the --quick shapes: checks the code path, measures nothing
        return dataclasses.replace(quick_spec(steps=3), name="gpu-dry")
    # TinyLlama-1.1B's shape with the builtin tokenizer's small vocabulary: ~0.97B parameters.
    return Spec(name="gpu-1b",
                model=ModelSpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4,
                                max_position_embeddings=2048),
                data=DataSpec(max_seq_len=1024, instruction_median=40, input_median=64,
                              output_median=160),
                train=TrainSpec(micro_batch_size=16, steps=12, warmup_steps_excluded=2))


def build_model_dir_gpu(spec: Spec, root: Path, device: str) -> Path:
    """The random-init Llama as a bf16 folder, initialised on the device (seconds, not minutes)."""
    import torch
    from transformers import LlamaForCausalLM

    from bench.data import llama_config, load_tokenizer

    target = root / f"llama-{spec.name}"
    if (target / "config.json").exists():
        return target
    tok = load_tokenizer()
    config = llama_config(spec, tok)
    torch.manual_seed(spec.data.seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    del model
    return target


def run_bare_gpu(spec: Spec, device: str) -> dict:
    """The ceiling: the same bf16 PEFT model on full rows of the data's tokens (micro-batch x
    mean example length, no padding), forward + backward + AdamW."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.measure import Meter
    from bench.worker import lora_config

    t = spec.train
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    model = get_peft_model(model, lora_config(spec))
    model.train()
    meter = Meter(spec.pad_token_id)
    meter.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=t.learning_rate)
    vocab = model.config.vocab_size
    meter.begin()
    for _ in range(t.steps):
        for _ in range(t.gradient_accumulation_steps):
            x = torch.randint(3, vocab, (t.micro_batch_size, spec.mean_example_len),
                              device=device)
            out = model(input_ids=x, labels=x, use_cache=False)
            (out.loss / t.gradient_accumulation_steps).backward()
            meter.add_loss(out.loss.detach() / t.gradient_accumulation_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.mark()
    return meter.result(t.warmup_steps_excluded, examples=None, distinct_examples=None)


def device_limit(spec: Spec, device: str) -> dict:
    """The physical limit on this device (bench/flops.py): the bench workload's GEMMs timed at
    their own shapes, bf16 on a GPU (fp32 on CPU, the --dry-run)."""
    import torch

    from bench.flops import limit_shapes, measure_throughput, physical_limit, workload_for

    w = workload_for(spec)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    t0 = time.time()
    lim = physical_limit(w, measure_throughput(limit_shapes(w), None,
                                               device=device, dtype=dtype))
    lim.update(dtype=str(dtype).replace("torch.", ""), measure_s=time.time() - t0)
    return lim


def with_mfu(res: dict, spec: Spec, limits: list[dict]) -> dict:
    """MFU and "of limit" against the mean of the measured limits; 6N against the datasheet."""
    tps = res.get("tokens_per_s")
    if not tps or not limits:
        return res
    peak = sum(x["peak_gflops"] for x in limits) / len(limits) * 1e9
    lim_tps = sum(x["limit_tokens_per_s"] for x in limits) / len(limits)
    res.update(mfu=limits[0]["flops_per_token"] * tps / peak, of_limit=tps / lim_tps,
               mfu_6n_datasheet=6 * spec.parameters * tps / PEAK_BF16)
    return res


def run_method(name: str, kind: str, opts: dict, spec: Spec, work: Path, device: str) -> dict:
    import torch

    from bench.worker import run_sft, run_trl

    cuda = device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if kind == "bare":
            res = run_bare_gpu(spec, device)
        elif kind == "sft":
            res = run_sft(spec, opts, d)
        else:
            res = run_trl(spec, dict(opts), d)
        res["ok"] = True
    except Exception:  # noqa: BLE001 - one failure must not cost the other measurements
        res = {"ok": False, "error": traceback.format_exc()[-3000:]}
    res.update(method=name, wall_s=time.perf_counter() - t0, options=opts)
    if cuda:
        res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return res


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {"python": platform.python_version(), "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
              "deepspeed"):
        try:
            env[p] = version(p)
        except PackageNotFoundError:
            env[p] = "not installed"
    return env


def markdown(spec: Spec, results: list[dict], env: dict, command: str, total_s: float,
             limits: list[dict]) -> str:
    t = spec.train
    L = ["## GPU check: bf16 LoRA and 8-bit LoRA, ~1B Llama, sft_scale vs TRL\n",
         f"Command: `{command}` ({total_s:.0f} s in all)\n",
         f"- Device: {env['device']}, CUDA {env['cuda']}; " + ", ".join(
             f"{k} {env[k]}" for k in ("torch", "transformers", "trl", "peft", "accelerate",
                                       "datasets", "bitsandbytes", "deepspeed")),
         f"- Model: random-init Llama, {spec.parameters:,} parameters (hidden "
         f"{spec.model.hidden_size}, {spec.model.num_hidden_layers} layers), bf16 weights; "
         f"LoRA r={t.lora_r} all-linear; micro-batch {t.micro_batch_size}, {t.steps} steps "
         f"({t.warmup_steps_excluded} warm-up not timed); {spec.real_tokens:,} tokens in "
         f"{t.n_examples} examples (max {spec.data.max_seq_len})."]
    if limits:
        lim = limits[0]
        peaks = " and ".join(f"{x['peak_gflops']:,.1f}" for x in limits)
        L.append(f"- The physical limit (`bench/flops.py`, the CPU bench's formula): "
                 f"{lim['flops_per_token'] / 1e6:,.2f} MFLOP per real token, counted exactly for "
                 f"this model and data; {lim['dtype']} GEMM throughput measured on this device "
                 f"at the model's own shapes before the first method and after the last: peak "
                 f"{peaks} GFLOP/s, limit "
                 + " and ".join(f"{x['limit_tokens_per_s']:,.0f}" for x in limits)
                 + " tok/s. **MFU** = FLOPs per token x tok/s / the mean measured peak; **of "
                 "limit** = tok/s / the mean limit; **6N MFU** = 6 x N x tok/s / 989e12 (the "
                 "H200's datasheet dense bf16), only to compare with published figures (LoRA "
                 "does ~4N per token, not 6N).")
    L += ["", "| method | real tok/s | MFU (measured peak) | of limit | 6N MFU (datasheet) | "
          "max mem allocated GiB | pad eff | loss | steps |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            err = (r.get("error") or "").strip().splitlines()
            L.append(f"| {r['method']} | failed: {(err[-1] if err else '?')[:150]} "
                     "| | | | | | | |")
            continue
        mem = r.get("max_memory_allocated_gib")
        mfu, of_limit, mfu_6n = (f"{r[k]:.1%}" if k in r else "–"
                                 for k in ("mfu", "of_limit", "mfu_6n_datasheet"))
        L.append(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {mfu} | {of_limit} | {mfu_6n} | "
                 f"{'–' if mem is None else f'{mem:.1f}'} | {r['padding_efficiency']:.0%} | "
                 f"{r['final_loss']:.3f} | {r['steps']} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the code")
    ap.add_argument("--budget-s", type=float, default=360,
                    help="stop starting new methods after this many seconds")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " +
                    ", ".join(n for n, _, _ in METHODS))
    ap.add_argument("--work", default="/tmp/sft_scale_gpu_check")
    args = ap.parse_args(argv)
    t_start = time.time()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SFT_SCALE_BENCH_CACHE", str(work / "cache"))

    import torch

    from bench.data import prepare
    from bench.sft import write_config

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    spec = gpu_spec(args.dry_run or device == "cpu")
    print(f"gpu_check: device {device}; building the model folder", flush=True)
    model_dir = build_model_dir_gpu(spec, work, device)
    spec, lengths = prepare(spec, work / "data", model_dir=model_dir)
    spec.sft_config = str(write_config(spec, work / "bench.yaml"))
    print(f"gpu_check: {spec.parameters:,} parameters, {spec.real_tokens:,} tokens, "
          f"{time.time() - t_start:.0f} s so far", flush=True)
    limits = [device_limit(spec, device)]
    print(f"gpu_check: physical limit {limits[0]['limit_tokens_per_s']:,.0f} tok/s, peak "
          f"{limits[0]['peak_gflops']:,.0f} GFLOP/s {limits[0]['dtype']} "
          f"({limits[0]['measure_s']:.0f} s)", flush=True)
    wanted = args.methods.split(",") if args.methods else None
    results = []
    for name, kind, opts in METHODS:
        if wanted and name not in wanted:
            continue
        if device == "cpu" and kind == "trl" and opts.get("bf16", False) is None:
            opts = dict(opts, use_cpu=True)  # TRL refuses its bf16 default on CPU without it
        if time.time() - t_start > args.budget_s:
            results.append({"method": name, "ok": False,
                            "error": f"skipped: time budget of {args.budget_s:.0f} s used up"})
            continue
        r = with_mfu(run_method(name, kind, opts, spec, work, device), spec, limits)
        results.append(r)
        state = (f"{r['tokens_per_s']:,.0f} tok/s, MFU {r.get('mfu', 0):.1%}, "
                 f"max mem {r.get('max_memory_allocated_gib', float('nan')):.1f} GiB"
                 if r.get("ok") else "FAILED " + (r.get("error") or "").strip()
                 .splitlines()[-1][:200])
        print(f"gpu_check: {name:24s} {state}  ({r['wall_s']:.0f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(
            {"spec": json.loads(spec.to_json()), "results": results}, indent=1, default=float))
    limits.append(device_limit(spec, device))  # the device's speed may drift over the run
    results = [with_mfu(r, spec, limits) for r in results]
    env = environment()
    command = "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(spec, results, env, command, time.time() - t_start, limits)
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps(
        {"spec": json.loads(spec.to_json()), "env": env, "results": results,
         "limits": limits, "peak_bf16_datasheet": PEAK_BF16}, indent=1, default=float))
    print(md, flush=True)
    return 0 if all(r.get("ok") or "skipped" in r.get("error", "") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
