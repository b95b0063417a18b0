"""The embedded demo: its config and data (data.py regenerates the shipped files) and
`sft-scale demo` (run.py). Kept light: the model-source code imports the demo's corpus from here
to build the builtin tiny model, and the demo's runner imports the whole recipe."""

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "demo.yaml"
