"""The planner's measurements, to check its estimates against (tests/unit/test_plan.py on CPU,
bench/plan_gpu_check.py on a GPU): the peak memory of real AdamW steps of a model built from its
config (random init), on random full-length rows."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from sft_scale.config import config_from_dict
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.plan import loss_kind, model_shape
from sft_scale.training.attention import resolve_attn_implementation
from sft_scale.training.loss import summed_loss
from sft_scale.training.model import DTYPES, wrap_lora

ROOT = Path(__file__).resolve().parents[1]


def measure_peak_cpu(cfg, micro_batches: list[int] | None = None, steps: int = 2) -> list[dict]:
    """For each micro-batch (default: the config's), ascending, `steps` AdamW steps (two, so
    optimizer states exist during a forward) on random full-length rows, in one fresh CPU
    process, the model built from its config (random init). Returns per micro-batch, in bytes:
    the RSS before the model, the peak, and the increase (compare to estimate(overhead_bytes=0))."""
    job = {"config": cfg.to_dict(), "model": resolve_model_path(cfg.model.name_or_path),
           "micro": sorted(micro_batches or [cfg.training.micro_batch_size]), "steps": steps}
    code = "import bench.plan_measure as p; p._measure_child()"
    # A fixed mmap threshold hands every freed tensor back to the OS, so peak RSS follows live
    # bytes (as a GPU allocator's high-water mark does) instead of glibc's heap fragmentation.
    # The repo root on the path: the child imports this module as bench.plan_measure.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), text=True,
                         capture_output=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _measure_child() -> None:
    job = json.loads(sys.stdin.read())
    cfg = config_from_dict(job["config"])
    mc = AutoConfig.from_pretrained(job["model"])
    # Code and one-off buffers are not training memory: import everything and train one tiny
    # step before any baseline.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(mc)]  # its modeling code (peft came with training.model)
    _train(cfg, mc, 1, 1)
    results = []
    for micro in job["micro"]:
        gc.collect()
        torch.manual_seed(0)
        # Linux resets the peak RSS (VmHWM) to the current RSS on "5". Where that is refused
        # the peak only grows, which still reads right: micro-batches run in ascending order.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS") * 1024
        _train(cfg, mc, micro, job["steps"])
        peak = _status_kib("VmHWM") * 1024
        results.append({"micro_batch": micro, "baseline": base, "peak": peak,
                        "increase": peak - base})
    print(json.dumps(results))


def measure_peak_cuda(cfg, micro_batches: list[int] | None = None, steps: int = 2) -> list[dict]:
    """measure_peak_cpu's GPU twin, in this process: per micro-batch, the allocator's high-water
    mark (torch.cuda.max_memory_allocated) above what was allocated before the model."""
    mc = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path))
    results = []
    for micro in sorted(micro_batches or [cfg.training.micro_batch_size]):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _train(cfg, mc, micro, steps, device="cuda")
        peak = torch.cuda.max_memory_allocated()
        results.append({"micro_batch": micro, "baseline": base, "peak": peak,
                        "increase": peak - base})
    return results


def _train(cfg, mc, micro: int, steps: int, device: str = "cpu") -> None:
    dtype = DTYPES[cfg.model.dtype]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mc, dtype=None if dtype == "auto" else dtype,
                                                 attn_implementation=resolve_attn_implementation(cfg))
    model.config.use_cache = False
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    if cfg.lora.enabled:
        model = wrap_lora(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(mc.vocab_size, (micro, cfg.data.max_seq_len), device=device)
    kind = loss_kind(cfg, model_shape(mc), None)
    for _ in range(steps):
        if kind == "standard":
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        else:  # training's chunked loss (Liger plans the same)
            summed_loss(model, {"input_ids": ids, "labels": ids}, kind).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
