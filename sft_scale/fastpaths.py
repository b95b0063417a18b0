"""The speed switches (attention, loss, compile, data workers), resolved and checked before any
weights load, so `auto` is decided once, printed, and saved with the resolved config."""

from __future__ import annotations

import torch

from sft_scale.attention import PACKED_SDPA, load_attn_implementation, resolve_attn_implementation
from sft_scale.config import Config, ConfigError
from sft_scale.data.pipeline import check_max_seq_len
from sft_scale.loss import resolve_loss


def model_config(cfg: Config):
    """The model's transformers config (no weights), or None when it cannot be read here."""
    from transformers import AutoConfig

    from sft_scale.builtin import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path, cfg.model.revision)  # a clear ConfigError
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None


def passes_boundaries(mc) -> bool | None:
    """Whether the model's attention layers hand their extra forward arguments (the packed
    example boundaries, cu_seq_lens_*) to the attention function: transformers marks the models
    that do with `_supports_attention_backend`. None when the class is unknown here (no config,
    or remote code)."""
    if mc is None:
        return None
    from transformers import AutoModelForCausalLM

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
    An "auto: on" is decided again from the tokenized lengths (sft_scale/data/layout.py:
    choose_layout, packing-layout): padded batches where they would be >= 99% real tokens.
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


def resolve_fast_paths(cfg: Config, zero_stage: int | None = None, mc=None) -> dict:
    """{attn_implementation, attention_kernel, packing, packing_reason, group_by_length, loss,
    loss_reason, torch_compile, num_workers, pin_memory}: what this run will use. Raises
    ConfigError for a switch that cannot work here (flash_attention_2 without flash_attn, liger
    without liger-kernel or CUDA, chunked under ZeRO-3, a negative worker count, packing on a
    model that cannot keep packed examples apart).

    `data.packing: auto` is settled in `cfg` itself: it decides batching in the data pipeline,
    the sampler and the model's attention alike, and the saved config then says what ran."""
    if cfg.data.num_workers < 0:
        raise ConfigError("'data.num_workers' must be >= 0 (0 collates in the training process)")
    check_max_seq_len(cfg, mc)
    attn = resolve_attn_implementation(cfg)
    cfg.data.packing, packing_why = resolve_packing(cfg, attn, mc)
    kernel = load_attn_implementation(cfg)
    loss, why = resolve_loss(cfg, mc, zero_stage)
    return {"attn_implementation": attn,
            "attention_kernel": "sdpa per packed example" if kernel == PACKED_SDPA else kernel,
            "packing": cfg.data.packing, "packing_reason": packing_why,
            # packed rows have no padding to save: length grouping only matters without them
            "group_by_length": cfg.data.group_by_length and not cfg.data.packing,
            "loss": loss, "loss_reason": why, "torch_compile": cfg.training.torch_compile,
            "num_workers": cfg.data.num_workers,
            "pin_memory": bool(cfg.data.pin_memory and torch.cuda.is_available())}
