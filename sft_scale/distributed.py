"""The Accelerator, built so that world size and rank are right on CPU and GPU alike."""

from __future__ import annotations

import os

import torch

from sft_scale.config import Config


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    handlers, cpu = [], False
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # Under a DeepSpeed launch without a GPU no backend is chosen, and every rank then
            # believes it is rank 0 of 1 (duplicated data, duplicated writes). gloo is the CPU
            # backend; Accelerator(cpu=True) would instead silently drop DeepSpeed.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            # A plain multi-process launch on CPU is only data-parallel (gradients all-reduced)
            # as MULTI_CPU, which Accelerate selects for cpu=True.
            cpu = True
    mixed = {"fp32": "no", "auto": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.model.dtype]
    # The loop hands the accelerator exactly `accum` micro-batches per optimizer step, so syncing
    # follows the step count, not the end of a dataloader.
    plugin = GradientAccumulationPlugin(num_steps=cfg.training.gradient_accumulation_steps,
                                        sync_with_dataloader=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed, gradient_accumulation_plugin=plugin,
                       kwargs_handlers=handlers)


def describe(accelerator) -> str:
    return (f"distributed: {accelerator.distributed_type.value}, world size "
            f"{accelerator.num_processes}, rank {accelerator.process_index}, device "
            f"{accelerator.device}")
