"""The recipe: config -> accelerator -> data -> model -> loop -> save.

    accelerate launch sft_scale/train.py --config examples/demo.yaml [--set training.max_steps=6]
    python sft_scale/train.py --config examples/demo.yaml
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: make the package importable, and keep this folder's module names (config,
    # evaluate, ...) from shadowing top-level libraries of the same name.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from safetensors import SafetensorError

from sft_scale.config import Config, ConfigError, check_warmup, dump_yaml, load_config
from sft_scale.data import GlobalBatchSampler, build_datasets
from sft_scale.data.prepared import find_prepared, load_prepared
from sft_scale.data.templates import resolve_template
from sft_scale.errors import OutputWriteError, SftScaleError, run_reporting_errors
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import Resolved, in_job_layout, resolve
from sft_scale.training import checkpoint as ckpt
from sft_scale.training import rundir
from sft_scale.training.distributed import describe, make_accelerator
from sft_scale.training.loop import (
    Batches,
    LoopState,
    StepHooks,
    Training,
    build_optimizer,
    build_scheduler,
    total_steps,
    train_loop,
)
from sft_scale.training.metrics import MetricsWriter, plot_losses
from sft_scale.training.model import compile_model, count_parameters, load_model, load_tokenizer
from sft_scale.training.preemption import PREEMPTED_EXIT_CODE, Preemption
from sft_scale.training.rundir import attempt_record, git_commit, package_versions
from sft_scale.training.serving import for_training
from sft_scale.training.tasks import Task, causal_lm, classification
from sft_scale.training.validation import evaluate, improved

log = logging.getLogger("sft_scale")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Supervised fine-tuning with LoRA/8-bit/DeepSpeed.")
    ap.add_argument("--config", required=True, help="YAML config, e.g. examples/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set training.max_steps=6 (repeatable)")
    ap.add_argument("--output-dir", default=None, help="override output.dir")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def train() -> int:
        summary = run(load_config(args.config, args.overrides, args.output_dir))
        return PREEMPTED_EXIT_CODE if summary.get("ended") == "preempted" else 0

    return run_reporting_errors(train)


def run(cfg: Config) -> dict:
    """Train as the config says; returns the run summary (also saved as summary.json).
    `summary["ended"]` is "completed", "preempted" (checkpoint written) or "already_completed"."""
    started = time.time()
    preemption = Preemption().install()  # early: a signal during loading must not kill us
    resolved = resolve(cfg, in_job_layout(cfg), in_job=True)
    accelerator = make_accelerator(cfg, resolved.deepspeed)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    out_dir = Path(cfg.output.dir)
    identity = ckpt.run_identity(cfg, resolved.world_size, resolved.zero_stage)
    finished = already_completed(cfg, out_dir, identity, accelerator.is_main_process)
    if finished is not None:
        return finished
    resume_from = find_resume(cfg, out_dir, accelerator.is_main_process)
    data, resolved = load_training_data(cfg, accelerator, resolved)
    resume_step = check_data(cfg, resolved, data, identity, resume_from,
                             accelerator.is_main_process)
    run_dir = start_run(cfg, resolved, data, accelerator, identity, resume_from, resume_step)
    metrics = MetricsWriter(None)
    try:
        training, serving, state = build_training(cfg, resolved, data, accelerator, identity,
                                                  resume_from)
        preemption.track(state)
        metrics = open_metrics(cfg, out_dir, accelerator.is_main_process)
        evaluator = Evaluator(cfg, training, data, metrics, run_dir, serving)
        hooks = RunHooks(cfg, training, preemption, evaluator, run_dir, identity,
                         resolved.total_steps)
        batches = step_batches(cfg, resolved, data, accelerator.process_index, out_dir)
        state = run_dir.guard("training", train_loop, training, batches, cfg, metrics, state,
                             hooks)
        preemption.immediate = False  # from here on a signal waits for the saves below
        if state.step < resolved.total_steps:
            return save_preempted(cfg, training, run_dir, identity, state, preemption)
        return save_completed(cfg, training, data, run_dir, identity, state, evaluator, serving,
                              started)
    finally:
        metrics.close()
        accelerator.end_training()


# --------------------------------------------------------------------------- decide and resume


def already_completed(cfg: Config, out_dir: Path, identity: dict, main_proc: bool) -> dict | None:
    """The summary of this very run when it already completed in `out_dir` (nothing to do); a
    ConfigError when another run completed there; None otherwise."""
    finished = rundir.finished_run(out_dir)
    if not finished or cfg.output.overwrite:
        return None
    if finished.get("identity", {}).get("config_hash") != identity["config_hash"] \
            or cfg.checkpoint.resume == "never":
        rundir.refuse_finished(out_dir)
    if main_proc:
        print(f"run in {out_dir} already completed; nothing to do", flush=True)
    summary = json.loads((out_dir / "summary.json").read_text())
    return dict(summary, ended="already_completed")


def find_resume(cfg: Config, out_dir: Path, main_proc: bool) -> Path | None:
    if main_proc:
        rundir.check_writable(out_dir)
    return None if cfg.output.overwrite else ckpt.find_resume_checkpoint(cfg, out_dir)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainingData:
    tokenizer: Any
    train: Any  # datasets.Dataset
    eval: Any | None
    stats: Any  # sft_scale.data.DataStats
    task: Task
    problem: str | None  # classification: binary, single_label or multi_label

    @property
    def labels(self) -> list[str] | None:
        return self.stats.labels


def load_training_data(cfg: Config, accelerator,
                       resolved: Resolved) -> tuple[TrainingData, Resolved]:
    """Tokenizer, training and eval sets, and the task (loss, collation) they are trained with;
    and the resolved record completed by them (steps; packing, where the lengths decide)."""
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, stats = load_data(cfg, tokenizer, accelerator)
    # before with_data: choosing the layout walks a global batch, 100M rows for a typo'd micro
    _check_micro_batch(cfg, len(train_ds))
    resolved = resolved.with_data(cfg, train_ds["length"],
                                  total_steps(cfg, len(train_ds), resolved.world_size))
    if cfg.task == "classification":
        multi = isinstance(train_ds[0]["label"], list)
        problem = "multi_label" if multi else ("binary" if len(stats.labels) == 2
                                               else "single_label")
        task = classification(len(stats.labels), problem)
    else:
        problem, task = None, causal_lm(resolved.fast.packing, resolved.fast.loss)
    return TrainingData(tokenizer, train_ds, eval_ds, stats, task, problem), resolved


def check_data(cfg: Config, resolved: Resolved, data: TrainingData, identity: dict,
               resume_from: Path | None, main_proc: bool) -> int | None:
    """Checks that need the data, before anything is written; returns the step to resume at.
    Adds the data's fingerprint to `identity` (what a resume must match)."""
    warmup_warning = check_warmup(cfg, resolved.total_steps)
    if warmup_warning and main_proc:
        log.warning("WARNING: %s", warmup_warning)
    identity["data_fingerprint"] = ckpt.data_fingerprint(data.train)
    if resume_from is None:
        return None
    return ckpt.check_resume(resume_from, identity, resolved.total_steps,
                             cfg.checkpoint.allow_data_change,
                             cfg.checkpoint.resume_world_size_change)["step"]


