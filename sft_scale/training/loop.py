"""The training loop: accumulate, clip, step, schedule, log. Short on purpose (see DESIGN.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from sft_scale.config import Config
from sft_scale.data import GlobalBatchSampler
from sft_scale.data.collate import to_device
from sft_scale.data.loader import step_loader
from sft_scale.errors import DivergedError
from sft_scale.training.metrics import MetricsWriter, peak_memory_mb


def total_steps(cfg: Config, n_examples: int, world_size: int) -> int:
    if cfg.training.max_steps > 0:
        return cfg.training.max_steps
    return max(1, math.ceil(cfg.training.num_epochs * n_examples
                            / cfg.global_batch_size(world_size)))


# training.optimizer -> the bitsandbytes class (adamw is torch's own).
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}


def build_optimizer(model, cfg: Config):
    """AdamW over the trainable parameters, torch's or bitsandbytes' (training.optimizer). The
    device check (sft_scale/preflight/resolve.py: check_optimizer) ran before any weights
    loaded."""
    t = cfg.training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Weight decay on norms and biases only shrinks them towards zero for no benefit.
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    import bitsandbytes as bnb  # optional: only these optimizers need it

    return getattr(bnb.optim, BNB_OPTIMIZERS[t.optimizer])(groups, **kwargs)


def build_scheduler(optimizer, cfg: Config, steps: int):
    t = cfg.training
    warmup = t.warmup_steps or int(round(t.warmup_ratio * steps))
    # Stepped by the loop once per optimizer step and deliberately not passed through
    # accelerator.prepare, which would step it once per process on multi-process runs.
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=steps)


@dataclass
class LoopState:
    step: int = 0
    tokens_seen: int = 0  # real (non-pad) input tokens, all ranks
    slots_seen: int = 0  # computed token slots (real + padding), all ranks
    best: dict | None = None  # best eval so far: {"step", "metric", "value"}
    losses: list[float] = field(default_factory=list)


@dataclass
class Training:
    """What the loop trains: the model and optimizer as the accelerator prepared them, and the
    schedule (stepped by the loop, not prepared: see build_scheduler)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    trainable_parameters: int = 0
    total_parameters: int = 0


@dataclass
class Batches:
    """What each step trains on: `sampler` picks a step's examples of `dataset`, `task` collates
    and scores them; `trace(step, micro_batches)` records them when set."""

    dataset: Any
    sampler: GlobalBatchSampler
    task: Any  # sft_scale.training.tasks.Task
    pad_token_id: int
    steps: int
    trace: Callable[[int, list[list[int]]], None] | None = None


class StepHooks:
    """Called after every optimizer step; `after_step` returning True stops the loop (the
    recipe checks preemption, evaluates and checkpoints there)."""

    def after_step(self, state: LoopState) -> bool:
        return False


def train_loop(training: Training, batches: Batches, cfg: Config, metrics: MetricsWriter,
               state: LoopState | None = None, hooks: StepHooks | None = None) -> LoopState:
    """Train until `batches.steps` (or until `hooks.after_step` says stop, e.g. on preemption)."""
    accelerator, model = training.accelerator, training.model
    optimizer, scheduler = training.optimizer, training.scheduler
    sampler, task, steps = batches.sampler, batches.task, batches.steps
    hooks = hooks or StepHooks()
    state = state or LoopState()
    scale = cfg.training.gradient_accumulation_steps * accelerator.num_processes
    clip = cfg.training.max_grad_norm or float("inf")
    # Clip over the trainable parameters only: with LoRA, iterating every frozen weight each step
    # was measurable overhead on small models (DeepSpeed ignores the list and clips itself).
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = accelerator.device.type == "cuda"
    pin = bool(cfg.data.pin_memory and cuda)  # pinned host memory only speeds host->GPU copies
    loader = step_loader(batches.dataset, sampler, task.collate, task.count,
                         batches.pad_token_id, state.step, steps, cfg.data.num_workers, pin,
                         columns=["input_ids", "labels", "label"])
    bar = tqdm(total=steps, initial=state.step, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True)
    model.train()
    t_last, tokens_last, step_last = time.perf_counter(), state.tokens_seen, state.step
    for item in loader:
        assert item["step"] == state.step, (item["step"], state.step)
        micro = item["micro"]
        if batches.trace is not None:
            batches.trace(state.step, sampler.micro_batches(state.step))
        # Normalise by the trained items (tokens, or examples for classification) of the whole
        # global batch (all micro-batches, all ranks),
        # so the gradient is the same however the batch is split across ranks and accumulation.
        counts = item["counts"].to(accelerator.device)
        n_trained, n_real, n_slots = accelerator.reduce(counts, reduction="sum").tolist()
        step_loss = torch.zeros((), device=accelerator.device)
        for batch in micro:
            batch = to_device(batch, accelerator.device, non_blocking=pin)
            with accelerator.accumulate(model):
                loss = task.loss(model, batch, n_trained)
                # accelerator.backward divides by accumulation steps and DDP/ZeRO average over
                # ranks; undo both so the summed gradient is per trained item.
                accelerator.backward(loss * scale)
                step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss = accelerator.reduce(step_loss, reduction="sum").item()
        if not math.isfinite(loss):
            # The step already wrote NaN/inf into the weights: stop before anything saves them.
            # Every rank sees the same reduced loss, so all stop together.
            raise DivergedError(
                f"the training loss became {loss} at step {state.step + 1} (learning rate "
                f"{scheduler.get_last_lr()[0]:.3g}); stopped without saving anything after the "
                "last good checkpoint (in OUTPUT_DIR/checkpoints). Lower training.learning_rate "
                "or check the data for broken records, then start over (a resume of this run "
                "would diverge again).")
        state.step += 1
        state.tokens_seen += n_real
        state.slots_seen += n_slots
        state.losses.append(loss)
        if state.step % cfg.training.logging_steps == 0 or state.step == steps:
            now = time.perf_counter()
            tps = (state.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            step_s = (now - t_last) / max(state.step - step_last, 1)
            t_last, tokens_last, step_last = now, state.tokens_seen, state.step
            lr = scheduler.get_last_lr()[0]
            gn = float(grad_norm) if grad_norm is not None else float("nan")
            metrics.write({"step": state.step, "epoch": round(sampler.epoch_at(state.step), 4),
                           "loss": loss, "lr": lr, "grad_norm": gn, "tokens_per_s": tps,
                           "step_time_s": step_s, "tokens_seen": state.tokens_seen,
                           "slots_seen": state.slots_seen, "trained_tokens": n_trained,
                           "padding_efficiency": state.tokens_seen / max(state.slots_seen, 1),
                           "peak_memory_mb": peak_memory_mb(accelerator.device)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        bar.update(1)
        if hooks.after_step(state):
            break
    del loader  # stops DataLoader workers when we leave early (preemption)
    bar.close()
    return state
