"""The Accelerator, built so that world size and rank are right on CPU and GPU alike."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin, InitProcessGroupKwargs

from sft_scale.config import Config


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: Config, ds_config: dict | None = None):
    """`ds_config`: a resolved DeepSpeed dict (no "auto" left) to run under DeepSpeed, or None."""
    cpu, plugin = False, None
    no_gpu = not torch.cuda.is_available()
    # One timeout for every collective (torch.distributed, and DeepSpeed's init_distributed, which
    # Accelerate hands the same kwargs); describe() prints it.
    group = {"timeout": timedelta(minutes=cfg.distributed.timeout_minutes)}
    if ds_config is not None:
        # DeepSpeed comes in through the plugin whatever launched us (accelerate's DeepSpeed
        # launcher, its torchrun path, plain torchrun, or one plain process), so multi-node jobs
        # need no DeepSpeed launcher (pdsh or its 'standalone' mode).
        _default_single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        if no_gpu:
            # Without a GPU no backend is chosen under DeepSpeed and every rank then believes it
            # is rank 0 of 1 (duplicated data, duplicated writes). gloo is the CPU backend;
            # Accelerator(cpu=True) would instead silently drop DeepSpeed.
            group["backend"] = "gloo"
    elif world_size_from_env() > 1 and no_gpu:
        # A plain multi-process launch on CPU is only data-parallel (gradients all-reduced)
        # as MULTI_CPU, which Accelerate selects for cpu=True.
        cpu = True
    mixed = {"fp32": "no", "auto": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.model.dtype]
    # The loop hands the accelerator exactly `accum` micro-batches per optimizer step, so syncing
    # follows the step count, not the end of a dataloader.
    accum = GradientAccumulationPlugin(num_steps=cfg.training.gradient_accumulation_steps,
                                       sync_with_dataloader=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed, gradient_accumulation_plugin=accum,
                       deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(**group)])


def _default_single_process_env() -> None:
    """DeepSpeed always initialises torch.distributed; give a lone process a world of one."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def describe(accelerator) -> str:
    timeout = accelerator.init_handler.timeout.total_seconds() / 60
    return (f"distributed: {accelerator.distributed_type.value}, world size "
            f"{accelerator.num_processes}, rank {accelerator.process_index}, device "
            f"{accelerator.device}, process-group timeout {timeout:g} min "
            "(distributed.timeout_minutes)")