def run_record(cfg: Config, resolved: Resolved, data: TrainingData, accelerator) -> dict:
    """What was resolved, as printed at start and saved in config.resolved.yaml, the manifest
    and summary.json."""
    return {"task": cfg.task, "problem": data.problem, "world_size": resolved.world_size,
            "global_batch_size": resolved.global_batch_size,
            "micro_batch_size": cfg.training.micro_batch_size,
            "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
            "total_steps": resolved.total_steps, "data": data.stats.as_dict(),
            "distributed_type": accelerator.distributed_type.value,
            "zero_stage": resolved.zero_stage, "fast_paths": resolved.fast.as_dict()}


# --------------------------------------------------------------------------- the run directory


@dataclass
class RunDirectory:
    """The output dir of this attempt: its manifest record, and `guard` for every write."""

    out_dir: Path
    attempt: dict
    main_proc: bool
    record: dict

    def guard(self, what: str, fn, *args, **kwargs):
        return self._guard(what, fn, *args, **kwargs)

    def __post_init__(self):
        self._guard = _write_guard(rundir, self.out_dir, self.attempt, self.main_proc)

    def finish(self, status: str, ended: str) -> None:
        if self.main_proc:
            self.attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ended=ended)
            _finish_attempt(rundir, self.out_dir, self.attempt, status)


