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
from pathlib import Path

from sft_scale.config import Config, ConfigError, check_warmup, dump_yaml, load_config
from sft_scale.errors import OutputWriteError, SftScaleError, run_reporting_errors
from sft_scale.loop import LoopState

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
    from sft_scale.preemption import PREEMPTED_EXIT_CODE

    def train() -> int:
        summary = run(load_config(args.config, args.overrides, args.output_dir))
        return PREEMPTED_EXIT_CODE if summary.get("ended") == "preempted" else 0

    return run_reporting_errors(train)


def run(cfg: Config) -> dict:
    """Train as the config says; returns the run summary (also saved as summary.json).
    `summary["ended"]` is "completed", "preempted" (checkpoint written) or "already_completed"."""
    from accelerate.utils import set_seed

    from sft_scale import checkpoint as ckpt
    from sft_scale import outputs
    from sft_scale.builtin import resolve_model_path
    from sft_scale.data import GlobalBatchSampler
    from sft_scale.data.layout import choose_layout
    from sft_scale.data.templates import resolve_template
    from sft_scale.distributed import describe, make_accelerator
    from sft_scale.eval_loop import evaluate, improved
    from sft_scale.fastpaths import model_config, resolve_fast_paths
    from sft_scale.loop import build_optimizer, build_scheduler, total_steps, train_loop
    from sft_scale.manifest import attempt_record, git_commit, package_versions
    from sft_scale.metrics import MetricsWriter, plot_losses
    from sft_scale.model import compile_model, count_parameters, load_model, load_tokenizer
    from sft_scale.preemption import Preemption
    from sft_scale.preflight import check_lora_fits, check_optimizer, resolve_deepspeed
    from sft_scale.serving import for_training
    from sft_scale.tasks import causal_lm, classification

    started = time.time()
    preemption = Preemption().install()  # early: a signal during loading must not kill us
    ds_config = resolve_deepspeed(cfg, in_job=True)
    check_optimizer(cfg)
    mc = model_config(cfg)
    # Before the accelerator: under ZeRO-3 it makes transformers build every model (even the
    # meta-device one this check uses) through deepspeed.zero.Init, which fails on meta tensors.
    check_lora_fits(cfg, mc)  # target modules and rank against the model, before its weights
    accelerator = make_accelerator(cfg, ds_config)
    main_proc = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main_proc else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    world = accelerator.num_processes
    out_dir = Path(cfg.output.dir)
    stage = ds_config["zero_optimization"]["stage"] if ds_config else None
    # What auto means here (attention, loss) and whether each switch can work, before any weights.
    fast = resolve_fast_paths(cfg, stage, mc)
    identity = ckpt.run_identity(cfg, world, stage)

    # 1. Is there anything to do, and from where?
    finished = outputs.finished_run(out_dir)
    if finished and not cfg.output.overwrite:
        if finished.get("identity", {}).get("config_hash") != identity["config_hash"] \
                or cfg.checkpoint.resume == "never":
            outputs.refuse_finished(out_dir)
        if main_proc:
            print(f"run in {out_dir} already completed; nothing to do", flush=True)
        summary = json.loads((out_dir / "summary.json").read_text())
        return dict(summary, ended="already_completed")
    if main_proc:
        outputs.check_writable(out_dir)
    resume_from = None if cfg.output.overwrite else ckpt.find_resume_checkpoint(cfg, out_dir)

    # 2. Data, validated before anything is written.
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, data_stats = load_data(cfg, tokenizer, accelerator)
    if fast["packing_reason"].startswith("auto: on"):  # packing-layout (issue 20): the lengths
        # decide, before the model loads its attention; resolve() should own this once it sees
        # the data (sft_scale/data/layout.py)
        cfg.data.packing, why = choose_layout(
            train_ds["length"], cfg.training.micro_batch_size,
            cfg.training.gradient_accumulation_steps, world, cfg.training.seed,
            cfg.data.group_by_length)
        fast = dict(resolve_fast_paths(cfg, stage, mc), packing_reason=why)
    steps = total_steps(cfg, len(train_ds), world)
    warmup_warning = check_warmup(cfg, steps)
    if warmup_warning and accelerator.is_main_process:
        log.warning("WARNING: %s", warmup_warning)
    _check_micro_batch(cfg, len(train_ds))
    identity["data_fingerprint"] = ckpt.data_fingerprint(train_ds)
    resume_step = ckpt.check_resume(resume_from, identity, steps,
                                    cfg.checkpoint.allow_data_change,
                                    cfg.checkpoint.resume_world_size_change)["step"] \
        if resume_from else None
    labels = data_stats.labels
    if cfg.task == "classification":
        multi = isinstance(train_ds[0]["label"], list)
        problem = "multi_label" if multi else ("binary" if len(labels) == 2 else "single_label")
        task = classification(len(labels), problem)
    else:
        problem, task = None, causal_lm(cfg.data.packing, fast["loss"])
    resolved = {"task": cfg.task, "problem": problem, "world_size": world,
                "global_batch_size": cfg.global_batch_size(world),
                "micro_batch_size": cfg.training.micro_batch_size,
                "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
                "total_steps": steps, "data": data_stats.as_dict(),
                "distributed_type": accelerator.distributed_type.value, "zero_stage": stage,
                "fast_paths": fast}
    if main_proc:  # the first write: everything above only read and checked
        outputs.acquire_run_lock(out_dir)
        if cfg.output.overwrite:
            shutil.rmtree(ckpt.checkpoint_root(out_dir), ignore_errors=True)
    accelerator.wait_for_everyone()
    if main_proc:
        log.info(describe(accelerator))
        print("resolved config:\n" + dump_yaml(cfg, resolved), flush=True)
        log.info("global batch = %d micro x %d accumulation x %d processes = %d examples/step",
                 cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps, world,
                 resolved["global_batch_size"])
        outputs.start_run_dir(out_dir, cfg, resolved, ds_config, resume_step)
    accelerator.wait_for_everyone()
    attempt = attempt_record(accelerator, str(resume_from) if resume_from else None)
    guard = _write_guard(outputs, out_dir, attempt, main_proc)
    if main_proc:
        prior = outputs.read_manifest(out_dir) or {}
        outputs.update_manifest(
            out_dir, status="running", identity=identity, config=cfg.to_dict(),
            resolved=resolved, deepspeed_config=ds_config, packages=package_versions(),
            git_commit=git_commit(), attempts=prior.get("attempts", []) + [attempt])

    # 3. Model, optimizer, schedule; then the checkpoint's state over them.
    set_seed(cfg.training.seed)
    model = load_model(cfg, accelerator.local_process_index, labels, problem,
                       tokenizer.pad_token_id, zero_stage=stage)
    serving = for_training(tokenizer, resolve_model_path(cfg.model.tokenizer
                                                         or cfg.model.name_or_path),
                           resolve_template(tokenizer, cfg.data.chat_template)
                           if data_stats.chat else None, data_stats.bos)
    if cfg.training.torch_compile:
        compile_model(model)  # in place, before prepare: see compile_model
    trainable, total = count_parameters(model)
    if main_proc:
        log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt.keep_trainable_only(accelerator, model)
    state = LoopState()
    if resume_from is not None:
        ckpt.load_checkpoint(accelerator, resume_from, scheduler, state, identity,
                             cfg.checkpoint.resume_world_size_change)
    preemption.track(state)

    # 4. The loop; checkpoints on schedule and on preemption.
    grouped = fast["group_by_length"]
    sampler = GlobalBatchSampler(len(train_ds), cfg.training.micro_batch_size,
                                 cfg.training.gradient_accumulation_steps, world,
                                 accelerator.process_index, cfg.training.seed,
                                 lengths=list(train_ds["length"]) if grouped else None)
    trace = outputs.sample_tracer(out_dir, accelerator.process_index, train_ds) \
        if cfg.output.trace_samples else None
    metrics = MetricsWriter(
        out_dir / "metrics.jsonl" if main_proc else None,
        out_dir / "tensorboard" if main_proc and cfg.logging.tensorboard else None,
        cfg.to_dict() if main_proc and cfg.logging.wandb else None)
    every = cfg.checkpoint.every_steps

    def run_eval(st) -> dict | None:
        if eval_ds is None:
            return None
        res = evaluate(accelerator, model, eval_ds, task, cfg.eval.micro_batch_size,
                       tokenizer.pad_token_id, len(labels or []), problem or "")
        metrics.write({"step": st.step, **res})
        if main_proc:
            log.info("eval at step %d: %s", st.step, json.dumps(res))
        value = res[cfg.eval.metric]
        if improved(cfg.eval.metric, value, st.best):
            st.best = {"step": st.step, "metric": cfg.eval.metric, "value": value}
            guard("best adapter", outputs.save_model, accelerator, model, serving, cfg, out_dir,
                  name="best_adapter")
        return res
    debug_sleep = float(os.environ.get("SFT_SCALE_DEBUG_STEP_SLEEP", "0"))  # tests: slow steps

    def on_step_end(st) -> bool:
        if debug_sleep:
            time.sleep(debug_sleep)
        if preemption.requested(accelerator):
            return True
        if cfg.eval.every_steps and st.step % cfg.eval.every_steps == 0 and st.step < steps:
            run_eval(st)
        if every and st.step % every == 0 and st.step < steps:
            guard("checkpoint", ckpt.save_checkpoint, accelerator, scheduler, st, identity,
                  out_dir, cfg.checkpoint.keep_last)
        return False

    state = guard("training", train_loop, accelerator, model, optimizer, scheduler, train_ds,
                  sampler, cfg, steps, metrics, tokenizer.pad_token_id, task, state=state,
                  trace=trace, on_step_end=on_step_end)
    preemption.immediate = False  # from here on a signal waits for the saves below
    preempted = state.step < steps
    final_eval = None if preempted else run_eval(state)
    guard("checkpoint", ckpt.save_checkpoint, accelerator, scheduler, state, identity, out_dir,
          cfg.checkpoint.keep_last, reason="preempted" if preempted else "final")
    if preempted:
        if main_proc:
            attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           ended=f"preempted at step {state.step} "
                                 f"({', '.join(preemption.received) or 'signal on another rank'})")
            _finish_attempt(outputs, out_dir, attempt, "preempted")
            print(f"preempted: checkpoint at step {state.step} written; rerun the same command "
                  "to resume", flush=True)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return {"ended": "preempted", "steps": state.step}

    # 5. Save: adapter (or full model), tokenizer, probe logits, summary.
    accelerator.wait_for_everyone()
    guard("final adapter" if cfg.lora.enabled else "final model", outputs.save_model,
          accelerator, model, serving, cfg, out_dir)
    guard("probe logits", outputs.save_probe, accelerator, model, train_ds,
          tokenizer.pad_token_id, out_dir)
    elapsed = time.time() - started
    summary = {"ended": "completed", "steps": state.step,
               "first_loss": state.losses[0] if state.losses else None,
               "final_loss": state.losses[-1] if state.losses else None,
               "tokens_seen": state.tokens_seen, "seconds": round(elapsed, 2),
               "padding_efficiency": state.tokens_seen / max(state.slots_seen, 1),
               "tokens_per_s": state.tokens_seen / max(elapsed, 1e-9),
               "trainable_parameters": trainable, "total_parameters": total,
               "resumed_from": str(resume_from) if resume_from else None,
               "eval": final_eval, "best": state.best, **resolved}
    metrics.close()
    if main_proc:
        if cfg.logging.plot:
            plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        guard("summary", outputs.finish_run_dir, out_dir, summary)
        attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ended="completed")
        _finish_attempt(outputs, out_dir, attempt, "completed")
        print("summary: " + json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def load_data(cfg: Config, tokenizer, accelerator):
    """(train, eval or None, stats): the prepared data (`sft-scale data prepare`) when there is
    some, loaded by every rank with no tokenization; else tokenized here, rank 0 first while
    the others wait, then from its datasets cache."""
    from sft_scale.data import build_datasets
    from sft_scale.data.prepared import find_prepared, load_prepared

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


def _write_guard(outputs, out_dir: Path, attempt: dict, main_proc: bool):
    """`guard(what, fn, *args)` runs a step that writes; when it fails (full disk, read-only
    folder, a checkpoint write, a diverged loss) the manifest records how the attempt ended and
    the failure leaves as one line with its exit code (3 for writes)."""
    from safetensors import SafetensorError

    from sft_scale import checkpoint as ckpt

    def record(error: SftScaleError) -> None:
        if not main_proc:
            return
        attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       ended=f"failed: {error.label}: {error}")
        try:
            _finish_attempt(outputs, out_dir, attempt, "failed")
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


def _finish_attempt(outputs, out_dir: Path, attempt: dict, status: str) -> None:
    m = outputs.read_manifest(out_dir) or {}
    attempts = m.get("attempts", [])
    attempts[-1:] = [attempt]
    outputs.update_manifest(out_dir, status=status, attempts=attempts)


if __name__ == "__main__":
    sys.exit(main())
