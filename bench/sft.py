"""sft_scale as the bench runs it: the shared settings as a config file, the real entry point's
argv, and the numbers read back from its metrics.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench.spec import Spec


def write_config(spec: Spec, path: Path) -> Path:
    """Only what every method shares (model, data, LoRA, hyperparameters, steps); sft_scale's
    own defaults for everything else: packing, length grouping, attention, logging,
    checkpoints, which is what a user gets."""
    import yaml

    t = spec.train
    cfg = {
        "model": {"name_or_path": spec.model_dir or "builtin:tiny-llama", "dtype": "fp32"},
        "lora": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                 "target_modules": t.lora_target},
        "data": {"train_files": [spec.data_file or "train.jsonl"], "format": "prompt_completion",
                 "max_seq_len": spec.data.max_seq_len},
        "training": {"seed": t.seed, "micro_batch_size": t.micro_batch_size,
                     "gradient_accumulation_steps": t.gradient_accumulation_steps,
                     "max_steps": t.steps, "learning_rate": t.learning_rate,
                     "lr_scheduler": t.lr_scheduler, "weight_decay": t.weight_decay,
                     "max_grad_norm": t.max_grad_norm, "warmup_steps": 0,
                     "logging_steps": 1},  # one metrics record per step: step times follow
        # trace_samples: the example ids of every step (data_trace/rank0.jsonl), so the bench
        # counts what was trained instead of assuming steps x batch.
        "output": {"dir": "runs/bench", "overwrite": True, "trace_samples": True},
        "checkpoint": {"resume": "never"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sft_argv(config: Path, out: Path, sets: list[str]) -> list[str]:
    argv = ["--config", str(config), "--output-dir", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


def parse_sft_metrics(out: Path, warm: int) -> dict:
    """Per-step numbers from metrics.jsonl (logging_steps=1): the loop logs, per step, its time,
    the real tokens and slots seen so far (older sft_scale: derived from tokens/s and the
    cumulative padding efficiency)."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "loss" in r and "tokens_per_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    if not recs:
        raise ValueError("metrics.jsonl has no step records")
    steps = [r["step"] for r in recs]
    if steps != list(range(1, len(recs) + 1)):
        raise ValueError(f"expected one record per step (logging_steps=1), got steps {steps}")
    seen = [r["tokens_seen"] for r in recs]
    step_s, prev = [], 0
    for r, s in zip(recs, seen, strict=True):
        if "step_time_s" in r:  # logged since sft_scale 2d08c45; older runs: from tokens/s
            step_s.append(r["step_time_s"])
        else:
            step_s.append((s - prev) / r["tokens_per_s"] if r["tokens_per_s"] else float("nan"))
        prev = s
    slots = [r.get("slots_seen", s / r["padding_efficiency"])
             for r, s in zip(recs, seen, strict=True)]
    w = min(warm, len(recs) - 1)
    timed_s = sum(step_s[w:])
    real_timed = seen[-1] - (seen[w - 1] if w else 0)
    return {
        "steps": len(recs), "timed_steps": len(recs) - w, "timed_s": timed_s,
        "real_tokens_timed": real_timed,
        "slots_timed": round(slots[-1] - (slots[w - 1] if w else 0)),
        "tokens_per_s": real_timed / timed_s if timed_s > 0 else float("nan"),
        "real_tokens": seen[-1], "slots": round(slots[-1]),
        "padding_efficiency": recs[-1]["padding_efficiency"],
        **trace_counts(out),
        "data_examples": summary.get("data", {}).get("examples"),
        "final_loss": recs[-1]["loss"], "losses": [r["loss"] for r in recs], "step_s": step_s,
        "train_s": sum(step_s), "sft_summary_seconds": summary.get("seconds"),
        "sft_summary_tokens_per_s": summary.get("tokens_per_s"),
    }


def trace_counts(out: Path) -> dict:
    """Trained examples (with repeats) and distinct examples, from sft_scale's sample trace."""
    trace = out / "data_trace" / "rank0.jsonl"
    if not trace.exists():
        return {"examples": None, "distinct_examples": None}
    ids = [e for line in trace.read_text().splitlines() if line.strip()
           for mb in json.loads(line)["examples"] for e in mb]
    return {"examples": len(ids), "distinct_examples": len(set(ids))}