def start_run(cfg: Config, resolved: Resolved, data: TrainingData, accelerator, identity: dict,
              resume_from: Path | None, resume_step: int | None) -> RunDirectory:
    """The first write: everything before only read and checked. Takes the run lock, writes the
    resolved config and the manifest with this attempt."""
    out_dir, main_proc = Path(cfg.output.dir), accelerator.is_main_process
    record = run_record(cfg, resolved, data, accelerator)
    if main_proc:
        rundir.acquire_run_lock(out_dir)
        if cfg.output.overwrite:
            shutil.rmtree(ckpt.checkpoint_root(out_dir), ignore_errors=True)
    accelerator.wait_for_everyone()
    if main_proc:
        log.info(describe(accelerator))
        print("resolved config:\n" + dump_yaml(cfg, record), flush=True)
        log.info("global batch = %d micro x %d accumulation x %d processes = %d examples/step",
                 cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps,
                 resolved.world_size, resolved.global_batch_size)
        rundir.start_run_dir(out_dir, cfg, record, resolved.deepspeed, resume_step)
    accelerator.wait_for_everyone()
    attempt = attempt_record(accelerator, str(resume_from) if resume_from else None)
    if main_proc:
        prior = rundir.read_manifest(out_dir) or {}
        rundir.update_manifest(
            out_dir, status="running", identity=identity, config=cfg.to_dict(),
            resolved=record, deepspeed_config=resolved.deepspeed, packages=package_versions(),
            git_commit=git_commit(), attempts=prior.get("attempts", []) + [attempt])
    return RunDirectory(out_dir, attempt, main_proc, record)


def open_metrics(cfg: Config, out_dir: Path, main_proc: bool) -> MetricsWriter:
    return MetricsWriter(
        out_dir / "metrics.jsonl" if main_proc else None,
        out_dir / "tensorboard" if main_proc and cfg.logging.tensorboard else None,
        cfg.to_dict() if main_proc and cfg.logging.wandb else None)


# --------------------------------------------------------------------------- model


def build_training(cfg: Config, resolved: Resolved, data: TrainingData, accelerator,
                   identity: dict, resume_from: Path | None):
    """(Training, Serving, LoopState): the model, optimizer and schedule prepared by the
    accelerator, with the checkpoint's state over them when resuming."""
    set_seed(cfg.training.seed)
    model = load_model(cfg, resolved, accelerator.local_process_index, data.labels, data.problem,
                       data.tokenizer.pad_token_id)
    template = resolve_template(data.tokenizer, cfg.data.chat_template) \
        if data.stats.chat else None
    tokenizer_path = resolve_model_path(cfg.model.tokenizer) if cfg.model.tokenizer \
        else resolved.model_path
    serving = for_training(data.tokenizer, tokenizer_path, template, data.stats.bos)
    if cfg.training.torch_compile:
        compile_model(model)  # in place, before prepare: see compile_model
    trainable, total = count_parameters(model)
    if accelerator.is_main_process:
        log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, resolved.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt.keep_trainable_only(accelerator, model)
    state = LoopState()
    if resume_from is not None:
        ckpt.load_checkpoint(accelerator, resume_from, scheduler, state, identity,
                             cfg.checkpoint.resume_world_size_change)
    training = Training(accelerator, model, optimizer, scheduler, trainable, total)
    return training, serving, state


def step_batches(cfg: Config, resolved: Resolved, data: TrainingData, rank: int,
                 out_dir: Path) -> Batches:
    """What each step trains on: the sampler (a pure function of the step), the task's
    collation, and the sample trace (output.trace_samples)."""
    grouped = resolved.fast.group_by_length
    sampler = GlobalBatchSampler(len(data.train), cfg.training.micro_batch_size,
                                 cfg.training.gradient_accumulation_steps, resolved.world_size,
                                 rank, cfg.training.seed,
                                 lengths=list(data.train["length"]) if grouped else None)
    trace = rundir.sample_tracer(out_dir, rank, data.train) if cfg.output.trace_samples \
        else None
    return Batches(data.train, sampler, data.task, data.tokenizer.pad_token_id,
                   resolved.total_steps, trace)


