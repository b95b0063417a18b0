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
import time
from pathlib import Path

from sft_scale.config import Config, ConfigError, dump_yaml, load_config

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
    from sft_scale.data import DataError

    try:
        cfg = load_config(args.config, args.overrides, args.output_dir)
        run(cfg)
    except (ConfigError, DataError) as e:
        # A user-fixable problem: one clear line, not a traceback.
        kind = "config" if isinstance(e, ConfigError) else "data"
        print(f"{kind} error: {e}", file=sys.stderr)
        return 2
    return 0


def run(cfg: Config) -> dict:
    """Train as the config says; returns the run summary (also saved as summary.json)."""
    from accelerate.utils import set_seed

    from sft_scale import outputs
    from sft_scale.data import GlobalBatchSampler, build_datasets
    from sft_scale.distributed import describe, make_accelerator
    from sft_scale.preflight import resolve_deepspeed
    from sft_scale.loop import (build_optimizer, build_scheduler, total_steps, train_loop)
    from sft_scale.metrics import MetricsWriter
    from sft_scale.model import count_parameters, load_model, load_tokenizer

    started = time.time()
    ds_config = resolve_deepspeed(cfg)
    accelerator = make_accelerator(cfg, ds_config)
    main_proc = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main_proc else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    world = accelerator.num_processes
    out_dir = Path(cfg.output.dir)
    outputs.check_output_dir(out_dir, cfg.output.overwrite)

    # 1. Data, validated before anything is written.
    tokenizer = load_tokenizer(cfg)
    with accelerator.main_process_first():  # rank 0 fills the datasets cache, the rest reuse it
        train_ds, eval_ds, data_stats = build_datasets(cfg, tokenizer)
    steps = total_steps(cfg, len(train_ds), world)
    resolved = {"world_size": world, "global_batch_size": cfg.global_batch_size(world),
                "micro_batch_size": cfg.training.micro_batch_size,
                "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
                "total_steps": steps, "data": data_stats.as_dict(),
                "distributed_type": accelerator.distributed_type.value,
                "zero_stage": ds_config["zero_optimization"]["stage"] if ds_config else None}
    if main_proc:
        log.info(describe(accelerator))
        print("resolved config:\n" + dump_yaml(cfg, resolved), flush=True)
        log.info("global batch = %d micro x %d accumulation x %d processes = %d examples/step",
                 cfg.training.micro_batch_size, cfg.training.gradient_accumulation_steps, world,
                 resolved["global_batch_size"])
        outputs.start_run_dir(out_dir, cfg, resolved, ds_config)
    accelerator.wait_for_everyone()

    # 2. Model, optimizer, schedule.
    set_seed(cfg.training.seed)
    model = load_model(cfg, accelerator.local_process_index)
    trainable, total = count_parameters(model)
    if main_proc:
        log.info("parameters: %s trainable of %s (%.2f%%)", f"{trainable:,}", f"{total:,}",
                 100 * trainable / max(total, 1))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # 3. The loop.
    grouped = cfg.data.group_by_length and not cfg.data.packing
    sampler = GlobalBatchSampler(len(train_ds), cfg.training.micro_batch_size,
                                 cfg.training.gradient_accumulation_steps, world,
                                 accelerator.process_index, cfg.training.seed,
                                 lengths=list(train_ds["length"]) if grouped else None)
    trace = outputs.sample_tracer(out_dir, accelerator.process_index, train_ds) \
        if cfg.output.trace_samples else None
    metrics = MetricsWriter(out_dir / "metrics.jsonl" if main_proc else None)
    state = train_loop(accelerator, model, optimizer, scheduler, train_ds, sampler, cfg, steps,
                       metrics, tokenizer.pad_token_id, trace=trace)

    # 4. Save: adapter (or full model), tokenizer, probe logits, summary.
    accelerator.wait_for_everyone()
    outputs.save_model(accelerator, model, tokenizer, cfg, out_dir)
    outputs.save_probe(accelerator, model, train_ds, tokenizer.pad_token_id, out_dir)
    elapsed = time.time() - started
    summary = {"steps": state.step, "first_loss": state.losses[0] if state.losses else None,
               "final_loss": state.losses[-1] if state.losses else None,
               "tokens_seen": state.tokens_seen, "seconds": round(elapsed, 2),
               "padding_efficiency": state.tokens_seen / max(state.slots_seen, 1),
               "tokens_per_s": state.tokens_seen / max(elapsed, 1e-9),
               "trainable_parameters": trainable, "total_parameters": total, **resolved}
    if main_proc:
        outputs.finish_run_dir(out_dir, summary)
        print("summary: " + json.dumps(summary), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    sys.exit(main())
