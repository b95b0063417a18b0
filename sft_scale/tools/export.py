"""`sft-scale export`: a clean PEFT adapter (or a consolidated model) from any checkpoint of a run,
including DeepSpeed ZeRO checkpoints whose weights are partitioned across ranks; with
`--format gguf`, a model folder plus its verified GGUF for llama.cpp / Ollama."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sft_scale.config import Config, ConfigError, config_from_dict
from sft_scale.model_source import resolve_model_path
from sft_scale.tools.gguf_export import export_gguf
from sft_scale.tools.merge import check_output, merge
from sft_scale.training.checkpoint import latest_good_checkpoint, verify, weights_only_loads
from sft_scale.training.model import load_tokenizer, resize_for_added_tokens, wrap_lora
from sft_scale.training.rundir import atomic_dir


def run_config(run_dir: Path) -> Config:
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"{run_dir}: no manifest.json; is this an sft_scale output dir?")
    return config_from_dict(json.loads(manifest.read_text())["config"], str(manifest))


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint, consolidated to full fp32 tensors."""
    ds_tag = ckpt / "pytorch_model"
    if ds_tag.is_dir():
        # DeepSpeed's own consolidation of (possibly ZeRO-3-partitioned) weights. It asks
        # torch.load for full unpickling; weights_only_loads overrides that, so a tampered file
        # is refused instead of run. (DeepSpeed imported here: see checkpoint.safe_globals.)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads(ckpt):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model",
                                                          exclude_frozen_parameters=True)
    else:
        sd = load_file(str(ckpt / "model.safetensors"))
    return {k.removeprefix("module."): v.float() for k, v in sd.items()}


def export(run_dir: str, out: str, checkpoint: str | None = None, overwrite: bool = False) -> Path:
    run, out_path = Path(run_dir), Path(out)
    cfg = run_config(run)
    base = resolve_model_path(cfg.model.name_or_path)
    check_output(out_path, overwrite, {"training run": run, "base model": Path(base),
                                       "checkpoint": Path(checkpoint) if checkpoint else None})
    if checkpoint:
        ckpt = Path(checkpoint)
        problem = verify(ckpt)
        if problem:
            raise ConfigError(f"--checkpoint {ckpt}: not a usable checkpoint: {problem}")
    else:
        ckpt = latest_good_checkpoint(run)
        if ckpt is None:
            raise ConfigError(f"{run}: no complete checkpoint in {run / 'checkpoints'}")
    state = checkpoint_state_dict(ckpt)
    # With model.add_tokens the adapter needs the tokenizer training used (same ids).
    tokenizer = load_tokenizer(cfg) if cfg.model.add_tokens or cfg.model.add_special_tokens \
        else AutoTokenizer.from_pretrained(base)
    model_config = AutoConfig.from_pretrained(base)

    with atomic_dir(out_path) as tmp:
        if cfg.lora.enabled:
            # The module structure is all PEFT needs to name the adapter's tensors: meta device.
            with init_empty_weights():
                skeleton = AutoModelForCausalLM.from_config(model_config)
                skeleton = wrap_lora(skeleton, cfg, resize_for_added_tokens(skeleton, cfg, False))
            added = bool(cfg.model.add_tokens or cfg.model.add_special_tokens)
            # Added tokens' rows are trainable tokens in the adapter, not whole embeddings.
            adapter_sd = get_peft_model_state_dict(
                skeleton, state_dict=state, save_embedding_layers=False if added else "auto")
            if not adapter_sd or any(v.numel() == 0 for v in adapter_sd.values()):
                raise ConfigError(f"{ckpt}: holds no adapter weights (empty tensors)")
            save_file({k: v.contiguous() for k, v in adapter_sd.items()},
                      str(tmp / "adapter_model.safetensors"))
            skeleton.peft_config["default"].base_model_name_or_path = base
            skeleton.peft_config["default"].save_pretrained(str(tmp))
        else:
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(model_config)
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            if unexpected or [m for m in missing if "lm_head" not in m or
                              not model_config.tie_word_embeddings]:
                raise ConfigError(f"{ckpt}: weights do not match {base} (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
            model.tie_weights()
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "export_info.json").write_text(json.dumps(
            {"run": str(run), "checkpoint": str(ckpt), "base": base,
             "kind": "adapter" if cfg.lora.enabled else "model"}, indent=2) + "\n")
    return out_path


def export_to_gguf(run_dir: str, out: str, outtype: str = "f16", checkpoint: str | None = None,
                   overwrite: bool = False, pre_tokenizer: str | None = None) -> dict:
    """A checkpoint as a model folder llama.cpp's converter takes (config.json, weights,
    tokenizer) and its verified GGUF. A LoRA checkpoint's adapter is exported to a scratch
    folder and merged (verified) into OUT first: an adapter folder has no config.json."""
    out_path = Path(out)
    # The base and the checkpoint are checked by export() and merge() below; the run here, first.
    check_output(out_path, overwrite, {"training run": Path(run_dir)})
    if not run_config(Path(run_dir)).lora.enabled:
        export(run_dir, out, checkpoint, overwrite)
    else:
        out_path.absolute().parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.adapter-",
                                        dir=out_path.absolute().parent))
        try:
            export(run_dir, str(scratch / "adapter"), checkpoint)
            merge(str(scratch / "adapter"), out, overwrite=overwrite)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return export_gguf(out_path, outtype, pre_tokenizer=pre_tokenizer)
