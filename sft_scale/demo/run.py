"""`sft-scale demo`: pretrained base -> supervised fine-tune -> evaluate, offline, in about a
minute.

The held-out metric is exact match of greedy answers on reviews whose (subject, adjective) pairs
never occur in training.
"""

from __future__ import annotations

import json
from pathlib import Path

from sft_scale.config import load_config
from sft_scale.data.pipeline import eval_sources
from sft_scale.demo import DEMO_CONFIG
from sft_scale.tools.generation_eval import eval_before_after
from sft_scale.train import run


def run_demo(output_dir: str, overrides: list[str] | None = None) -> dict:
    # The demo may be rerun into the same folder: it replaces its own previous result.
    cfg = load_config(DEMO_CONFIG, ["output.overwrite=true"] + list(overrides or []), output_dir)
    before = eval_before_after(cfg, None, eval_sources(cfg))["before"]
    summary = run(cfg)
    after = eval_before_after(cfg, str(Path(cfg.output.dir) / "adapter"),
                              eval_sources(cfg))["after"]
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
    for b, a in zip(before["examples"][:3], after["examples"][:3], strict=True):
        print(f"  {a['prompt']!r}\n    expected {a['answer']!r}  before {b['prediction']!r}  "
              f"after {a['prediction']!r}")
