"""Checks that must pass before any weights load: a bad combination fails in seconds, not after
the model has been downloaded and sharded across a cluster."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from sft_scale.config import Config, ConfigError
from sft_scale.deepspeed_config import (
    load_ds_config,
    offloads_optimizer,
    resolve_ds_config,
    zero_stage,
)
from sft_scale.plan import estimate, format_table, lora_targets, matches_module, model_shape

log = logging.getLogger(__name__)


def check_lora_fits(cfg: Config, mc) -> None:
    """`lora.target_modules` must name modules this model has, and `lora.r` must not exceed the
    dimensions of the layers it adapts: checked on the model built on the meta device from its
    config (`mc`), before any weights load. A model class we cannot build here is left to PEFT."""
    if not cfg.lora.enabled or mc is None:
        return
    try:
        shape = model_shape(mc)
    except (ValueError, KeyError, TypeError):
        return
    targets = cfg.lora.target_modules
    names = [n for n in shape.module_params if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in shape.linear_shapes if n != shape.output_head})
    if isinstance(targets, list):
        unknown = [t for t in targets if not any(matches_module(n, t) for n in names)]
        if unknown:
            raise ConfigError(
                f"'lora.target_modules': {', '.join(map(repr, unknown))} names no module of this "
                f"{mc.model_type} model. Its Linear layers are: {', '.join(leaves)}; or use "
                "'all-linear'")
        # PEFT also adapts embeddings; the rank bound below is about the Linear layers.
        linears = [n for n in shape.linear_shapes if any(matches_module(n, t) for t in targets)]
        if not linears:
            return
    else:
        linears = lora_targets(shape, targets)  # ConfigError when the pattern matches no Linear
    smallest = min(linears, key=lambda n: min(shape.linear_shapes[n][:2]))
    d_in, d_out, _ = shape.linear_shapes[smallest]
    if cfg.lora.r > min(d_in, d_out):
        raise ConfigError(
            f"'lora.r' ({cfg.lora.r}) is larger than the layers it adapts: {smallest} maps "
            f"{d_in} -> {d_out}, so a rank above {min(d_in, d_out)} adds parameters and no "
            f"capacity. Set lora.r to at most {min(d_in, d_out)}")


def device_memory_bytes() -> tuple[int, str]:
    """Memory one training process may use, and where the figure comes from: this rank's GPU, or
    on CPU the machine's (or cgroup's) memory shared by the processes on this node."""
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(local)
        return props.total_memory, f"GPU {local} ({props.name})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))  # "max": no limit
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return total // local, f"CPU memory / {local} process(es) on this node"


def choose_zero(cfg: Config, world_size: int, model_config,
                memory: int | None = None) -> tuple[int, bool, str]:
    """`distributed.zero: auto` -> (stage, offload, why): what `sft-scale plan` recommends for this
    world size and this device's memory (or `memory`). Every rank sees the same devices, so all
    agree."""
    where = "the --gpu-memory given"
    if memory is None:
        memory, where = device_memory_bytes()
    plan = estimate(cfg, world_size, memory, model_config=model_config)
    rec = plan["recommendation"]
    if rec is None or not any(r["fits"] for r in plan["rows"]):
        raise ConfigError(f"distributed.zero: auto: no ZeRO stage fits micro-batch "
                          f"{cfg.training.micro_batch_size} in {where}. {plan['explanation']}\n"
                          + format_table(plan))
    note = f"distributed.zero: auto -> {rec['name']} ({where}: {plan['explanation']})"
    if os.environ.get("RANK", "0") == "0":  # runs before logging is set up; one rank says it
        print(note + "\n" + format_table(plan), flush=True)
    return rec["stage"], rec["offload"], note


def resolve_deepspeed(cfg: Config, path: str, world_size: int, model_config=None,
                      in_job: bool = False, zero_asked: int | None = None) -> dict:
    """The DeepSpeed JSON at `path`, every "auto" filled from the config and checked against it.
    `in_job`: called by a training process, where the offload optimizer's op can be built.
    `zero_asked`: the stage the config or command line asked for (a launcher's file wins)."""
    hidden = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None)
    ds = resolve_ds_config(load_ds_config(path), cfg, world_size, hidden, source=path)
    check_compatibility(cfg, ds, path)
    stage = zero_stage(ds)
    if zero_asked is not None and stage != zero_asked:
        log.warning("distributed.zero=%s but the DeepSpeed config in use (%s) is stage %s; the "
                    "launcher's file wins", zero_asked, path, stage)
    if in_job and offloads_optimizer(ds) and ds.get("zero_force_ds_cpu_optimizer") \
            and load_ds_config(path).get("zero_force_ds_cpu_optimizer", "auto") == "auto":
        ds["zero_force_ds_cpu_optimizer"] = choose_offload_optimizer()
    log.info("DeepSpeed config %s resolved: %s", path, json.dumps(ds))
    return ds


