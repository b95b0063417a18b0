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

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS

from sft_scale.config import Config, ConfigError, dump_yaml
from sft_scale.errors import CheckpointError  # noqa: F401  (re-exported)
from sft_scale.training.rundir import atomic_write_json

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
    return {"model": cfg.model.name_or_path, "lora": cfg.lora.enabled and {
                "r": cfg.lora.r, "target_modules": cfg.lora.target_modules,
                "modules_to_save": cfg.lora.modules_to_save},
            "load_in_8bit": cfg.quantization.load_in_8bit,
            "load_in_4bit": cfg.quantization.load_in_4bit, "optimizer": cfg.training.optimizer,
            "world_size": world_size,
            "global_batch_size": cfg.global_batch_size(world_size), "zero_stage": zero_stage,
            "config_hash": hashlib.sha256(dump_yaml(_without_volatile(cfg)).encode()).hexdigest(),
            "config": _flatten(cfg.to_dict())}


def _without_volatile(cfg: Config) -> Config:
    """The config minus what may change between a run and its resumption (where it writes,
    how often it checkpoints, how long it runs)."""
    return dataclasses.replace(
        cfg, output=dataclasses.replace(cfg.output, dir="", overwrite=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto", allow_data_change=False,
                                       every_steps=0, keep_last=0,
                                       resume_world_size_change="convert"),
        training=dataclasses.replace(cfg.training, max_steps=0, num_epochs=0.0))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Resume policy, key by key. Keys that say where/how long/how often, or how the same arithmetic is
# laid out, are applied as given on resume (the schedule is rebuilt from the new total steps; a
# new micro-batch split of the same global batch trains the same examples). Every other key
# changes what the resumed steps compute, and the optimizer/scheduler state restored from the
# checkpoint would silently override some of them (learning rate, betas): those are refused.
RESUME_APPLIED = ("output.", "checkpoint.", "logging.", "eval.", "training.max_steps",
                  "training.num_epochs", "training.logging_steps", "training.micro_batch_size",
                  "training.gradient_accumulation_steps", "training.torch_compile",
                  "training.trim_last_layer", "training.layer_kernels",
                  "training.gradient_checkpointing", "training.loss", "model.attn_implementation",
                  "data.num_workers", "data.pin_memory", "data.num_proc", "distributed.")


def _refused_changes(saved: dict, current: dict, allow_data: bool) -> list[str]:
    applied = RESUME_APPLIED + (("data.",) if allow_data else ())
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k) and not k.startswith(applied)]


def check_compatible(saved: dict, current: dict, where: Path, allow_data: bool = False,
                     on_world_change: str = "refuse") -> bool:
    """Raises ConfigError when `current` cannot resume `saved`; True when it can only through a
    universal conversion (a DeepSpeed checkpoint, another world size, `on_world_change` convert)."""
    reshard = False
    fresh = "Use a fresh --output-dir, or --set checkpoint.resume=never to start over."
    for key, what in (("model", "base model"), ("lora", "LoRA shape"),
                      ("load_in_8bit", "quantization"), ("load_in_4bit", "4-bit quantization"),
                      ("optimizer", "training.optimizer")):
        # A checkpoint written before the 4-bit/optimizer keys existed lacks them: compatible.
        if (key in saved or key in ("model", "lora", "load_in_8bit")) \
                and saved.get(key) != current.get(key):
            raise ConfigError(f"{where}: checkpoint was trained with {what} {saved.get(key)!r}, "
                              f"this config has {current.get(key)!r}. {fresh}")
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
        # The data position is a function of the step and the global batch.
        raise ConfigError(f"{where}: checkpoint used a global batch of "
                          f"{saved['global_batch_size']}, this layout gives "
                          f"{current['global_batch_size']}; adjust gradient_accumulation_steps "
                          "so micro x accumulation x world size matches.")
    if "config" in saved:
        refused = _refused_changes(saved["config"], current["config"], allow_data)
        if refused:
            raise ConfigError(
                f"{where}: the config differs from the checkpoint's in {', '.join(refused)}; a "
                "resumed run cannot apply these exactly. Restore the checkpoint's values (see "
                f"config.resolved.yaml), or start over: {fresh}")
    elif saved.get("config_hash") != current.get("config_hash"):
        log.warning("%s: the config differs from the one this (older) checkpoint was written "
                    "with and it records no per-key config; resuming anyway", where)
    old_data, new_data = saved.get("data_fingerprint"), current.get("data_fingerprint")
    if old_data and new_data and old_data != new_data:
        if not allow_data:
            raise ConfigError(
                f"{where}: the training data differs from the data this checkpoint was trained "
                f"on (fingerprint {old_data[:12]} -> {new_data[:12]}): the resumed steps would "
                "not continue the same epoch. Restore the data, start over (" + fresh[:-1]
                + "), or --set checkpoint.allow_data_change=true to continue on the new data.")
        log.warning("%s: training data changed since the checkpoint (allowed by "
                    "checkpoint.allow_data_change)", where)
    return reshard


