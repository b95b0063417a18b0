"""Checkpoints that survive kills, full disks and preemption, and resume exactly.

A checkpoint is `OUTPUT_DIR/checkpoints/step-NNNNNNNN/`:
  Accelerate's `save_state` (trainable weights, optimizer, per-rank RNG; under DeepSpeed the
  engine's own, possibly partitioned, state), `trainer_state.json` (step, tokens, losses,
  scheduler, the data position, what the run was) and `COMPLETE` (file sizes and checksums).
It is written into a temporary folder and renamed only once every rank has written its part, so
a folder without `COMPLETE` is never a checkpoint. The data position is a pure function of the
step (see data/sampler.py), so step + RNG + optimizer + scheduler is the whole training state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from sft_scale.config import Config, ConfigError
from sft_scale.errors import CheckpointError  # noqa: F401  (re-exported)
from sft_scale.io_utils import atomic_write_json

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE = "trainer_state.json"
_HASH_LIMIT = 256 * 2**20  # checksum files up to this size; larger ones are checked by size


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")),
                  key=lambda p: p.name)


def run_identity(cfg: Config, world_size: int, zero_stage: int | None) -> dict:
    """What a checkpoint must agree with to be resumed."""
    from sft_scale.config import dump_yaml

    return {"model": cfg.model.name_or_path, "lora": cfg.lora.enabled and {
                "r": cfg.lora.r, "target_modules": cfg.lora.target_modules,
                "modules_to_save": cfg.lora.modules_to_save},
            "load_in_8bit": cfg.quantization.load_in_8bit,
            "load_in_4bit": cfg.quantization.load_in_4bit, "optimizer": cfg.training.optimizer,
            "world_size": world_size,
            "global_batch_size": cfg.global_batch_size(world_size), "zero_stage": zero_stage,
            "config_hash": hashlib.sha256(dump_yaml(_without_volatile(cfg)).encode()).hexdigest()}


def _without_volatile(cfg: Config) -> Config:
    """The config minus what may change between a run and its resumption (where it writes,
    how often it checkpoints, how long it runs)."""
    import copy

    c = copy.deepcopy(cfg)
    c.output.dir, c.checkpoint.resume, c.output.overwrite = "", "auto", False
    c.training.max_steps, c.training.num_epochs = 0, 0.0
    c.checkpoint.every_steps, c.checkpoint.keep_last = 0, 0
    return c


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    for key, what in (("model", "base model"), ("lora", "LoRA shape"),
                      ("load_in_8bit", "quantization"), ("load_in_4bit", "4-bit quantization"),
                      ("optimizer", "training.optimizer")):
        # A checkpoint written before the 4-bit/optimizer keys existed lacks them: compatible.
        if (key in saved or key in ("model", "lora", "load_in_8bit")) \
                and saved.get(key) != current.get(key):
            raise ConfigError(f"{where}: checkpoint was trained with {what} {saved.get(key)!r}, "
                              f"this config has {current.get(key)!r}. Use a fresh --output-dir, "
                              "or --set checkpoint.resume=never to start over.")
    if saved.get("world_size") != current.get("world_size"):
        if saved.get("zero_stage") is not None or current.get("zero_stage") is not None:
            raise ConfigError(f"{where}: DeepSpeed checkpoint written by {saved['world_size']} "
                              f"processes cannot be resharded to {current['world_size']}. Resume "
                              f"with {saved['world_size']} processes.")
        if saved.get("global_batch_size") != current.get("global_batch_size"):
            raise ConfigError(f"{where}: checkpoint used a global batch of "
                              f"{saved['global_batch_size']}, this layout gives "
                              f"{current['global_batch_size']}; adjust gradient_accumulation_steps "
                              "so micro x accumulation x world size matches.")
    if saved.get("config_hash") != current.get("config_hash"):
        log.warning("%s: the config differs from the one this checkpoint was written with "
                    "(hyperparameters changed?); resuming anyway", where)


# --------------------------------------------------------------------------- verification


def _file_digest(path: Path) -> str | None:
    if path.stat().st_size > _HASH_LIMIT:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inventory(folder: Path) -> dict:
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def verify(path: Path) -> str | None:
    """None if `path` is a complete, intact checkpoint, else why not."""
    marker = path / MARKER
    if not marker.is_file():
        return "incomplete (no COMPLETE marker: the writer died or is still writing)"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable COMPLETE marker ({e})"
    for name, info in expected.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {info['size']} (truncated?)"
        if info["sha256"] is not None and _file_digest(f) != info["sha256"]:
            return f"{name} checksum mismatch (corrupt)"
    return None


# --------------------------------------------------------------------------- save


def save_checkpoint(accelerator, scheduler, state, identity: dict, out_dir: Path,
                    keep_last: int, reason: str = "interval") -> Path:
    """Every rank calls this. On any rank's failure the partial folder is removed, the previous
    checkpoints are untouched, and CheckpointError is raised on every rank."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error = None
    try:
        kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
        accelerator.save_state(str(tmp), **kwargs)
        if main:
            atomic_write_json(tmp / STATE, {
                "step": state.step, "tokens_seen": state.tokens_seen,
                "slots_seen": state.slots_seen, "losses": state.losses, "best": state.best,
                "scheduler": _json_safe(scheduler.state_dict()), "identity": identity,
                "reason": reason, "saved_at": time.time()})
    except Exception as e:  # noqa: BLE001 - any failure must leave the old checkpoints intact
        error = e
    failed = accelerator.reduce(torch.tensor([1.0 if error else 0.0], device=accelerator.device),
                                reduction="sum").item()
    if failed == 0 and main:
        try:
            marker = {"step": state.step, "files": _inventory(tmp)}
            with open(tmp / MARKER, "w") as f:
                json.dump(marker, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
        except Exception as e:  # noqa: BLE001
            error = e
    failed = accelerator.reduce(torch.tensor([1.0 if error else 0.0], device=accelerator.device),
                                reduction="sum").item()
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = [p for p in list_checkpoints(out_dir) if p != final]
        raise CheckpointError(
            f"could not write the checkpoint for step {state.step} in {root}: "
            f"{error or 'another rank failed'}{_diagnose(root, prev)}. Nothing was changed: the "
            f"previous checkpoint "
            f"({prev[-1].name if prev else 'none'}) is intact. Free disk space or fix permissions, "
            "then rerun the same command to resume.") from error
    if main:
        _prune(out_dir, keep_last)
        log.info("checkpoint saved: %s (%s)", final, reason)
    accelerator.wait_for_everyone()
    return final


def _diagnose(root: Path, previous: list[Path]) -> str:
    """Library errors on a full disk can be cryptic ("unexpected pos ..."): say it plainly."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    need = max([sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in previous]
               or [0])
    if free < max(need, 1 << 20):
        return (f" (the disk is full: {free:,} bytes free on the filesystem holding {root}, "
                f"a checkpoint needs about {need:,})")
    return ""


def _prune(out_dir: Path, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(out_dir) if (p / MARKER).exists()]
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


# --------------------------------------------------------------------------- resume


def find_resume_checkpoint(cfg: Config, out_dir: Path) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None
    if choice != "auto":
        path = Path(choice)
        problem = verify(path) if path.is_dir() else "not a folder"
        if problem:
            raise CheckpointError(f"checkpoint.resume={choice}: cannot resume from it: {problem}")
        return path
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    return None


def load_checkpoint(accelerator, path: Path, scheduler, state, identity: dict) -> None:
    saved = json.loads((path / STATE).read_text())
    check_compatible(saved["identity"], identity, path)
    if _is_deepspeed(accelerator):
        # Frozen weights were excluded on save; they come from the base model.
        accelerator.load_state(str(path), load_module_strict=False)
    else:
        accelerator.load_state(str(path), strict=False)
    scheduler.load_state_dict(saved["scheduler"])
    state.step = saved["step"]
    state.tokens_seen = saved["tokens_seen"]
    state.slots_seen = saved["slots_seen"]
    state.losses = list(saved["losses"])
    state.best = saved.get("best")
    log.info("resumed from %s at step %d", path, state.step)


def keep_trainable_only(accelerator, model) -> None:
    """Outside DeepSpeed, Accelerate saves the whole state dict; for LoRA that is the frozen base
    again in every checkpoint. Keep only what training changes (frozen weights are reloaded
    from the base model)."""
    if _is_deepspeed(accelerator):
        return
    trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters()
                 if p.requires_grad}

    def hook(models, weights, _output_dir):
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items()
                          if k in trainable or k.replace("module.", "", 1) in trainable}

    accelerator.register_save_state_pre_hook(hook)