def check_optimizer(cfg: Config, device: str | None = None) -> None:
    """training.optimizer against the device this process trains on (run in the job, where the
    device is, before any weights load: a login node without GPUs decides nothing here)."""
    import torch

    name = cfg.training.optimizer
    if name == "adamw":
        return
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("paged_") and device != "cuda":
        # bitsandbytes pages optimizer state through CUDA unified memory; on other devices it
        # silently falls back to the unpaged optimizer, which is not what was asked for.
        raise ConfigError(f"training.optimizer: {name} pages optimizer state between GPU and "
                          f"CPU memory (CUDA unified memory); this process trains on {device}, "
                          f"where there is nothing to page. Use training.optimizer: "
                          f"{name.replace('paged_', '')} here (the same update without paging), "
                          "or run on a CUDA GPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"training.optimizer: {name} needs bitsandbytes, which is not "
                          "installed: pip install bitsandbytes, or use training.optimizer: "
                          "adamw") from None


def choose_offload_optimizer() -> bool:
    """True when DeepSpeed's CPU Adam (a C++ op, JIT-built with ninja and a compiler on first
    use, then cached in TORCH_EXTENSIONS_DIR) is ready here, so that Accelerate runs the
    offloaded step in it; else False, with the reason printed, and the step runs in torch AdamW
    (slower: see docs/BENCHMARKS.md). Built here, in each training process, because the op is
    compiled for the CPU it runs on (-march=native): a login node's build may not run on a
    compute node. Concurrent ranks take turns through torch's build lock."""
    import time

    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    say = os.environ.get("RANK", "0") == "0"  # before logging is set up; one rank says it
    reason = None
    if not builder.is_compatible(verbose=False):
        reason = "DeepSpeed reports the cpu_adam op incompatible here (see `ds_report`)"
    else:
        started = time.time()
        try:
            builder.load(verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: fall back, say why
            reason = f"building the cpu_adam op failed: {str(e).strip().splitlines()[-1]}"
        else:
            if say:
                print(f"offload optimizer: DeepSpeed CPU Adam (op ready in "
                      f"{time.time() - started:.0f} s)", flush=True)
            return True
    if say:
        print(f"offload optimizer: torch AdamW, the slow path ({reason}); install ninja and a "
              "C++ compiler for DeepSpeed's CPU Adam", flush=True)
    return False


def check_compatibility(cfg: Config, ds: dict | None, source: str = "<deepspeed config>") -> None:
    stage = zero_stage(ds) if ds else None
    z = (ds or {}).get("zero_optimization", {})
    offload = any(z.get(k, {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    if cfg.quantization.load_in_8bit and stage == 3:
        raise ConfigError(f"{source}: 8-bit (LLM.int8) weights cannot be partitioned by ZeRO-3. "
                          "Use ZeRO-2 (distributed.zero: 2) or plain DDP with 8-bit, or drop "
                          "quantization.load_in_8bit for ZeRO-3.")
    if offload and stage not in (1, 2, 3):
        raise ConfigError(f"{source}: CPU offload needs ZeRO stage 1-3, got stage {stage}")
    q = cfg.quantization
    if q.load_in_4bit and stage == 3 and q.bnb_4bit_quant_storage == "uint8":
        raise ConfigError(f"{source}: ZeRO-3 partitions floating-point parameters, and "
                          "quantization.bnb_4bit_quant_storage: uint8 keeps the packed 4-bit "
                          "weights as bytes. Set bnb_4bit_quant_storage: auto (the compute dtype "
                          "under ZeRO-3), or use ZeRO-2 (distributed.zero: 2).")
    if offload and cfg.training.optimizer != "adamw":
        raise ConfigError(f"{source}: CPU offload runs the optimizer step on the CPU with "
                          f"DeepSpeed's own CPU Adam; training.optimizer: "
                          f"{cfg.training.optimizer} (bitsandbytes) cannot run there. Use "
                          "training.optimizer: adamw with offload, or drop offload to keep "
                          f"{cfg.training.optimizer}.")
