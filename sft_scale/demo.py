"""`sft-scale demo`: pretrained base -> supervised fine-tune -> evaluate, offline, in about a minute.

The held-out metric is exact match of greedy answers on reviews whose (subject, adjective) pairs
never occur in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from sft_scale.config import Config, load_config

DEMO_CONFIG = Path(__file__).parent / "assets" / "demo.yaml"


def _eval_records(cfg: Config) -> list[dict]:
    from sft_scale.data import load_examples
    from sft_scale.data.pipeline import eval_sources

    examples = [json.loads(e) for e in load_examples(eval_sources(cfg), cfg)["example"]]
    return [{"prompt": e["prompt"], "answer": e["completion"]}
            for e in examples[: cfg.eval.max_examples] if e["kind"] == "completion"]


def evaluate_checkpoint(cfg: Config, adapter_dir: Path | None) -> dict:
    """Exact match of the base (adapter_dir None) or base+adapter, loaded the plain peft way."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_scale.builtin import resolve_model_path
    from sft_scale.evaluate import evaluate_generation
    from sft_scale.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path),
                                                 dtype=torch.float32, use_safetensors=True)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return evaluate_generation(model, tokenizer, _eval_records(cfg), cfg.eval.max_new_tokens)


def run_demo(output_dir: str, overrides: list[str] | None = None) -> dict:
    from sft_scale.train import run

    # The demo may be rerun into the same folder: it replaces its own previous result.
    cfg = load_config(DEMO_CONFIG, ["output.overwrite=true"] + list(overrides or []), output_dir)
    before = evaluate_checkpoint(cfg, None)
    summary = run(cfg)
    after = evaluate_checkpoint(cfg, Path(cfg.output.dir) / "adapter")
    report = {"metric": "exact_match", "held_out_examples": after["n"],
              "before": before["exact_match"], "after": after["exact_match"],
              "train_steps": summary["steps"], "train_seconds": summary["seconds"],
              "final_loss": summary["final_loss"], "samples_after": after["examples"][:3]}
    (Path(cfg.output.dir) / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report, before, after)
    return report


def _print_report(report: dict, before: dict, after: dict) -> None:
    n = report["held_out_examples"]
    print("\n=== demo: held-out sentiment labelling, greedy generation ===")
    print(f"{'':8}{'exact match':>14}")
    print(f"{'before':8}{report['before']:>10.1%} ({round(report['before'] * n)}/{n})")
    print(f"{'after':8}{report['after']:>10.1%} ({round(report['after'] * n)}/{n})")
    print(f"gain: {report['after'] - report['before']:+.1%} after {report['train_steps']} steps "
          f"({report['train_seconds']:.0f} s)")
    for b, a in zip(before["examples"][:3], after["examples"][:3]):
        print(f"  {a['prompt']!r}\n    expected {a['answer']!r}  before {b['prediction']!r}  "
              f"after {a['prediction']!r}")
