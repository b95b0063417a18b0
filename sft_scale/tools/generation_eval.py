"""Generation-based evaluation: greedy answers to held-out prompts, scored by exact match."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sft_scale.data import load_examples
from sft_scale.data.templates import render, resolve_template
from sft_scale.model_source import resolve_model_path
from sft_scale.training.model import bnb_config, keep_4bit_cpu_layout, load_tokenizer


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt, encoded exactly as training encodes prompts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = [bos + tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        # Left padding, so every prompt ends where generation starts.
        ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e)
            mask[r, width - len(e):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    if was_training:
        model.train()
    return out


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def contains(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(_normalise(r) in _normalise(p)
               for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def label_scores(predictions: list[str], references: list[str]) -> dict:
    """Accuracy and macro-F1 when the answers are labels (a small closed set); a prediction
    outside the set counts as wrong for every class."""
    classes = sorted({_normalise(r) for r in references})
    if len(classes) > 20 or len(classes) * 3 > len(references):
        return {}
    p = [_normalise(x) for x in predictions]
    r = [_normalise(x) for x in references]
    f1s = []
    for c in classes:
        tp = sum(a == c and b == c for a, b in zip(p, r, strict=True))
        fp = sum(a == c and b != c for a, b in zip(p, r, strict=True))
        fn = sum(a != c and b == c for a, b in zip(p, r, strict=True))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": sum(a == b for a, b in zip(p, r, strict=True)) / len(r),
            "macro_f1": sum(f1s) / len(f1s)}


def evaluate_generation(model, tokenizer, records: list[dict], max_new_tokens: int) -> dict:
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens)
    refs = [r["answer"] for r in records]
    return {"exact_match": exact_match(preds, refs), "contains": contains(preds, refs),
            **label_scores(preds, refs), "n": len(records),
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "prediction": p}
                         for r, p in zip(records[:5], preds[:5], strict=True)]}


def generation_records(cfg, tokenizer, sources) -> list[dict]:
    """Held-out (prompt, answer) pairs from any format: completions as they are; chats up to
    their last assistant turn, rendered with the chat template's generation prompt."""
    template = resolve_template(tokenizer, cfg.data.chat_template)
    out = []
    for raw in load_examples(sources, cfg)["example"]:
        ex = json.loads(raw)
        if ex["kind"] == "completion":
            out.append({"prompt": ex["prompt"], "answer": ex["completion"]})
        elif ex["kind"] == "chat":
            last = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
            prompt = render(tokenizer, template, ex["messages"][:last], add_generation_prompt=True,
                            tools=ex.get("tools"))
            if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
                prompt = prompt[len(tokenizer.bos_token):]  # generate_answers adds BOS itself
            out.append({"prompt": prompt, "answer": ex["messages"][last]["content"]})
    return out[: cfg.eval.max_examples]


def eval_before_after(cfg, adapter_dir: str | None, sources) -> dict:
    """Generation metrics of the base, and of base+adapter, loaded the plain peft way; the base
    quantized as training had it (quantization.*), so a QLoRA adapter is measured on the model
    it was trained with."""
    tokenizer = load_tokenizer(cfg)
    records = generation_records(cfg, tokenizer, sources)
    quant = bnb_config(cfg)
    kwargs = {"quantization_config": quant, "device_map": {"": 0 if torch.cuda.is_available()
                                                          else "cpu"}} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                 dtype=torch.float32, use_safetensors=True,
                                                 **kwargs)
    if quant is not None and cfg.quantization.load_in_4bit:
        keep_4bit_cpu_layout(model, all_layers=False)
    result = {"before": evaluate_generation(model, tokenizer, records, cfg.eval.max_new_tokens)}
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
        result["after"] = evaluate_generation(model, tokenizer, records, cfg.eval.max_new_tokens)
    return result


def format_table(result: dict) -> str:
    cols = [c for c in ("before", "after") if c in result]
    keys = [k for k in ("exact_match", "contains", "accuracy", "macro_f1")
            if k in result[cols[0]]]
    lines = [f"{'metric':<14}" + "".join(f"{c:>10}" for c in cols)]
    for k in keys:
        lines.append(f"{k:<14}" + "".join(f"{result[c][k]:>10.3f}" for c in cols))
    lines.append(f"{'examples':<14}" + "".join(f"{result[c]['n']:>10}" for c in cols))
    return "\n".join(lines)