# --------------------------------------------------------------------------- the loop's hooks


class Evaluator:
    """Evaluation on the held-out split; keeps the best adapter by eval.metric."""

    def __init__(self, cfg: Config, training: Training, data: TrainingData,
                 metrics: MetricsWriter, run: RunDirectory, serving):
        self.cfg, self.training, self.data = cfg, training, data
        self.metrics, self.run, self.serving = metrics, run, serving

    def __call__(self, state: LoopState) -> dict | None:
        if self.data.eval is None:
            return None
        t, cfg = self.training, self.cfg
        res = evaluate(t.accelerator, t.model, self.data.eval, self.data.task,
                       cfg.eval.micro_batch_size, self.data.tokenizer.pad_token_id,
                       len(self.data.labels or []), self.data.problem or "")
        self.metrics.write({"step": state.step, **res})
        if t.accelerator.is_main_process:
            log.info("eval at step %d: %s", state.step, json.dumps(res))
        value = res[cfg.eval.metric]
        if improved(cfg.eval.metric, value, state.best):
            state.best = {"step": state.step, "metric": cfg.eval.metric, "value": value}
            self.run.guard("best adapter", rundir.save_model, t.accelerator, t.model,
                           self.serving, cfg, self.run.out_dir, name="best_adapter")
        return res


class RunHooks(StepHooks):
    """After each step: stop when preempted, evaluate and checkpoint on schedule."""

    def __init__(self, cfg: Config, training: Training, preemption: Preemption,
                 evaluate_fn: Evaluator, run: RunDirectory, identity: dict, steps: int):
        self.cfg, self.training, self.preemption = cfg, training, preemption
        self.evaluate, self.run, self.identity, self.steps = evaluate_fn, run, identity, steps

    def after_step(self, state: LoopState) -> bool:
        if self.preemption.requested(self.training.accelerator):
            return True
        every_eval, every_ckpt = self.cfg.eval.every_steps, self.cfg.checkpoint.every_steps
        if every_eval and state.step % every_eval == 0 and state.step < self.steps:
            self.evaluate(state)
        if every_ckpt and state.step % every_ckpt == 0 and state.step < self.steps:
            save_checkpoint(self.cfg, self.training, self.run, self.identity, state)
        return False


def save_checkpoint(cfg: Config, training: Training, run: RunDirectory, identity: dict,
                    state: LoopState, reason: str | None = None) -> None:
    kwargs = {"reason": reason} if reason else {}
    run.guard("checkpoint", ckpt.save_checkpoint, training.accelerator, training.scheduler,
              state, identity, run.out_dir, cfg.checkpoint.keep_last, **kwargs)


# --------------------------------------------------------------------------- save


def save_preempted(cfg: Config, training: Training, run: RunDirectory, identity: dict,
                   state: LoopState, preemption: Preemption) -> dict:
    save_checkpoint(cfg, training, run, identity, state, reason="preempted")
    run.finish("preempted", f"preempted at step {state.step} "
                            f"({', '.join(preemption.received) or 'signal on another rank'})")
    if run.main_proc:
        print(f"preempted: checkpoint at step {state.step} written; rerun the same command "
              "to resume", flush=True)
    training.accelerator.wait_for_everyone()
    return {"ended": "preempted", "steps": state.step}