def data_fingerprint(dataset) -> str:
    """sha256 of what training reads (token ids, labels) in dataset order, from the Arrow
    buffers: any change of file, tokenizer, template or mixing shows. Lengths and values are
    hashed as two streams, so how Arrow happens to chunk the table does not matter."""
    h = hashlib.sha256()
    table = dataset.data.table
    for name in ("input_ids", "labels", "label"):
        if name not in table.column_names:
            continue
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for chunk in table.column(name).chunks:
            if hasattr(chunk, "offsets"):  # a list column: one row = a sequence
                lengths.update(pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
                               .astype(np.int64).tobytes())
                chunk = chunk.flatten()
            values.update(np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False)).tobytes())
        h.update(name.encode() + lengths.digest() + values.digest())
    if dataset._indices is not None:  # a select/shuffle view over the table
        h.update(np.asarray(dataset._indices.column(0).combine_chunks()).astype(np.int64)
                 .tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- safe loading

PICKLED_SUFFIXES = (".pt", ".bin", ".pkl", ".pth")
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def safe_globals() -> list:
    """What a checkpoint written by Accelerate or DeepSpeed may reference besides tensors and
    plain containers (torch's own weights_only allow-list): numpy RNG state, and DeepSpeed's
    loss scaler, ZeRO stage enum and fragment addresses. Data classes only; no callables."""
    # DeepSpeed is imported where it is used, not at the top: its import probes for an
    # accelerator (a warning on CPU), a cost only runs that load a checkpoint should pay.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return list(TORCH_SAFE_GLOBALS) + [LossScaler, DynamicLossScaler, ZeroStageEnum,
                                       fragment_address]


@contextmanager
def weights_only_loads(where: Path):
    """Inside, every `torch.load` runs with weights_only=True and only `safe_globals()`: also
    DeepSpeed's engine and zero_to_fp32, which ask for weights_only=False (torch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD wins over the argument). A file that would need any other
    object is refused instead of executed."""
    old = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{where}: refused to load a checkpoint file that holds more than tensors and plain "
            f"data ({first[:200]}). It was tampered with or written by another program; loading "
            "it could run code. Resume from another checkpoint (checkpoint.resume=PATH) or "
            "start over with checkpoint.resume=never.") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = old


def unsafe_content(path: Path) -> str | None:
    """Why a pickled file of checkpoint `path` must not be loaded (an object outside the
    allow-list, or not a torch zip file at all), else None. Static: reads the pickle opcodes,
    not the tensors, and executes nothing."""
    with torch.serialization.safe_globals(safe_globals()):
        for f in sorted(path.rglob("*")):
            if not (f.is_file() and f.suffix in PICKLED_SUFFIXES):
                continue
            name = f.relative_to(path)
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except Exception as e:  # noqa: BLE001 - any parse failure means "not loadable"
                return f"{name} is not a readable PyTorch file ({type(e).__name__}: {e})"
            if bad:
                return (f"{name} references {', '.join(bad[:3])}, which no checkpoint of ours "
                        "holds: refusing to unpickle it (tampered with, or written by another "
                        "program; loading it could run code)")
    return None


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


