"""The run directory: what a run leaves in its output dir, each piece written atomically, and
the manifest that says what ran, where, with what, and how it ended.

    OUTPUT_DIR/
      config.resolved.yaml   the config with defaults filled and the resolved batch layout
      deepspeed.resolved.json the DeepSpeed config as used (every "auto" resolved)
      metrics.jsonl          one line per logged step
      adapter/               PEFT adapter (+ tokenizer)   |  model/  for full fine-tuning
      best_adapter/          the adapter (or model) with the best eval.metric so far
      probe.safetensors      input ids and the final model's logits on them (reload checks)
      loss.png               train and eval loss curves; tensorboard/ event files
      summary.json           final numbers
      manifest.json          what ran where: config, DeepSpeed JSON, versions, git commit, hosts,
                             SLURM job, and one entry per attempt (start, end, how it ended)
      checkpoints/           step-N/ folders (see checkpoint.py)
      data_trace/rankN.jsonl the examples each rank trained on (output.trace_samples)
      .run.lock              held by rank 0 while a run writes here (host, pid, start time)

Atomic writes: temporary files and folders (`tempfile`) are created private (0600/0700); what they
become is given the modes the user's umask asks for, as a plain `open()` would have, so that a run
folder shared with a group stays readable by it. merge and export write their outputs with the
same helpers.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import save_file

from sft_scale.config import Config, ConfigError, dump_yaml
from sft_scale.data import collate

# --------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads may be
    creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes `open`/`mkdir` would have."""
    mask = current_umask()
    path = Path(path)
    todo = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in todo:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary sibling folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        apply_umask(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------- manifest


PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "bitsandbytes", "datasets",
            "safetensors", "tokenizers", "sft_scale")


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def attempt_record(accelerator, resumed_from: str | None) -> dict:
    """This attempt's facts (a collective: every rank must call it, for the host list)."""
    hosts = sorted(set(gather_object([socket.gethostname()])))
    return {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ended_at": None,
            "ended": "running", "world_size": accelerator.num_processes, "hostnames": hosts,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "resumed_from": resumed_from}


# --------------------------------------------------------------------------- the run directory


LOCK = ".run.lock"

FINISHED_MARKERS = ("adapter", "model")


def finished_run(out_dir: Path) -> dict | None:
    """The manifest of a run that completed in `out_dir`, if any."""
    m = read_manifest(out_dir)
    if m and m.get("status") == "completed" and any((out_dir / x).exists()
                                                     for x in FINISHED_MARKERS):
        return m
    return None


def refuse_finished(out_dir: Path) -> None:
    raise ConfigError(f"output dir {out_dir} already holds a finished run of another config. "
                      "Choose another --output-dir, or --set output.overwrite=true to replace it.")


