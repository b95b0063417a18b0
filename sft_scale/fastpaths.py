"""The speed switches (attention, loss, compile, data workers), resolved and checked before any
weights load, so `auto` is decided once, printed, and saved with the resolved config."""

from __future__ import annotations

import torch

from sft_scale.attention import PACKED_SDPA, load_attn_implementation, resolve_attn_implementation
from sft_scale.config import Config, ConfigError
from sft_scale.loss import resolve_loss


def model_config(cfg: Config):
    """The model's transformers config (no weights), or None when it cannot be read here."""
    from transformers import AutoConfig

    from sft_scale.builtin import resolve_model_path

    try:
        return AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                          revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return None


def resolve_fast_paths(cfg: Config, zero_stage: int | None = None, mc=None) -> dict:
    """{attn_implementation, attention_kernel, loss, loss_reason, torch_compile, num_workers,
    pin_memory}: what this run will use. Raises ConfigError for a switch that cannot work here
    (flash_attention_2 without flash_attn, liger without liger-kernel or CUDA, chunked under
    ZeRO-3, a negative worker count)."""
    if cfg.data.num_workers < 0:
        raise ConfigError("'data.num_workers' must be >= 0 (0 collates in the training process)")
    attn = resolve_attn_implementation(cfg)
    kernel = load_attn_implementation(cfg)
    loss, why = resolve_loss(cfg, mc, zero_stage)
    return {"attn_implementation": attn,
            "attention_kernel": "sdpa per packed example" if kernel == PACKED_SDPA else kernel,
            "loss": loss, "loss_reason": why, "torch_compile": cfg.training.torch_compile,
            "num_workers": cfg.data.num_workers,
            "pin_memory": bool(cfg.data.pin_memory and torch.cuda.is_available())}
