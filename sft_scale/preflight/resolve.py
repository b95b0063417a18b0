"""Resolve once, then read: what a run will do, decided from its config and launch layout before any
weights load, in one place, and frozen.

`train`, `train --dry-run`, `check`, `plan` and `slurm submit` all call `resolve`; the `Config`
stays as the user wrote it (it is saved as such), and every decision the run takes from it (where
the model is and its `config.json`, the DeepSpeed JSON and ZeRO stage, attention, packing, loss,
the global batch) lives on the `Resolved` record. Only the number of steps needs the data:
`Resolved.with_data` adds it once the training set is built.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from sft_scale.config import Config, ConfigError
from sft_scale.data.layout import choose_layout
from sft_scale.data.pipeline import check_max_seq_len
from sft_scale.model_source import read_model_config, resolve_model_path
from sft_scale.preflight.command import Layout, ds_file_for
from sft_scale.preflight.deepspeed import choose_zero, launcher_ds_file, resolve_deepspeed
from sft_scale.preflight.plan import lora_targets, matches_module, model_shape
from sft_scale.training.attention import PACKED_SDPA, resolve_attn_implementation
from sft_scale.training.distributed import world_size_from_env
from sft_scale.training.layer_kernels import resolve_layer_kernels
from sft_scale.training.lora_kernel import resolve_lora_kernel
from sft_scale.training.loss import resolve_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastPaths:
    """The speed switches as this run uses them (what `auto` stands for on this machine)."""

    attn_implementation: str
    attention_kernel: str  # what from_pretrained(attn_implementation=...) gets
    packing: bool
    packing_reason: str
    group_by_length: bool
    loss: str
    loss_reason: str
    lora_kernel: str
    lora_kernel_reason: str
    torch_compile: bool
    layer_kernels: str
    layer_kernels_reason: str
    trim_last_layer: bool
    trim_last_layer_reason: str
    num_workers: int
    pin_memory: bool
    packing_by_lengths: bool = False  # auto said on; the tokenized lengths decide (with_data)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["packing_by_lengths"]
        if d["attention_kernel"] == PACKED_SDPA:
            d["attention_kernel"] = "sdpa per packed example"
        return d


@dataclass(frozen=True)
class Resolved:
    """Everything derived from the config and the layout; read, never rewritten."""

    model_path: str
    model_config: PretrainedConfig | None  # None: a config transformers cannot read here
    world_size: int
    global_batch_size: int
    zero_stage: int | None  # None: no DeepSpeed (or `auto` still to be decided in the job)
    zero_pending: bool  # distributed.zero: auto, decided in the job where the devices are
    zero_note: str | None  # how `auto` chose, for the log
    deepspeed: dict[str, Any] | None  # the resolved DeepSpeed JSON (no "auto" left), or None
    deepspeed_path: str | None
    fast: FastPaths
    total_steps: int | None = None  # known once the data is built: with_data()

    def with_data(self, cfg: Config, lengths: Sequence[int], total_steps: int) -> Resolved:
        """The record completed by the tokenized training data: its steps and, where `packing:
        auto` said on, the layout its lengths choose (padded batches where they would barely
        pad: sft_scale/data/layout.py)."""
        fast = self.fast
        if fast.packing_by_lengths:
            t = cfg.training
            pack, why = choose_layout(lengths, t.micro_batch_size, t.gradient_accumulation_steps,
                                      self.world_size, t.seed, cfg.data.group_by_length)
            fast = dataclasses.replace(
                fast, packing=pack, packing_reason=why, packing_by_lengths=False,
                attention_kernel=fast.attention_kernel if pack else fast.attn_implementation,
                group_by_length=cfg.data.group_by_length and not pack)
        return dataclasses.replace(self, fast=fast, total_steps=total_steps)

    @property
    def offload(self) -> bool:
        z = (self.deepspeed or {}).get("zero_optimization", {})
        return any(z.get(k, {}).get("device", "none") not in ("none", None)
                   for k in ("offload_optimizer", "offload_param"))

    @property
    def deepspeed_name(self) -> str:
        if self.zero_stage is None:
            return "auto" if self.zero_pending else "none"
        return f"ZeRO-{self.zero_stage}" + (" + offload" if self.offload else "")


def in_job_layout(cfg: Config) -> Layout:
    """The layout a training process finds itself in: its world size from the launcher."""
    return Layout.for_config(cfg, nproc_per_node=world_size_from_env())


def resolve(cfg: Config, layout: Layout, *, in_job: bool = False,
            memory: int | None = None) -> Resolved:
    """Decide and check everything the config leaves to this machine and layout; raises
    ConfigError for a combination that cannot work, in seconds and before any weights load.

    `in_job`: called by a training process (the device is known: `distributed.zero: auto` is
    decided from its memory, the optimizer checked against it, DeepSpeed's CPU Adam op built).
    `memory`: per-process device memory to decide `zero: auto` for, outside the job."""
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.revision)
    mc = read_model_config(cfg, model_path)
    world = layout.world_size
    if in_job:
        check_optimizer(cfg)
    ds_path, stage_choice, note, pending = _deepspeed_file(cfg, layout, mc, in_job, memory)
    ds = resolve_deepspeed(cfg, ds_path, world, mc, in_job=in_job, zero_asked=stage_choice) \
        if ds_path else None
    stage = int(ds["zero_optimization"]["stage"]) if ds else None
    # Before the accelerator: under ZeRO-3 it makes transformers build every model (even the
    # meta-device one this check uses) through deepspeed.zero.Init, which fails on meta tensors.
    check_lora_fits(cfg, mc)
    return Resolved(model_path=model_path, model_config=mc, world_size=world,
                    global_batch_size=cfg.global_batch_size(world), zero_stage=stage,
                    zero_pending=pending, zero_note=note, deepspeed=ds, deepspeed_path=ds_path,
                    fast=resolve_fast_paths(cfg, stage, mc))


def _deepspeed_file(cfg: Config, layout: Layout, mc, in_job: bool, memory: int | None):
    """(JSON path or None, the stage asked for, how auto chose, auto still pending). The
    launcher's file (accelerate launch --deepspeed_config_file) wins over the layout's."""
    launcher = launcher_ds_file()
    if launcher:
        return launcher, layout.zero if layout.zero != "auto" else None, None, False
    if layout.deepspeed_config:  # a JSON named explicitly says which stage
        return layout.deepspeed_config, None, None, False
    if layout.zero != "auto":
        return ds_file_for(layout.zero, layout.offload), layout.zero, None, False
    if not in_job and memory is None:
        return None, None, None, True
    stage, offload, note = choose_zero(cfg, layout.world_size, mc, memory)
    return ds_file_for(stage, offload), stage, note, False


def passes_boundaries(mc) -> bool | None:
    """Whether the model's attention layers hand their extra forward arguments (the packed
    example boundaries, cu_seq_lens_*) to the attention function: transformers marks the models
    that do with `_supports_attention_backend`. None when the class is unknown here (no config,
    or remote code)."""
    if mc is None:
        return None
    try:
        cls = AutoModelForCausalLM._model_mapping[type(mc)]
    except (KeyError, ValueError):
        return None
    return bool(getattr(cls, "_supports_attention_backend", False))


def resolve_packing(cfg: Config, attn: str, mc=None) -> tuple[bool, str]:
    """(pack?, why) for `data.packing`. Packing is the padding-free layout with the same examples
    per step as padded batches, so auto turns it on wherever it is both correct and cheaper:
    causal_lm, attention that runs per example (our packed SDPA, flash-attention 2's varlen
    kernel; eager would score the whole row, L^2), and a model that passes the example
    boundaries down to its attention (without them attention would silently cross examples).
    An "auto: on" is decided again from the tokenized lengths (Resolved.with_data,
    sft_scale/data/layout.py): padded batches where they would be >= 99% real tokens.
    Raises ConfigError for `packing: true` on a model known not to pass them."""
    packing = cfg.data.packing
    if cfg.task != "causal_lm":
        return False, "off: classification reads one example per row"
    supported = passes_boundaries(mc)
    if packing is True:
        if supported is False:
            raise ConfigError(
                f"'data.packing: true', but {mc.model_type!r} models do not pass the example "
                "boundaries of a packed row to their attention, so examples would attend to each "
                "other. Set data.packing: false (or auto).")
        return True, "on (set in the config)"
    if packing is False:
        return False, "off (set in the config)"
    if attn not in ("sdpa", "flash_attention_2"):
        return False, (f"auto: off, {attn} attention would score the whole packed row; batches "
                       "are padded and grouped by length")
    if not supported:
        return False, ("auto: off, this model's attention may not receive the example boundaries; "
                       "batches are padded and grouped by length")
    return True, "auto: on, padding-free rows with attention per example"


def resolve_trim_last_layer(cfg: Config, loss: str) -> tuple[bool, str]:
    """(on?, why) for `training.trim_last_layer` (sft_scale/training/trained_rows.py)."""
    if not cfg.training.trim_last_layer:
        return False, "set in the config"
    if loss not in ("chunked", "liger"):
        return False, f"the {loss} loss reads every position's logits"
    if cfg.training.torch_compile:
        return False, "torch_compile: the trained rows' count changes every batch"
    return True, f"the {loss} loss reads the trained positions only"


def resolve_fast_paths(cfg: Config, zero_stage: int | None = None, mc=None) -> FastPaths:
    """What this run will use for attention, packing, loss, compile and data workers. Raises
    ConfigError for a switch that cannot work here (flash_attention_2 without flash_attn, liger
    without liger-kernel or CUDA, chunked under ZeRO-3, a negative worker count, packing on a
    model that cannot keep packed examples apart)."""
    if cfg.data.num_workers < 0:
        raise ConfigError("'data.num_workers' must be >= 0 (0 collates in the training process)")
    check_max_seq_len(cfg, mc)
    attn = resolve_attn_implementation(cfg, mc)
    packing, packing_why = resolve_packing(cfg, attn, mc)
    loss, loss_why = resolve_loss(cfg, mc, zero_stage)
    lora_kernel, lora_why = resolve_lora_kernel(cfg, zero_stage)
    layers, layers_why = resolve_layer_kernels(cfg, zero_stage)
    trim, trim_why = resolve_trim_last_layer(cfg, loss)
    return FastPaths(
        attn_implementation=attn,
        attention_kernel=PACKED_SDPA if attn == "sdpa" and packing else attn,
        packing=packing, packing_reason=packing_why,
        # packed rows have no padding to save: length grouping only matters without them
        group_by_length=cfg.data.group_by_length and not packing,
        loss=loss, loss_reason=loss_why, lora_kernel=lora_kernel, lora_kernel_reason=lora_why,
        torch_compile=cfg.training.torch_compile,
        layer_kernels=layers, layer_kernels_reason=layers_why,
        trim_last_layer=trim, trim_last_layer_reason=trim_why,
        num_workers=cfg.data.num_workers,
        pin_memory=bool(cfg.data.pin_memory and torch.cuda.is_available()),
        packing_by_lengths=packing and cfg.data.packing == "auto")


# --------------------------------------------------------------------------- checks


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


def check_optimizer(cfg: Config, device: str | None = None) -> None:
    """training.optimizer against the device this process trains on (run in the job, where the
    device is, before any weights load: a login node without GPUs decides nothing here)."""

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
