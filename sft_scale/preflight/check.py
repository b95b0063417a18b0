"""`sft-scale check`: what can fail before cluster time is spent, found in seconds on a laptop.

Validates the config and the DeepSpeed/quantization combination for the target layout, resolves
the model and tokenizer (config files only, no weights), tokenizes a sample of the data and shows
it with its loss mask, derives steps per epoch and total tokens, checks the disk for checkpoints,
and prints the exact launch command.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import datasets

from sft_scale.config import Config, check_warmup, load_config
from sft_scale.data.pipeline import (
    _finish,
    encode_dataset,
    label_names,
    sample_examples,
    train_sources,
)
from sft_scale.data.preview import mark_trained
from sft_scale.preflight.command import Layout, launch_command
from sft_scale.preflight.plan import (
    GiB,
    dtype_bytes,
    estimate,
    format_table,
    lora_params,
    model_shape,
)
from sft_scale.preflight.resolve import resolve
from sft_scale.training.loop import total_steps
from sft_scale.training.model import load_tokenizer

SAMPLE = 200  # records tokenized per source: enough for length statistics, fast on any data
PLAN_GPU_MEMORY = 80 * GiB  # the memory plan's GPU size when --gpu-memory is not given


def checkpoint_bytes(cfg: Config, trainable: int, train_bytes: int) -> int:
    """One checkpoint: the trainable weights, their fp32 master copy under 16-bit training, and
    AdamW's two fp32 states (what Accelerate / DeepSpeed save_state writes, all ranks together)."""
    master = 4 if train_bytes == 2 else 0
    return trainable * (train_bytes + master + 8)


def final_output_bytes(cfg: Config, trainable: int, total: int, train_bytes: int) -> int:
    """The adapter (fp32) or, for full fine-tuning, the consolidated model."""
    return trainable * 4 if cfg.lora.enabled else total * train_bytes