def _marker_files(marker: Path) -> dict[str, tuple[int, str | None]] | str:
    """The marker's {file: (size, sha256)}, or why it cannot be trusted (hand-made, damaged)."""
    try:
        files = json.loads(marker.read_text())["files"]
        out = {}
        for name, info in files.items():
            digest = info.get("sha256")
            if not isinstance(info["size"], int) or not isinstance(digest, (str, type(None))):
                raise TypeError(f"bad entry for {name}")
            out[str(name)] = (info["size"], digest)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return (f"unreadable COMPLETE marker ({type(e).__name__}: {e}; expected the JSON that "
                "sft_scale writes, with a size and sha256 per file)")
    if not out:
        return "COMPLETE marker lists no files"
    return out


def verify(path: Path) -> str | None:
    """None if `path` is a complete, intact checkpoint whose pickled files hold only allowed
    objects, else why not."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "not a folder"
    marker = path / MARKER
    if not marker.is_file():
        return "incomplete (no COMPLETE marker: the writer died or is still writing)"
    expected = _marker_files(marker)
    if isinstance(expected, str):
        return expected
    for name, (size, digest) in expected.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
        if digest is not None and _file_digest(f) != digest:
            return f"{name} checksum mismatch (corrupt)"
    return unsafe_content(path) or _rng_problem(path)


def _rng_problem(path: Path) -> str | None:
    """Accelerate swallows an unreadable RNG file with an INFO line and resumes with the wrong
    random state (no longer exact): check every rank's file here instead."""
    for f in sorted(path.glob("random_states_*.pkl")):
        try:
            with weights_only_loads(path):
                states = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - garbage, truncation, refused payload alike
            return f"{f.name} is unreadable ({type(e).__name__}): corrupt RNG state"
        if not isinstance(states, dict) or not {"random_state", "numpy_random_seed",
                                                "torch_manual_seed"} <= set(states):
            return f"{f.name} does not hold the RNG states Accelerate writes (corrupt?)"
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
            f"{error or 'another rank failed'}{diagnose_full_disk(root, prev)}. Nothing was "
            f"changed: the previous checkpoint "
            f"({prev[-1].name if prev else 'none'}) is intact. Free disk space or fix permissions, "
            "then rerun the same command to resume.") from error
    if main:
        _prune(out_dir, keep_last)
        log.info("checkpoint saved: %s (%s)", final, reason)
    accelerator.wait_for_everyone()
    return final


def diagnose_full_disk(root: Path, previous: list[Path]) -> str:
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
        if not path.exists():
            raise ConfigError(f"checkpoint.resume={choice}: no such folder. Point it at a "
                              "checkpoint (OUTPUT_DIR/checkpoints/step-N), or use auto or never.")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume={choice}: cannot resume from it: {problem}")
        return path
    return latest_good_checkpoint(out_dir)


def latest_good_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint in `out_dir` that verifies (a broken one is skipped, warned about)."""
    for path in reversed(list_checkpoints(out_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    return None


def read_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, checked for the fields resume needs."""
    f = path / STATE
    try:
        saved = json.loads(f.read_text())
        step = saved["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step is {step!r}, expected a whole number >= 0")
        for key in ("tokens_seen", "slots_seen", "losses", "scheduler", "identity"):
            saved[key]  # noqa: B018 - presence check
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable trainer state ({type(e).__name__}: {e}); expected "
                              "the JSON sft_scale writes. Resume from another checkpoint "
                              "(checkpoint.resume=PATH) or start over (checkpoint.resume=never)."
                              ) from None
    return saved


def check_resume(path: Path, identity: dict, total: int, allow_data_change: bool,
                 on_world_change: str = "refuse") -> dict:
    """Everything that decides whether `path` can be resumed by this config, checked before the
    run writes anything; returns the checkpoint's trainer state."""
    saved = read_state(path)
    check_compatible(saved["identity"], identity, path, allow_data_change, on_world_change)
    if saved["step"] > total:
        raise ConfigError(f"{path}: checkpoint is at step {saved['step']}, beyond this run's "
                          f"{total} total steps (training.max_steps / training.num_epochs). "
                          f"Set training.max_steps to at least {saved['step']}, or start over "
                          "with checkpoint.resume=never.")
    return saved


def load_checkpoint(accelerator, path: Path, scheduler, state, identity: dict,
                    on_world_change: str = "refuse") -> None:
    saved = read_state(path)
    reshard = check_compatible(saved["identity"], identity, path, allow_data=True,  # (applied
                               on_world_change=on_world_change)  # by check_resume)
    with weights_only_loads(path):
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
