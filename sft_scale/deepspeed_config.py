"""DeepSpeed JSON: find it, resolve every "auto" from our config, and check it agrees with it.

Accelerate fills some "auto" values itself, but only when it is handed a dataloader and a model in
`prepare`; we resolve them all up front so they can be printed (and checked) before training.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

from sft_scale.config import Config, ConfigError

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

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
        # (sft_scale/preflight.py: choose_offload_optimizer); until then, assume it does.
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
