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

from sft_scale.config import Config, check_warmup, load_config
from sft_scale.launch import Layout, launch_command
from sft_scale.plan import GiB, estimate, format_table

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
    import datasets
    from transformers import AutoConfig

    from sft_scale.builtin import resolve_model_path
    from sft_scale.data.layout import choose_layout
    from sft_scale.data.pipeline import (
        _finish,
        encode_dataset,
        label_names,
        sample_examples,
        train_sources,
    )
    from sft_scale.data.preview import mark_trained
    from sft_scale.fastpaths import resolve_fast_paths
    from sft_scale.loop import total_steps
    from sft_scale.model import load_tokenizer
    from sft_scale.plan import dtype_bytes, lora_params, model_shape
    from sft_scale.preflight import check_lora_fits, resolve_auto_zero, resolve_deepspeed

    datasets.disable_progress_bars()  # check prints a report; bars would drown it
    report: dict = {}
    cfg = load_config(config, overrides, output_dir)
    print(f"config: {config} ok (task {cfg.task})")

    if layout.zero == "auto" and gpu_memory is not None:
        resolve_auto_zero(cfg, layout.world_size, gpu_memory)
        layout.zero, layout.offload = cfg.distributed.zero, cfg.distributed.offload
    if layout.ds_file():
        cfg.distributed.deepspeed_config = layout.ds_file()
        ds = resolve_deepspeed(cfg, world_size=layout.world_size)
        report["deepspeed"] = f"ZeRO-{ds['zero_optimization']['stage']}" + (
            " + offload" if "offload" in Path(layout.ds_file()).name else "")
    elif layout.zero == "auto":
        report["deepspeed"] = ("auto (chosen in the job from the memory it finds; pass "
                               "--gpu-memory to decide it here, or see `sft-scale plan`)")
    else:
        report["deepspeed"] = "no (DDP)" if layout.world_size > 1 else "no"
    gb = cfg.global_batch_size(layout.world_size)
    print(f"layout: {layout.nodes} node(s) x {layout.nproc_per_node} process(es) = world size "
          f"{layout.world_size}; global batch {gb}; DeepSpeed: {report['deepspeed']}")

    path = resolve_model_path(cfg.model.name_or_path, cfg.model.revision)
    mc = AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                    trust_remote_code=cfg.model.trust_remote_code)
    shape = model_shape(cfg)
    stage = int(report["deepspeed"][5]) if report["deepspeed"].startswith("ZeRO-") else None
    fast = resolve_fast_paths(cfg, stage, mc)  # an impossible switch fails here, not on the GPUs
    check_lora_fits(cfg, mc)
    report["fast_paths"] = {k: fast[k] for k in ("attention_kernel", "packing", "loss",
                                                 "torch_compile")}
    tokenizer = load_tokenizer(cfg)
    trainable = lora_params(shape, cfg.lora) if cfg.lora.enabled else shape.total_params
    report.update(model_type=mc.model_type, total_params=shape.total_params,
                  trainable_params=trainable)
    print(f"model: {path} ({mc.model_type}, {shape.total_params:,} parameters, {trainable:,} "
          f"trainable); tokenizer: {len(tokenizer):,} tokens, eos {tokenizer.eos_token!r}, "
          f"pad {tokenizer.pad_token!r}; attention {fast['attention_kernel']} (on this machine), "
          f"loss {fast['loss']}, packing {fast['packing_reason']}")
    if len(tokenizer) > shape.vocab_size:
        print(f"warning: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
              f"{shape.vocab_size}: ids beyond it would fail in the first batch")

    sample, n_total = sample_examples(train_sources(cfg), cfg, SAMPLE)
    labels = label_names(sample, cfg) if cfg.task == "classification" else None
    encoded, stats = _finish(encode_dataset(sample, tokenizer, cfg, labels), "sampled training")
    if fast["packing_reason"].startswith("auto: on"):  # packing-layout (issue 20): the lengths
        # decide, as in train.run (sft_scale/data/layout.py); here from the sample's lengths
        cfg.data.packing, why = choose_layout(
            encoded["length"], cfg.training.micro_batch_size,
            cfg.training.gradient_accumulation_steps, layout.world_size, cfg.training.seed,
            cfg.data.group_by_length)
        fast = dict(resolve_fast_paths(cfg, stage, mc), packing_reason=why)
        report["fast_paths"].update(attention_kernel=fast["attention_kernel"],
                                    packing=fast["packing"])
        print(f"packing, from the sample's lengths: {why}")
    for i in range(min(n_show, len(encoded))):
        row = encoded[i]
        print(f"--- sample {i} ({row['_source']}, {row['length']} tokens, {row['n_trained']} "
              "trained, marked «like this») ---")
        print(mark_trained(tokenizer, row["input_ids"], row["labels"]))
    avg = stats.tokens / stats.examples
    kept = stats.examples / len(sample)
    n_examples = max(1, int(n_total * kept))
    steps = total_steps(cfg, n_examples, layout.world_size)
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

    report.update(memory_plan(cfg, layout, stage, gpu_memory))

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


def memory_plan(cfg: Config, layout: Layout, stage: int | None, gpu_memory: int | None) -> dict:
    """Print `sft-scale plan`'s table for this layout and say whether the checked variant fits.
    Without --gpu-memory the GPUs are assumed to have 80 GiB, and not fitting only warns."""
    plan = estimate(cfg, layout.world_size, gpu_memory or PLAN_GPU_MEMORY)
    assumed = "" if gpu_memory else (f" (assuming {_size(PLAN_GPU_MEMORY)} GPUs; pass "
                                     "--gpu-memory for yours)")
    print(f"memory plan{assumed}:\n{format_table(plan)}")
    if layout.zero == "auto":  # the job decides; the plan's recommendation is what it will pick
        rec = plan["recommendation"]
        row = next((r for r in plan["rows"] if rec and r["name"] == rec["name"]), None)
    else:
        offload = bool(layout.offload) and stage in (2, 3)
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
