"""DeepSpeed before any weights load: find the JSON, resolve every "auto" from our config, check
it agrees with the config (8-bit, 4-bit, offload, optimizer), choose the stage for
`distributed.zero: auto` and the optimizer for offload, so that a bad combination fails in seconds,
not after the model has been downloaded and sharded across a cluster.

Accelerate fills some "auto" values itself, but only when it is handed a dataloader and a model in
`prepare`; we resolve them all up front so they can be printed (and checked) before training.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import time
from pathlib import Path

import torch

from sft_scale.config import Config, ConfigError
from sft_scale.preflight.command import DS_CONFIG_DIR
from sft_scale.preflight.plan import estimate, format_table

log = logging.getLogger(__name__)


# Top-level keys DeepSpeed understands (a misspelt one is silently ignored by DeepSpeed itself).
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "bf16", "fp16", "amp", "zero_optimization", "optimizer", "scheduler",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "steps_per_print",
    "wall_clock_breakdown", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "activation_checkpointing", "flops_profiler",
    "tensorboard", "wandb", "csv_monitor", "comms_logger", "memory_breakdown", "checkpoint",
    "data_types", "dump_state", "seq_parallel_communication_data_type", "aio",
    "elasticity", "autotuning", "compression_training", "data_efficiency", "torch_autocast",
}


def launcher_ds_file() -> str | None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        env = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if env and env.lower() != "none":
            return env
    return None


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found; use one of "
                          f"{sorted(x.name for x in DS_CONFIG_DIR.glob('*.json'))} in "
                          f"{DS_CONFIG_DIR}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for key in ds:
        if key not in KNOWN_KEYS:
            near = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            log.warning("%s: unknown DeepSpeed key %r%s; DeepSpeed would ignore it", path, key,
                        f" (did you mean {near[0]!r}?)" if near else "")
    return ds


def resolve_ds_config(ds: dict, cfg: Config, world_size: int, hidden_size: int | None,
                      source: str = "<deepspeed config>") -> dict:
    """A copy of `ds` with no "auto" left; a concrete value that contradicts `cfg` is an error."""
    t = cfg.training
    ds = json.loads(json.dumps(ds))
    wanted = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": t.gradient_accumulation_steps,
              "train_batch_size": cfg.global_batch_size(world_size),
              "gradient_clipping": t.max_grad_norm}
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif float(have) != float(value):
            raise ConfigError(
                f"{source}: {key}={have} contradicts the training config ({value}, from "
                "training.micro_batch_size x gradient_accumulation_steps x world size and "
                f"training.max_grad_norm). Set \"{key}\": \"auto\" in the JSON, or change the "
                "config to match.")
    for name, on in (("bf16", cfg.model.dtype == "bf16"), ("fp16", cfg.model.dtype == "fp16")):
        section = ds.setdefault(name, {"enabled": "auto"})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
        elif bool(section["enabled"]) != on:
            raise ConfigError(f"{source}: {name}.enabled={section['enabled']} contradicts "
                              f"model.dtype={cfg.model.dtype}. Set it to \"auto\".")
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError(f"{source}: bf16 and fp16 are both enabled; choose one")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    h = hidden_size or 4096
    for key, value in (("reduce_bucket_size", h * h),
                       ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    if ds.get("zero_force_ds_cpu_optimizer") == "auto":
        # Accelerate swaps our torch AdamW for DeepSpeedCPUAdam when this is true and the
        # optimizer is offloaded. Whether that op builds is known only where training runs
        # (sft_scale/preflight/deepspeed.py: choose_offload_optimizer); until then, assume it does.
        ds["zero_force_ds_cpu_optimizer"] = offloads_optimizer(ds)
    left = _autos(ds)
    if left:
        raise ConfigError(f"{source}: cannot resolve \"auto\" for {left}; give concrete values")
    return ds


def _autos(d, prefix="") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _autos(v, f"{prefix}{k}.")
        elif v == "auto":
            out.append(prefix + k)
    return out


def offloads_optimizer(ds: dict) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in ("none", None)


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def device_memory_bytes() -> tuple[int, str]:
    """Memory one training process may use, and where the figure comes from: this rank's GPU, or
    on CPU the machine's (or cgroup's) memory shared by the processes on this node."""

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


def choose_offload_optimizer() -> bool:
    """True when DeepSpeed's CPU Adam (a C++ op, JIT-built with ninja and a compiler on first
    use, then cached in TORCH_EXTENSIONS_DIR) is ready here, so that Accelerate runs the
    offloaded step in it; else False, with the reason printed, and the step runs in torch AdamW
    (slower: see docs/BENCHMARKS.md). Built here, in each training process, because the op is
    compiled for the CPU it runs on (-march=native): a login node's build may not run on a
    compute node. Concurrent ranks take turns through torch's build lock."""
    # Imported here, in the training process only: importing deepspeed takes seconds and probes
    # the accelerator, which login-node commands (check, slurm submit) never need.
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
