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
            "load_in_8bit": cfg.quantization.load_in_8bit, "world_size": world_size,
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
    c.checkpoint.resume_world_size_change = "convert"
    return c


def check_compatible(saved: dict, current: dict, where: Path,
                     on_world_change: str = "refuse") -> bool:
    """Raises ConfigError when `current` cannot resume `saved`; True when it can only through a
    universal conversion (a DeepSpeed checkpoint, another world size, `on_world_change` convert)."""
    reshard = False
    for key, what in (("model", "base model"), ("lora", "LoRA shape"),
                      ("load_in_8bit", "quantization")):
        if saved.get(key) != current.get(key):
            raise ConfigError(f"{where}: checkpoint was trained with {what} {saved.get(key)!r}, "
                              f"this config has {current.get(key)!r}. Use a fresh --output-dir, "
                              "or --set checkpoint.resume=never to start over.")
    if saved.get("world_size") != current.get("world_size"):
        if saved.get("zero_stage") is not None or current.get("zero_stage") is not None:
            if on_world_change != "convert" or saved.get("zero_stage") is None \
                    or current.get("zero_stage") is None:
                raise ConfigError(
                    f"{where}: DeepSpeed checkpoint written by {saved['world_size']} processes "
                    f"(ZeRO stage {saved.get('zero_stage')}); this run has "
                    f"{current['world_size']} (stage {current.get('zero_stage')}). Resume with "
                    f"{saved['world_size']} processes, or under DeepSpeed set "
                    "checkpoint.resume_world_size_change=convert to reshard it through "
                    "DeepSpeed's universal checkpoint (" + MANUAL_UNIVERSAL.format(path=where)
                    + ").")
            reshard = True
        if saved.get("global_batch_size") != current.get("global_batch_size"):
            raise ConfigError(f"{where}: checkpoint used a global batch of "
                              f"{saved['global_batch_size']}, this layout gives "
                              f"{current['global_batch_size']}; adjust gradient_accumulation_steps "
                              "so micro x accumulation x world size matches.")
    if saved.get("config_hash") != current.get("config_hash"):
        log.warning("%s: the config differs from the one this checkpoint was written with "
                    "(hyperparameters changed?); resuming anyway", where)
    return reshard


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


def load_checkpoint(accelerator, path: Path, scheduler, state, identity: dict,
                    on_world_change: str = "refuse") -> None:
    saved = json.loads((path / STATE).read_text())
    reshard = check_compatible(saved["identity"], identity, path, on_world_change)
    if _is_deepspeed(accelerator):
        # Frozen weights were excluded on save; they come from the base model.
        if reshard:
            _load_universal(accelerator, to_universal(accelerator, path))
        else:
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


# The manual route, should the automatic conversion fail (or be refused).
MANUAL_UNIVERSAL = ("manually: python -m deepspeed.checkpoint.ds_to_universal --input_folder "
                    "{path}/pytorch_model --output_folder {path}/universal/pytorch_model "
                    "--inject_missing_state, then "
                    "resume with checkpoint.resume_world_size_change=convert, which loads it with "
                    "DeepSpeed's checkpoint.load_universal")
UNIVERSAL = "universal"


def to_universal(accelerator, path: Path) -> Path:
    """`path/universal`, holding DeepSpeed's universal form of the checkpoint's engine state
    (`ds_to_universal`: fp32 master weights and Adam moments per parameter, unpartitioned),
    which any number of processes can load. Rank 0 converts once, the others wait; the
    checkpoint's own files are not changed (its COMPLETE marker lists only them), and a finished
    conversion is reused by later attempts."""
    out = Path(path) / UNIVERSAL
    done = out / MARKER
    error = None
    if accelerator.is_main_process and not done.is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = Path(path) / f".{UNIVERSAL}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s to a universal checkpoint for %d processes (DeepSpeed "
                 "ds_to_universal)", path, accelerator.num_processes)
        try:
            # One worker: serial, so it runs anywhere (no process pool inside a launched rank).
            ds_to_universal(Namespace(
                input_folder=str(Path(path) / "pytorch_model"),
                output_folder=str(tmp / "pytorch_model"), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                # Only Megatron-style clients record universal_checkpoint_info; DeepSpeed's
                # converter adds the version stamp for everyone else with this flag.
                inject_missing_state=True))
            atomic_write_json(tmp / MARKER, {"from": str(path)})
            os.rename(tmp, out)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, not hang
            error = e
            shutil.rmtree(tmp, ignore_errors=True)
    failed = accelerator.reduce(torch.tensor([1.0 if error else 0.0], device=accelerator.device),
                                reduction="sum").item()
    if failed:
        raise CheckpointError(
            f"{path}: converting to DeepSpeed's universal checkpoint failed "
            f"({error or 'on rank 0'}). Resume with the original number of processes, or convert "
            + MANUAL_UNIVERSAL.format(path=path) + ".") from error
    return out


def _load_universal(accelerator, folder: Path) -> None:
    """The engine reads `checkpoint.load_universal` only while loading, so it is switched on
    for this load alone (the next save writes an ordinary checkpoint). The per-rank RNG states
    of another world size cannot be mapped onto this one: Accelerate reports them missing and
    the run keeps its seeded RNG (only dropout masks differ from an uninterrupted run)."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine._config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(folder), load_module_strict=False)
    finally:
        engine._config.load_universal_checkpoint = False
    log.info("resumed through the universal checkpoint %s on %d processes", folder,
             accelerator.num_processes)


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
