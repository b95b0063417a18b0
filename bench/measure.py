"""Counting and timing inside a worker process, the same way for every in-process method.

Tokens are counted where they enter the model: a forward pre-hook on the causal LM (the module
under the PEFT wrapper) sees every training micro-batch exactly as the trainer built it.
- real tokens: attention-mask ones, or, without a mask (padding-free / packed rows), the
  positions that are not the pad token;
- slots: every position computed (real + padding);
- examples: rows with a mask, or sequence starts (position id 0 on a real token) in packed rows.
Time is read at the end of every optimizer step; the first `warm` steps are not timed.
"""

from __future__ import annotations

import math
import os
import time


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: writing 5 to clear_refs), so each rep run inside one
    process reports its own peak. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM of this process (the kernel's high-water mark of resident memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.real = self.slots = self.examples = self.forwards = 0
        self.seen: set[int] = set()  # hashes of the trained sequences: distinct examples
        self.step_loss = 0.0
        self.marks: list[dict] = []
        self.t_begin: float | None = None
        self.t_process = time.perf_counter()

    # -- counting
    def hook(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            return
        mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        self.forwards += 1
        self.slots += ids.numel()
        if mask is not None and mask.dim() == 2:
            self.real += int(mask.sum())
            self.examples += int((mask.sum(-1) > 0).sum())
            for row, m in zip(ids, mask, strict=True):
                self.seen.add(hash(tuple(row[m.bool()].tolist())))
        else:
            real = ids != self.pad
            self.real += int(real.sum())
            self.examples += int(((pos == 0) & real).sum()) if pos is not None else ids.shape[0]
            for r in range(ids.shape[0]):  # packed rows: sequences start at position id 0
                n = int(real[r].sum())
                starts = [0] if pos is None else \
                    [i for i in (pos[r, :n] == 0).nonzero().flatten().tolist()] or [0]
                bounds = starts + [n]
                row = ids[r].tolist()
                for a, b in zip(bounds, bounds[1:], strict=False):
                    self.seen.add(hash(tuple(row[a:b])))

    def attach(self, model) -> None:
        """Hook the causal LM itself (under PEFT / DDP wrappers, if any)."""
        inner = model
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        inner.register_forward_pre_hook(self.hook, with_kwargs=True)

    def add_loss(self, loss) -> None:
        self.step_loss += float(loss)

    # -- timing
    def begin(self) -> None:
        self.t_begin = time.perf_counter()

    def mark(self) -> None:
        """Call at the end of each optimizer step (on a GPU, after the queued work is done)."""
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.marks.append({"t": time.perf_counter(), "cpu": time.process_time(),
                           "real": self.real, "slots": self.slots,
                           "examples": self.examples, "loss": self.step_loss})
        self.step_loss = 0.0

    def result(self, warm: int, **extra) -> dict:
        m = self.marks
        if not m:
            raise RuntimeError("no optimizer step was recorded")
        w = min(warm, len(m) - 1) if len(m) > 1 else 0
        t0 = m[w - 1]["t"] if w > 0 else (self.t_begin or self.t_process)
        base = m[w - 1] if w > 0 else {"real": 0, "slots": 0}
        timed_s = m[-1]["t"] - t0
        cpu0 = m[w - 1]["cpu"] if w > 0 else None
        real_timed = m[-1]["real"] - base["real"]
        last = m[-1]
        return dict({
            "steps": len(m), "timed_steps": len(m) - w, "timed_s": timed_s,
            "real_tokens_timed": real_timed, "slots_timed": last["slots"] - base["slots"],
            "tokens_per_s": real_timed / timed_s if timed_s > 0 else float("nan"),
            "real_tokens": last["real"], "slots": last["slots"],
            "padding_efficiency": last["real"] / last["slots"] if last["slots"] else float("nan"),
            "examples": last["examples"], "distinct_examples": len(self.seen),
            "final_loss": last["loss"],
            "losses": [x["loss"] for x in m],
            "step_s": [m[i]["t"] - (m[i - 1]["t"] if i else (self.t_begin or self.t_process))
                       for i in range(len(m))],
            "train_s": m[-1]["t"] - (self.t_begin or self.t_process),
            # CPU seconds of this process per wall second over the timed steps: ~ the torch
            # thread count when the machine is ours, less when other jobs take the cores.
            "cores_busy": (m[-1]["cpu"] - cpu0) / timed_s if cpu0 is not None and timed_s > 0
            else None,
            "peak_rss_mb_self": peak_rss_mb(), "pid": os.getpid(),
        }, **extra)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