def check_writable(out_dir: Path) -> None:
    """Before any weights load: the output dir (and its checkpoints/) must be a folder this
    process can create files in. Tried for real, as permissions alone do not show read-only
    mounts, and root ignores them."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output dir {out_dir} exists and is a file, not a folder. Choose "
                          "another --output-dir, or remove the file.")
    existing = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    for folder in [existing] + [out_dir / sub for sub in ("checkpoints", "adapter", "model")
                                if (out_dir / sub).is_dir()]:
        if not folder.is_dir():
            raise ConfigError(f"output dir {out_dir}: {folder} is a file, not a folder. Choose "
                              "another --output-dir.")
        probe = folder / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output dir {out_dir}: cannot create files in {folder} "
                              f"({e.strerror or e}). Make it writable, or choose another "
                              "--output-dir.") from None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live holder from a reused pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = _process_start(pid)
    return started is None or holder.get("proc_start") in (None, started)


def acquire_run_lock(out_dir: Path) -> Path:
    """An exclusive lock on `out_dir` for this run (rank 0 only), released at exit. A lock left
    by a dead process of this host is taken over; one held by a live process, or by another
    host (whose processes cannot be checked from here), is refused, except that a requeued SLURM
    job takes over the lock of its own earlier attempt (same job id: SLURM never runs both)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "proc_start": _process_start(os.getpid()),
          "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict):
                holder = {}
            same_job = me["slurm_job_id"] is not None \
                and holder.get("slurm_job_id") == me["slurm_job_id"]
            if same_job or (holder.get("host") == me["host"] and not _alive(holder)):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise ConfigError(
                f"output dir {out_dir} is in use by another run (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}; lock "
                f"file {lock}). Wait for it, choose another --output-dir, or delete the lock "
                "file if that run is certainly gone.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_run_lock, lock)
        return lock
    raise ConfigError(f"could not take the run lock {lock}: it keeps reappearing; another run "
                      "is starting in the same output dir.")


def release_run_lock(lock: Path) -> None:
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def start_run_dir(out_dir: Path, cfg: Config, resolved: dict, ds_config: dict | None,
                  resume_step: int | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.resolved.yaml", dump_yaml(cfg, resolved))
    if ds_config is not None:
        atomic_write_json(out_dir / "deepspeed.resolved.json", ds_config)
    metrics = out_dir / "metrics.jsonl"
    if resume_step is None or not metrics.exists():
        atomic_write_text(metrics, "")
    else:
        # Steps after the checkpoint will be trained again: drop their lines.
        keep = [x for x in metrics.read_text().splitlines()
                if x.strip() and json.loads(x)["step"] <= resume_step]
        atomic_write_text(metrics, "".join(x + "\n" for x in keep))


def read_manifest(out_dir: Path) -> dict | None:
    p = out_dir / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else None


def update_manifest(out_dir: Path, **fields) -> dict:
    m = read_manifest(out_dir) or {}
    m.update(fields)
    atomic_write_json(out_dir / "manifest.json", m)
    return m


def finish_run_dir(out_dir: Path, summary: dict) -> None:
    atomic_write_json(out_dir / "summary.json", summary)


def sample_tracer(out_dir: Path, rank: int, dataset):
    path = out_dir / "data_trace" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")

    def trace(step: int, micro_batches: list[list[int]]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "examples": [
                [dataset[i]["_source"] for i in mb] for mb in micro_batches]}) + "\n")
    return trace


def save_model(accelerator, model, serving, cfg: Config, out_dir: Path,
               name: str | None = None) -> Path:
    """Adapter (LoRA) or full model as safetensors, with what serving it needs (`serving`, a
    sft_scale.training.serving.Serving: tokenizer, chat template, generation config); under ZeRO-3
    every rank must take part, because the partitioned weights are gathered collectively."""
    state_dict = accelerator.get_state_dict(model)
    target = out_dir / (name or ("adapter" if cfg.lora.enabled else "model"))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        added = bool(cfg.model.add_tokens or cfg.model.add_special_tokens)
        # The added tokens' rows are in the adapter already (trainable_token_indices); peft
        # would otherwise also save both whole embedding matrices because the vocabulary grew.
        kw = {"save_embedding_layers": False} if added and cfg.lora.enabled else {}
        with atomic_dir(target) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **kw)
            serving.save(tmp, cfg.output.save_tokenizer or added)  # added tokens live only there
    accelerator.wait_for_everyone()
    return target


@torch.no_grad()
def save_probe(accelerator, model, dataset, pad_token_id: int, out_dir: Path, n: int = 2) -> None:
    """The trained model's logits on a few training inputs, so any reload (plain peft, merge,
    export) can be checked against what training really ended with."""
    batch = collate([dataset[i] for i in range(min(n, len(dataset)))], pad_token_id)
    model.eval()
    logits = model(input_ids=batch["input_ids"].to(accelerator.device),
                   attention_mask=batch["attention_mask"].to(accelerator.device)).logits
    model.train()
    if accelerator.is_main_process:
        tensors = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                   "logits": logits.float().cpu().contiguous()}
        tmp = out_dir / ".probe.safetensors.tmp"
        save_file(tensors, str(tmp))
        apply_umask(tmp)
        tmp.replace(out_dir / "probe.safetensors")