def run_check(config: str, overrides: list[str], output_dir: str | None, layout: Layout,
              n_show: int = 2, gpu_memory: int | None = None) -> dict:
    """Print each check as it passes; raise ConfigError / DataError at the first that fails.
    Returns the figures as a dict (for tests and --json)."""
    datasets.disable_progress_bars()  # check prints a report; bars would drown it
    report: dict = {}
    cfg = load_config(config, overrides, output_dir)
    print(f"config: {config} ok (task {cfg.task})")

    # Everything the job would decide, decided the same way; an impossible switch fails here.
    resolved = resolve(cfg, layout, memory=gpu_memory)
    if resolved.zero_stage is not None:
        report["deepspeed"] = resolved.deepspeed_name
    elif resolved.zero_pending:
        report["deepspeed"] = ("auto (chosen in the job from the memory it finds; pass "
                               "--gpu-memory to decide it here, or see `sft-scale plan`)")
    else:
        report["deepspeed"] = "no (DDP)" if layout.world_size > 1 else "no"
    gb = resolved.global_batch_size
    print(f"layout: {layout.nodes} node(s) x {layout.nproc_per_node} process(es) = world size "
          f"{layout.world_size}; global batch {gb}; DeepSpeed: {report['deepspeed']}")

    mc, fast, stage = resolved.model_config, resolved.fast, resolved.zero_stage
    shape = model_shape(mc if mc is not None else cfg)
    report["fast_paths"] = {k: fast.as_dict()[k] for k in ("attention_kernel", "packing", "loss",
                                                           "lora_kernel", "layer_kernels",
                                                           "torch_compile")}
    tokenizer = load_tokenizer(cfg)
    trainable = lora_params(shape, cfg.lora) if cfg.lora.enabled else shape.total_params
    report.update(model_type=mc.model_type, total_params=shape.total_params,
                  trainable_params=trainable)
    print(f"model: {resolved.model_path} ({mc.model_type}, {shape.total_params:,} parameters, "
          f"{trainable:,} trainable); tokenizer: {len(tokenizer):,} tokens, eos "
          f"{tokenizer.eos_token!r}, pad {tokenizer.pad_token!r}; attention "
          f"{report['fast_paths']['attention_kernel']} (on this machine), loss {fast.loss}, "
          f"packing {fast.packing_reason}")
    if len(tokenizer) > shape.vocab_size:
        print(f"warning: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
              f"{shape.vocab_size}: ids beyond it would fail in the first batch")

    sample, n_total = sample_examples(train_sources(cfg), cfg, SAMPLE)
    labels = label_names(sample, cfg) if cfg.task == "classification" else None
    encoded, stats = _finish(encode_dataset(sample, tokenizer, cfg, labels), "sampled training")
    for i in range(min(n_show, len(encoded))):
        row = encoded[i]
        print(f"--- sample {i} ({row['_source']}, {row['length']} tokens, {row['n_trained']} "
              "trained, marked «like this») ---")
        print(mark_trained(tokenizer, row["input_ids"], row["labels"]))
    avg = stats.tokens / stats.examples
    kept = stats.examples / len(sample)
    n_examples = max(1, int(n_total * kept))
    steps = total_steps(cfg, n_examples, layout.world_size)
    if resolved.fast.packing_by_lengths:  # as the job decides after tokenizing (train.py)
        resolved = resolved.with_data(cfg, encoded["length"], steps)
        report["fast_paths"].update(packing=resolved.fast.packing,
                                    attention_kernel=resolved.fast.as_dict()["attention_kernel"])
        print(f"packing, from the sample's lengths: {resolved.fast.packing_reason}")
    warmup_warning = check_warmup(cfg, steps)
    if warmup_warning:
        print(f"WARNING: {warmup_warning}")
    per_epoch = max(1, -(-n_examples // gb))
    report.update(records=n_total, sampled=len(sample), est_examples=n_examples,
                  avg_tokens=round(avg, 1), steps_per_epoch=per_epoch, total_steps=steps,
                  total_tokens=int(steps * gb * avg))
    dropped = stats.dropped_too_long + stats.dropped_no_trainable
    print(f"data: {n_total:,} records; of a sample of {len(sample)}, {stats.truncated} "
          f"truncated and {dropped} dropped at max_seq_len {cfg.data.max_seq_len}; ~{avg:.0f} "
          f"tokens per example; {per_epoch:,} steps per epoch; {steps:,} steps, "
          f"~{report['total_tokens']:,} tokens in all")

    report.update(memory_plan(cfg, layout, stage, resolved.offload, gpu_memory, mc))

    quantized = cfg.quantization.load_in_8bit or cfg.quantization.load_in_4bit
    tb = 4 if quantized and cfg.lora.enabled else dtype_bytes(cfg, shape)
    per_ckpt = checkpoint_bytes(cfg, trainable, tb)
    need = per_ckpt * (cfg.checkpoint.keep_last + 1) + final_output_bytes(
        cfg, trainable, shape.total_params, tb)  # +1: the old one stays until the new is done
    out = Path(cfg.output.dir).absolute()
    existing = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    report.update(checkpoint_bytes=per_ckpt, disk_needed=need, disk_free=free,
                  disk_ok=free > need)
    print(f"disk: a checkpoint is ~{_size(per_ckpt)}; {cfg.checkpoint.keep_last} kept + 1 being "
          f"written + the final output: ~{_size(need)}; {_size(free)} free at {existing}: "
          + ("ok" if report["disk_ok"] else "NOT ENOUGH: free space, lower checkpoint.keep_last "
             "or choose another output.dir"))

    report["launch"] = shlex.join(launch_command(config, layout, overrides, output_dir))
    where = " (node 0; on node R use --machine_rank R)" if layout.nodes > 1 else ""
    print(f"launch{where}: {report['launch']}")
    return report


def memory_plan(cfg: Config, layout: Layout, stage: int | None, offload: bool,
                gpu_memory: int | None, model_config=None) -> dict:
    """Print `sft-scale plan`'s table for this layout and say whether the checked variant fits.
    Without --gpu-memory the GPUs are assumed to have 80 GiB, and not fitting only warns."""
    plan = estimate(cfg, layout.world_size, gpu_memory or PLAN_GPU_MEMORY,
                    model_config=model_config)
    assumed = "" if gpu_memory else (f" (assuming {_size(PLAN_GPU_MEMORY)} GPUs; pass "
                                     "--gpu-memory for yours)")
    print(f"memory plan{assumed}:\n{format_table(plan)}")
    if layout.zero == "auto" and stage is None:
        # the job decides; the plan's recommendation is what it will pick
        rec = plan["recommendation"]
        row = next((r for r in plan["rows"] if rec and r["name"] == rec["name"]), None)
    else:
        offload = offload and stage in (2, 3)
        # Plain DDP keeps what ZeRO-0 keeps: a full copy of every state on each process.
        row = next(r for r in plan["rows"]
                   if r["stage"] == (stage or 0) and r["offload"] == offload)
    if row is None or not row["supported"]:
        print("memory: NO variant fits this layout" if row is None
              else f"memory: {row['name']} {row['reason']}")
        return {"memory_variant": None, "memory_per_gpu": None, "memory_fits": False,
                "memory_ok": gpu_memory is None}
    print(f"memory: this layout ({row['name']}) needs ~{_size(row['total'])} per GPU: "
          f"{'fits' if row['fits'] else 'does NOT fit'} in {_size(plan['budget'])}")
    return {"memory_variant": row["name"], "memory_per_gpu": row["total"],
            "memory_fits": row["fits"], "memory_ok": row["fits"] or gpu_memory is None}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return ""
