"""A fresh process that runs one method (or, for the smoke test, several) for N reps:
`python -m bench.worker SPEC.json METHODS.json OUT_DIR REPS`.

Every rep builds everything anew (model, LoRA, optimizer, trainer, data); the VmHWM high-water
mark is reset before each rep so peak memory is the rep's own. Runners: the bare step, a plain
transformers Trainer, TRL's SFTTrainer (counted and timed by bench/measure.py), and sft_scale's
real entry point `sft_scale.train.main(argv)`, read from its metrics.jsonl (bench/sft.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

from bench.measure import Meter, peak_rss_mb, reset_peak_rss
from bench.spec import Spec


def read_records(spec: Spec) -> list[dict]:
    return [json.loads(x) for x in Path(spec.data_file).read_text().splitlines() if x.strip()]


def lora_config(spec: Spec):
    from peft import LoraConfig
    t = spec.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=t.lora_target, task_type="CAUSAL_LM")


def peft_model(spec: Spec):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return get_peft_model(model, lora_config(spec))


# --------------------------------------------------------------------------- bare step


def run_bare(spec: Spec, opts: dict, work: Path) -> dict:
    import torch

    from bench.data import encode, load_tokenizer

    t = spec.train
    torch.manual_seed(t.seed)
    model = peft_model(spec)
    model.train()
    meter = Meter(spec.pad_token_id)
    meter.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=t.learning_rate, weight_decay=t.weight_decay)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(t.seed)
    rows = opts.get("rows", "packed")

    def step(batches, autocast=False):
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(**b, use_cache=False)
            (out.loss / len(batches)).backward()
            meter.add_loss(out.loss.detach() / len(batches))
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.mark()

    def random_row(n):
        x = torch.randint(3, vocab, (1, n), generator=gen)  # no pad/bos/eos ids
        return {"input_ids": x, "labels": x}

    if rows == "probe":
        # Same short row in fp32, then under bf16 autocast: the dtype factor alone.
        n, k = spec.probe_tokens, 2  # one warm-up step, one timed: bf16 is slow here
        out = {}
        for name, ac in (("fp32", False), ("bf16_autocast", True)):
            meter = Meter(spec.pad_token_id)
            meter.attach(model)
            meter.begin()
            for _ in range(k):
                step([random_row(n)], autocast=ac)
            out[name] = meter.result(1)
        res = dict(out["bf16_autocast"])
        res.update(fp32_tokens_per_s=out["fp32"]["tokens_per_s"],
                   bf16_tokens_per_s=out["bf16_autocast"]["tokens_per_s"],
                   bf16_slowdown=out["fp32"]["tokens_per_s"] / out["bf16_autocast"]["tokens_per_s"],
                   probe_tokens=n, examples=None, distinct_examples=None)
        return res

    if rows in ("full", "packed"):
        # full: micro-batch x mean example length, every slot a real token, each row one causal
        # sequence (the data's tokens with no padding and no cross-example attention);
        # packed: the whole micro-batch as one causal row (attention across examples).
        shape = (t.micro_batch_size, spec.mean_example_len) if rows == "full" \
            else (1, spec.packed_row_len)

        def batch():
            x = torch.randint(3, vocab, shape, generator=gen)
            return {"input_ids": x, "labels": x}
        meter.begin()
        for _ in range(t.steps):
            step([batch() for _ in range(t.gradient_accumulation_steps)])
        return meter.result(t.warmup_steps_excluded, examples=None, distinct_examples=None,
                            shape=list(shape))

    # padded: the real examples, random order, padded to the longest row of each micro-batch
    tok = load_tokenizer(spec.model_dir)
    enc = [encode(tok, r) for r in read_records(spec)]
    order = list(range(len(enc)))
    random.Random(t.seed).shuffle(order)

    def collate(idx):
        width = max(len(enc[i]["input_ids"]) for i in idx)
        ids = torch.full((len(idx), width), spec.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            k = len(enc[i]["input_ids"])
            ids[r, :k] = torch.tensor(enc[i]["input_ids"])
            labels[r, :k] = torch.tensor(enc[i]["labels"])
            mask[r, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    mb = t.micro_batch_size
    micro = [collate(order[j:j + mb]) for j in range(0, len(order), mb)]
    a = t.gradient_accumulation_steps
    meter.begin()
    for s in range(t.steps):
        step(micro[s * a:(s + 1) * a])
    return meter.result(t.warmup_steps_excluded)


# --------------------------------------------------------------------------- Trainer / TRL


def _instrument(base_cls, meter: Meter):
    """The trainer class with the loss of each micro-batch recorded (nothing else changed)."""
    class Measured(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                meter.add_loss((out[0] if isinstance(out, tuple) else out).detach())
            return out
    return Measured


def _callback(meter: Meter):
    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.begin()

        def on_step_end(self, args, state, control, **kw):
            meter.mark()
    return Marks()


def _common_args(spec: Spec, work: Path) -> dict:
    t = spec.train
    return dict(output_dir=str(work / "trainer_out"),
                per_device_train_batch_size=t.micro_batch_size,
                gradient_accumulation_steps=t.gradient_accumulation_steps, max_steps=t.steps,
                learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
                weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, warmup_steps=0,
                seed=t.seed, bf16=False)


def run_hf(spec: Spec, opts: dict, work: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bench.data import encode, load_tokenizer

    tok = load_tokenizer(spec.model_dir)
    rows = []
    for r in read_records(spec):
        e = encode(tok, r)
        rows.append(dict(e, attention_mask=[1] * len(e["input_ids"])))
    meter = Meter(spec.pad_token_id)
    model = peft_model(spec)
    meter.attach(model)
    args = TrainingArguments(**dict(_common_args(spec, work), **opts))
    trainer = _instrument(Trainer, meter)(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[_callback(meter)])
    trainer.train()
    return meter.result(spec.train.warmup_steps_excluded)


def trl_bin_length(spec: Spec, tok, recs: list[dict], target_bins: int) -> tuple[int, int]:
    """The smallest packing length for which TRL's BFD packing makes at most `target_bins`
    bins (one bin per micro-batch); returns (length, bins)."""
    from datasets import Dataset
    from trl import pack_dataset

    lengths = [len(tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]) for r in recs]
    ds = Dataset.from_dict({"input_ids": [[5] * n for n in lengths]})

    def bins(L):
        return len(pack_dataset(ds, L, "bfd"))

    lo, hi = max(lengths), sum(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        if bins(mid) <= target_bins:
            hi = mid
        else:
            lo = mid + 1
    return lo, bins(lo)


def run_trl(spec: Spec, opts: dict, work: Path) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from bench.data import load_tokenizer

    t = spec.train
    tok = load_tokenizer(spec.model_dir)
    recs = read_records(spec)
    kw = _common_args(spec, work)
    kw["max_length"] = spec.data.max_seq_len
    opts = dict(opts)
    extra = {}
    if "bf16" in opts and opts["bf16"] is None:  # TRL's own default (True unless fp16)
        kw.pop("bf16")
        opts.pop("bf16")
    if "dtype" in opts:  # the weights' dtype when TRL loads the model (its default: float32)
        kw["model_init_kwargs"] = {"dtype": opts.pop("dtype")}
    quantization = None
    if opts.pop("load_in_8bit", False):
        from transformers import BitsAndBytesConfig
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    if opts.get("packing"):
        target = t.steps * t.gradient_accumulation_steps
        length, n_bins = trl_bin_length(spec, tok, recs, target)
        kw.update(per_device_train_batch_size=1, max_length=length)
        extra.update(bin_length=length, bins=n_bins)
        if n_bins != target:
            # Fewer bins than micro-batches: train one epoch of bins (each example once).
            kw["max_steps"] = -(-n_bins // t.gradient_accumulation_steps)
            extra["note"] = f"packed into {n_bins} bins, not {target}: {kw['max_steps']} steps"
    kw.update(opts)
    args = SFTConfig(**kw)
    meter = Meter(spec.pad_token_id)
    trainer = _instrument(SFTTrainer, meter)(
        model=spec.model_dir, args=args, train_dataset=Dataset.from_list(recs),
        processing_class=tok, peft_config=lora_config(spec), callbacks=[_callback(meter)],
        **({"quantization_config": quantization} if quantization is not None else {}))
    meter.attach(trainer.model)
    extra.update(padding_free=bool(getattr(trainer, "padding_free", False)),
                 gradient_checkpointing=bool(args.gradient_checkpointing),
                 bf16=bool(args.bf16))
    trainer.train()
    return meter.result(t.warmup_steps_excluded, **extra)


def run_sft(spec: Spec, opts: dict, work: Path) -> dict:
    """sft_scale's real entry point, `sft_scale.train.main(argv)` (what `python -m
    sft_scale.train` runs), in this process; tokens and time from its metrics.jsonl."""
    import datasets

    from bench.sft import parse_sft_metrics, sft_argv
    from sft_scale import train

    # A cold datasets cache per rep, as a fresh process would have.
    datasets.config.HF_DATASETS_CACHE = Path(work / "hf_datasets")
    from sft_scale.training import metrics as sft_metrics

    out = work / "out"
    argv = sft_argv(Path(spec.sft_config), out, opts.get("set", []))
    # Observe (not change) the loop: note wall and CPU time when each step's record is written,
    # for the cores-busy figure; the step times themselves come from metrics.jsonl.
    marks, write = [], sft_metrics.MetricsWriter.write

    def observed(self, record):
        result = write(self, record)
        if "loss" in record:
            marks.append((time.perf_counter(), time.process_time()))
        return result

    sft_metrics.MetricsWriter.write = observed
    t0 = time.perf_counter()
    err = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(err):
            rc = train.main(argv)
    finally:
        sft_metrics.MetricsWriter.write = write
    if rc == 2:  # sft_scale's "config error: ..." / "data error: ...": this switch cannot run here
        msg = next((ln for ln in err.text().splitlines() if " error: " in ln), "exit code 2")
        raise Unavailable(msg.strip())
    if rc != 0:
        raise RuntimeError(f"sft_scale.train exited with {rc}")
    warm = spec.train.warmup_steps_excluded
    res = parse_sft_metrics(out, warm)
    res["sft_main_s"] = time.perf_counter() - t0
    w = min(warm, len(marks) - 1)
    if w >= 1:
        (t_a, c_a), (t_b, c_b) = marks[w - 1], marks[-1]
        res["cores_busy"] = (c_b - c_a) / (t_b - t_a) if t_b > t_a else None
    return res


class Unavailable(Exception):
    """The method cannot run on this machine (sft_scale refused the switch before training)."""


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buf = stream, io.StringIO()

    def write(self, s):
        self.buf.write(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()

    def text(self) -> str:
        return self.buf.getvalue()


RUNNERS = {"bare": run_bare, "hf": run_hf, "trl": run_trl, "sft": run_sft}
PRELOAD = {
    "bare": ["torch", "transformers", "peft"],
    "hf": ["torch", "transformers", "peft", "datasets"],
    "trl": ["torch", "transformers", "peft", "datasets", "trl"],
    "sft": ["torch", "transformers", "peft", "datasets", "accelerate", "sft_scale.train",
            "sft_scale.training.loop", "sft_scale.training.model", "sft_scale.data",
            "sft_scale.training.checkpoint", "sft_scale.training.rundir",
            "sft_scale.training.metrics", "sft_scale.training.distributed"],
}


def preload(kinds) -> None:
    """Import what the runners need before any rep starts, so a rep's wall time is its own
    work (model load, data preparation, training, saving), not the interpreter's start."""
    import importlib
    for kind in kinds:
        for mod in PRELOAD[kind]:
            try:
                importlib.import_module(mod)
            except Exception:  # noqa: BLE001 - the runner reports the real error
                pass
    try:
        from transformers import Trainer  # noqa: F401
        from trl import SFTTrainer  # noqa: F401 - resolve TRL's lazy module once
    except Exception:  # noqa: BLE001
        pass


def run_one(spec: Spec, method: dict, rep: int, out_dir: Path,
            probe_shape: tuple | None = None) -> dict:
    """One method's run; with `probe_shape`, the machine's GEMM speed is measured just before
    and just after it (bench/flops.py: each method's MFU is taken at the speed it ran at)."""
    import gc

    from bench.flops import machine_speed

    work = out_dir / f"{method['safe']}-rep{rep}"
    work.mkdir(parents=True, exist_ok=True)
    window = 0.1 if spec.name == "quick" else 1.0  # the harness's smoke test judges no MFU
    speed_before = machine_speed(probe_shape, window=window) if probe_shape else None
    gc.collect()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    try:
        res = RUNNERS[method["kind"]](spec, method.get("options", {}), work)
        res["ok"] = True
    except Unavailable as e:
        res = {"ok": False, "unavailable": True, "error": f"not available here: {e}"}
    except Exception:  # noqa: BLE001 - reported in the table, the bench goes on
        res = {"ok": False, "error": traceback.format_exc()[-3000:]}
    import torch
    res.update(method=method["name"], rep=rep, wall_s=time.perf_counter() - t0,
               peak_rss_mb=peak_rss_mb(), peak_rss_per_rep=reset_ok,
               torch_threads=torch.get_num_threads())
    if probe_shape:
        res["machine_gflops"] = [speed_before, machine_speed(probe_shape, window=window)]
    if "torch._dynamo" in sys.modules:
        # later reps must not reuse this rep's compiled graphs or hit the recompile limit
        sys.modules["torch._dynamo"].reset()
    return res


def _probe_shape(spec: Spec) -> tuple | None:
    """The machine-speed probe's GEMM shape for this spec's model and data (None if the
    workload cannot be read: the runs then go unbracketed, and the report says so)."""
    from bench.flops import reference_shape, workload_for

    try:
        return reference_shape(workload_for(spec))
    except Exception:  # noqa: BLE001 - a bench run without the probe is still a bench run
        traceback.print_exc()
        return None


def main(argv=None) -> int:
    """python -m bench.worker SPEC.json METHODS.json OUT_DIR REPS: each method's reps, in
    order, in this one process; results appended to OUT_DIR/results.jsonl as they finish."""
    argv = argv if argv is not None else sys.argv[1:]
    spec_path, methods_json, out_dir, reps = argv[:4]
    methods = json.loads(Path(methods_json).read_text())
    spec = Spec.load(Path(spec_path))
    out_dir = Path(out_dir)
    launched = float(os.environ.get("BENCH_LAUNCHED_AT", time.time()))
    if "--prepare" in argv[4:]:  # build model and data here: one process imports everything once
        from bench.data import prepare
        from bench.sft import write_config
        spec, lengths = prepare(spec, Path(spec.data_file).parent)
        spec.sft_config = str(write_config(spec, Path(spec.sft_config)))
        spec.save(Path(spec_path))
        (out_dir / "lengths.json").write_text(json.dumps(lengths))
    preload({m["kind"] for m in methods})
    import gc
    gc.collect()
    gc.freeze()  # the imported modules' objects: later collections need not walk them again
    if os.environ.get("BENCH_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    probe = _probe_shape(spec)
    startup = time.time() - launched
    ok = True
    with open(out_dir / "results.jsonl", "a") as f:
        for rep in range(int(reps)):  # rep-major: several methods in one process interleave
            for m in methods:
                res = run_one(spec, m, rep + m.get("rep_offset", 0), out_dir, probe)
                res["startup_s"] = startup
                f.write(json.dumps(res, default=float) + "\n")
                f.flush()
                ok &= bool(res["ok"] or res.get("unavailable"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