def save_completed(cfg: Config, training: Training, data: TrainingData, run: RunDirectory,
                   identity: dict, state: LoopState, evaluator: Evaluator, serving,
                   started: float) -> dict:
    """Final eval and checkpoint; adapter (or full model), tokenizer, probe logits, summary."""
    final_eval = evaluator(state)
    save_checkpoint(cfg, training, run, identity, state, reason="final")
    accelerator, out_dir = training.accelerator, run.out_dir
    accelerator.wait_for_everyone()
    run.guard("final adapter" if cfg.lora.enabled else "final model", rundir.save_model,
              accelerator, training.model, serving, cfg, out_dir)
    run.guard("probe logits", rundir.save_probe, accelerator, training.model, data.train,
              data.tokenizer.pad_token_id, out_dir)
    elapsed = time.time() - started
    summary = {"ended": "completed", "steps": state.step,
               "first_loss": state.losses[0] if state.losses else None,
               "final_loss": state.losses[-1] if state.losses else None,
               "tokens_seen": state.tokens_seen, "seconds": round(elapsed, 2),
               "padding_efficiency": state.tokens_seen / max(state.slots_seen, 1),
               "tokens_per_s": state.tokens_seen / max(elapsed, 1e-9),
               "trainable_parameters": training.trainable_parameters,
               "total_parameters": training.total_parameters,
               "resumed_from": run.attempt.get("resumed_from"),
               "eval": final_eval, "best": state.best, **run.record}
    if run.main_proc:
        if cfg.logging.plot:
            plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        run.guard("summary", rundir.finish_run_dir, out_dir, summary)
        run.finish("completed", "completed")
        print("summary: " + json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    return summary


# --------------------------------------------------------------------------- helpers


def load_data(cfg: Config, tokenizer, accelerator):
    """(train, eval or None, stats): the prepared data (`sft-scale data prepare`) when there is
    some, loaded by every rank with no tokenization; else tokenized here, rank 0 first while
    the others wait, then from its datasets cache."""
    path = find_prepared(cfg)
    if path is None:
        with accelerator.main_process_first():
            return build_datasets(cfg, tokenizer)
    # Every rank says so (not only the logging main process): the proof that none tokenized.
    print(f"data: rank {accelerator.process_index} loads the prepared data from {path} "
          "(fingerprint matches; nothing tokenized)", flush=True)
    return load_prepared(path, cfg, tokenizer)


def _check_micro_batch(cfg: Config, n_examples: int) -> None:
    """A micro-batch larger than the data would be filled by repeating it, and one of 100M rows
    never finishes a step: refuse before any weights load."""
    micro = cfg.training.micro_batch_size
    if micro > n_examples:
        raise ConfigError(f"{cfg.source or 'config'}: training.micro_batch_size is {micro}, more "
                          f"than the {n_examples} training rows (examples, or packed rows with "
                          f"packing). Set training.micro_batch_size to at most {n_examples}, and "
                          "raise gradient_accumulation_steps for a larger global batch.")


def _write_guard(rundir, out_dir: Path, attempt: dict, main_proc: bool):
    """`guard(what, fn, *args)` runs a step that writes; when it fails (full disk, read-only
    folder, a checkpoint write, a diverged loss) the manifest records how the attempt ended and
    the failure leaves as one line with its exit code (3 for writes)."""
    def record(error: SftScaleError) -> None:
        if not main_proc:
            return
        attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       ended=f"failed: {error.label}: {error}")
        try:
            _finish_attempt(rundir, out_dir, attempt, "failed")
        except OSError:
            log.warning("could not record the failure in %s/manifest.json either", out_dir)

    def guard(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SftScaleError as e:
            record(e)
            raise
        except (OSError, SafetensorError) as e:
            good = [p.name for p in ckpt.list_checkpoints(out_dir) if ckpt.verify(p) is None]
            error = OutputWriteError(
                f"could not write the {what} in {out_dir}: {e}"
                f"{ckpt.diagnose_full_disk(out_dir, [])}. The last good checkpoint "
                f"({good[-1] if good else 'none'}) is intact. Free disk space or fix "
                "permissions, then rerun the same command to resume from it.")
            record(error)
            raise error from e
    return guard


def _finish_attempt(rundir, out_dir: Path, attempt: dict, status: str) -> None:
    m = rundir.read_manifest(out_dir) or {}
    attempts = m.get("attempts", [])
    attempts[-1:] = [attempt]
    rundir.update_manifest(out_dir, status=status, attempts=attempts)


if __name__ == "__main__":
    sys.exit(main())
