"""`sft-scale merge`: fold a LoRA adapter into its base and ship a verified standalone model.

The base is reloaded in 16/32-bit, never merged into int8 weights (LLM.int8 rounding would make
the merge lossy), even when training was 8-bit. Before anything is kept, the merged model's logits
are compared with base+adapter at the same precision, and greedy generations too. Output is
written to a temporary sibling folder and renamed into place only after it verified and
reloaded, so a failure leaves no half-written model.

A model trained on a quantized (8-bit/4-bit) base learned its adapter against the quantized
weights. Merged into the original full-precision weights (the default) it is a slightly different
model; merged into the dequantized weights (`--dequantize`) it is the model training produced.
Either way the shift is measured on the run's probe batch (probe.safetensors: training's own
logits) and reported, with a warning above SHIFT_WARN_*.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
)
from transformers.utils.hub import convert_file_size_to_int

from sft_scale.config import config_from_dict
from sft_scale.errors import ConfigError, MergeError
from sft_scale.model_source import resolve_model_path
from sft_scale.training.model import bnb_config, open_tokenizer
from sft_scale.training.rundir import atomic_dir
from sft_scale.training.serving import (
    copy_vocab_files,
    generation_eos,
    local_dir,
    save_tokenizer,
    serving_tokenizer,
)

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Max |merged - (base+adapter)| logits allowed: merging changes the order of additions only.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.1}
PROBE_PROMPTS = ["Review: the soup was awful\nSentiment:", "Hello, my name is",
                 "The capital of France is"]
# Warn when the merged model departs from what training produced (probe.safetensors) by more
# than this. Without quantization an fp32 merge reproduces training within ~1e-5, so a shift is
# quantization's (or a lower --dtype's). One logit unit multiplies a token's odds by e (2.7x);
# below 99% greedy agreement more than one next-token choice in a hundred changes. Both are
# scale-free, so they hold for any model size.
SHIFT_WARN_MAX_LOGIT = 1.0
SHIFT_WARN_AGREEMENT = 0.99


def check_output(out: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """`--out` must be a folder that is none of the inputs (`{"adapter": path, ...}`), holds
    none and lies inside none, whatever --overwrite says: replacing it must never delete what
    the command reads (a base's weights, a run's checkpoints)."""
    target = out.resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        src = Path(path).resolve()
        relation = ("is" if target == src else "contains" if src.is_relative_to(target)
                    else "lies inside" if target.is_relative_to(src) else None)
        if relation:
            raise ConfigError(f"--out {out} {relation} the {what} {path}, an input of this "
                              "command; writing there would destroy it (--overwrite does not "
                              "change this). Choose an --out outside it, e.g. a sibling folder.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder. Choose a folder path "
                          "for --out, or remove the file.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} is not empty; pass --overwrite to replace it, or choose "
                          "another --out")


def check_shard_size(max_shard_size: str) -> None:
    try:
        ok = convert_file_size_to_int(max_shard_size) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"--max-shard-size {max_shard_size!r}: expected a size such as 5GB, "
                          "500MB or 2GiB (a number and a unit).")


def run_dir_of(adapter: Path) -> Path | None:
    """The training output dir an adapter lives in (it holds the run's manifest), if any."""
    parent = adapter.resolve().parent
    return parent if (parent / "manifest.json").is_file() else None


def check_disk(out: Path, need_bytes: int) -> None:
    parent = out.parent if not out.exists() else out
    parent = next(p for p in [parent, *parent.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < need_bytes * 1.05:
        raise ConfigError(f"not enough disk for the merged model in {parent}: it needs about "
                          f"{need_bytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free. Free "
                          "space or choose another --out.")


def param_count(base: str) -> int:
    """Parameters of the base from its config alone (meta device, no weights)."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def read_adapter(adapter_dir: Path) -> dict:
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors")
               if not (adapter_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{adapter_dir}: not a PEFT adapter folder, missing {missing}. Point "
                          "--adapter at OUTPUT_DIR/adapter, or export one with sft-scale export.")
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def _probe_inputs(tokenizer) -> dict:
    enc = tokenizer(PROBE_PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def _logits_and_greedy(model, inputs, tokenizer, generate: bool = True
                       ) -> tuple[torch.Tensor, list[list[int]]]:
    model.eval()
    logits = model(**inputs).logits.float()
    if not generate:
        return logits, []
    gen = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return logits, gen[:, inputs["input_ids"].shape[1]:].tolist()


def training_config(adapter: Path):
    """The Config the run that wrote `adapter` trained with (its manifest.json), or None when the
    adapter does not sit in a run folder."""
    manifest = adapter.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return config_from_dict(json.loads(manifest.read_text())["config"], str(manifest))
    except (ValueError, KeyError, ConfigError) as e:
        log.warning("%s: cannot read the training config (%s); merging without it", manifest, e)
        return None


def quantization_name(cfg) -> str | None:
    q = cfg.quantization if cfg is not None else None
    if q is None or not (q.load_in_8bit or q.load_in_4bit):
        return None
    return "8-bit (LLM.int8)" if q.load_in_8bit else f"4-bit {q.bnb_4bit_quant_type}"


def load_dequantized_base(base_path: str, train_cfg, dtype: str):
    """The base as training saw it: quantized exactly as the run did, then each quantized Linear
    replaced by a plain one holding the dequantized weights (transformers' dequantize)."""
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=DTYPES[dtype], use_safetensors=True,
        quantization_config=bnb_config(train_cfg), device_map={"": "cpu"})
    return model.dequantize().to(DTYPES[dtype])


@torch.no_grad()
def probe_shift(model, probe_file: Path) -> dict | None:
    """The merged model's logits on the run's probe batch vs the logits training produced."""
    if not probe_file.is_file():
        return None
    probe = load_file(str(probe_file))
    logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    if logits.shape != probe["logits"].shape:  # e.g. a classification run's probe
        return None
    mask = probe["attention_mask"].bool()
    got, want = logits.float()[mask], probe["logits"][mask]
    diff = (got - want).abs()
    shift = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
             "greedy_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
             "positions": int(mask.sum())}
    shift["warn"] = shift["max_abs_logit_diff"] > SHIFT_WARN_MAX_LOGIT \
        or shift["greedy_agreement"] < SHIFT_WARN_AGREEMENT
    return shift


def _model_class(classifier: bool):
    return AutoModelForSequenceClassification if classifier else AutoModelForCausalLM


def _classifier_head(adapter: Path, tokenizer) -> dict:
    """The head a classification adapter was trained with (PEFT saves it with the adapter as
    `...score.weight`): its size, and its label names from the run's manifest when present."""
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        heads = [k for k in f.keys() if k.endswith(("score.weight", "classifier.weight"))]
        if not heads:
            raise ConfigError(f"{adapter}: a sequence-classification adapter without its head "
                              "(no score.weight in adapter_model.safetensors); it cannot be "
                              "merged into a working classifier. Export it again from the run.")
        n = f.get_slice(heads[0]).get_shape()[0]
    head = {"num_labels": n, "pad_token_id": tokenizer.pad_token_id}
    run = run_dir_of(adapter)
    manifest = json.loads((run / "manifest.json").read_text()) if run else {}
    labels = (manifest.get("resolved") or {}).get("data", {}).get("labels") or []
    problem = (manifest.get("resolved") or {}).get("problem")
    names = labels[1:] if problem == "binary" else labels
    if len(names) == n:
        head.update(id2label=dict(enumerate(names)), label2id={x: i for i, x in enumerate(names)})
    if problem == "multi_label":  # sigmoid per label at inference; the others are read by argmax
        head["problem_type"] = "multi_label_classification"
    return head


def merge(adapter_dir: str, out: str, base: str | None = None, dtype: str = "fp32",
          max_shard_size: str = "5GB", overwrite: bool = False,
          dequantize: bool = False) -> dict:
    adapter, out_path = Path(adapter_dir), Path(out)
    check_shard_size(max_shard_size)
    acfg = read_adapter(adapter)
    base_path = resolve_model_path(base or acfg["base_model_name_or_path"])
    check_output(out_path, overwrite, {"adapter": adapter, "base model": Path(base_path),
                                       "training run": run_dir_of(adapter)})
    classifier = acfg.get("task_type") == "SEQ_CLS"
    model_cls = _model_class(classifier)
    check_disk(out_path, param_count(base_path) * DTYPES[dtype].itemsize)

    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else Path(base_path)
    tokenizer = open_tokenizer(str(tok_src))
    # Saved as it was trained (chat template, BOS) and right-padded; a copy is padded left
    # for the batched greedy checks below.
    saved_tokenizer = serving_tokenizer(tokenizer, None, None)
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    train_cfg = training_config(adapter)
    quantized = quantization_name(train_cfg)
    if dequantize and quantized is None:
        raise ConfigError(f"--dequantize: {adapter.parent / 'manifest.json'} "
                          + ("is missing, so how the base was quantized is unknown"
                             if train_cfg is None else "says the run trained on an unquantized "
                             "base") + "; merge without --dequantize.")
    if dequantize and classifier:
        raise ConfigError("--dequantize merges causal-LM adapters; merge this classification "
                          "adapter without it")
    if dequantize:
        model = load_dequantized_base(base_path, train_cfg, dtype)
    else:
        head = _classifier_head(adapter, tokenizer) if classifier else {}
        model = model_cls.from_pretrained(base_path, dtype=DTYPES[dtype], use_safetensors=True,
                                          **head)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # Trained with model.add_tokens: the adapter holds every new row (trainable tokens), so
        # their initial values here do not matter.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        log.info("merge: embedding resized from %d to %d rows for the adapter's added tokens",
                 rows, len(tokenizer))
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except RuntimeError as e:
        if "size mismatch" in str(e):
            lines = str(e).splitlines()
            raise ConfigError(f"adapter {adapter} does not fit base {base_path}: shapes differ "
                             f"({lines[1].strip() if len(lines) > 1 else e}). "
                             "The adapter was trained on another base; pass the right "
                             "--base.") from None
        raise
    inputs = _probe_inputs(tokenizer)
    ref_logits, ref_gen = _logits_and_greedy(model, inputs, tokenizer, generate=not classifier)
    merged = model.merge_and_unload()
    logits, gen = _logits_and_greedy(merged, inputs, tokenizer, generate=not classifier)
    # Classification logits are one row per sequence; LM logits one per (real) token.
    mask = slice(None) if classifier else inputs["attention_mask"].bool()
    diff = (logits[mask] - ref_logits[mask]).abs().max().item()
    report = {"base": base_path, "adapter": str(adapter), "dtype": dtype,
              "kind": "sequence classification" if classifier else "causal LM",
              "max_abs_logit_diff": diff, "tolerance": TOLERANCE[dtype],
              "greedy_generations_equal": None if classifier else gen == ref_gen,
              "trained_on": quantized or "unquantized",
              "merged_into": f"dequantized {quantized} weights" if dequantize
              else "original weights",
              # best_adapter's probe is not the final adapter's: compare only the final one
              "shift_vs_training": probe_shift(merged, adapter.parent / "probe.safetensors")
              if adapter.name == "adapter" and not classifier else None}
    shift = report["shift_vs_training"]
    if shift and shift["warn"]:
        log.warning("the merged model departs from the one training produced: max |logit diff| "
                    "%.3g, greedy agreement %.1f%% on the run's probe batch%s",
                    shift["max_abs_logit_diff"], 100 * shift["greedy_agreement"],
                    "; merge with --dequantize to keep the training-time model"
                    if quantized and not dequantize else "")
    log.info("merge verification: %s", report)
    if diff > TOLERANCE[dtype]:
        raise MergeError(f"merged model disagrees with base+adapter: max |logit diff| {diff:.3g} "
                         f"> {TOLERANCE[dtype]} ({dtype}); nothing was written")
    if not classifier and gen != ref_gen:
        log.warning("greedy generations differ between merged and base+adapter (near-tied "
                    "logits at %s precision); logits agree within tolerance", dtype)

    if not classifier:
        merged.generation_config = _generation_config(adapter, merged.generation_config,
                                                      saved_tokenizer)
        report["generation_eos_token_id"] = merged.generation_config.eos_token_id
    with atomic_dir(out_path) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        _add_rope_theta(tmp / "config.json")
        save_tokenizer(saved_tokenizer, tmp)
        # Unchanged from the adapter (which training gave the base's) or else the base.
        report["tokenizer_files_copied"] = copy_vocab_files(adapter, tmp) + \
            copy_vocab_files(local_dir(base_path), tmp)
        report["tokenizer_matches_base"] = _same_tokenization(tmp, base_path)
        if not report["tokenizer_matches_base"]:
            raise MergeError(f"the tokenizer saved with the merged model tokenizes differently "
                             f"from the base's ({base_path}); nothing was written")
        (tmp / "README.md").write_text(model_card(report, adapter))
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        # Reload what was written (all shards) before it replaces anything.
        reloaded = model_cls.from_pretrained(tmp, dtype=DTYPES[dtype])
        check, _ = _logits_and_greedy(reloaded, inputs, tokenizer, generate=False)
        if not torch.equal(check, logits):
            raise MergeError("the saved merged model does not reload to the merged logits; "
                             "nothing was written")
    return report


def _generation_config(adapter: Path, base_config, tokenizer):
    """The adapter's generation config (training wrote it: EOS plus the chat template's end of
    turn), else the base's with the end-of-turn token of the tokenizer's template added."""
    if (adapter / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(adapter)
    gen = copy.deepcopy(base_config)
    eos = generation_eos(gen.eos_token_id, tokenizer, tokenizer.chat_template)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    return gen


def _add_rope_theta(config_json: Path) -> None:
    """transformers 5 writes the RoPE base only inside `rope_parameters`; converters written
    for the older layout (llama.cpp's among them) read a top-level `rope_theta`, and
    transformers accepts both, so both are written."""
    cfg = json.loads(config_json.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


SAMPLE_TEXTS = ["Hello, my name is Ada.\n\nI  like   spaces\tand tabs.",
                "Ünïcödé, 数字 12345 and code: def f(x): return x**2",
                " leading space, trailing space "]


def _same_tokenization(saved: Path, base: str) -> bool:
    """Whether the saved tokenizer splits text into the same ids as the base's own."""
    a, b = open_tokenizer(str(saved)), open_tokenizer(base)
    return all(a(t, add_special_tokens=False)["input_ids"] == b(t, add_special_tokens=False)[
        "input_ids"] for t in SAMPLE_TEXTS)


def model_card(report: dict, adapter: Path) -> str:
    run = adapter.parent
    lines = ["# Merged model (sft_scale)", "",
             f"- base: `{report['base']}`", f"- adapter: `{report['adapter']}`",
             f"- precision: {report['dtype']}",
             "- verification: max |logit diff| vs base+adapter = "
             f"{report['max_abs_logit_diff']:.3g}"
             f" (tolerance {report['tolerance']}); greedy generations equal: "
             f"{report['greedy_generations_equal']}",
             f"- trained on: {report['trained_on']} base; merged into the "
             f"{report['merged_into']}"]
    shift = report.get("shift_vs_training")
    if shift:
        lines.append(f"- shift vs the model training produced (probe batch): max |logit diff| "
                     f"{shift['max_abs_logit_diff']:.3g}, mean {shift['mean_abs_logit_diff']:.3g},"
                     f" greedy agreement {shift['greedy_agreement']:.1%}")
    manifest = run / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        data = m.get("config", {}).get("data", {})
        lines += [f"- training data: {data.get('train_files') or data.get('datasets')}",
                  f"- training config: see `config` in {manifest}"]
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        lines += [f"- final training loss: {s.get('final_loss')}", f"- steps: {s.get('steps')}"]
    return "\n".join(lines) + "\n"
