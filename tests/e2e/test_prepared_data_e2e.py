"""Data prepared once by `sft-scale data prepare` and a 2-process run that tokenizes nothing."""

import subprocess
import sys

import pytest

from tests.helpers import DEMO_CONFIG, ROOT, free_port, train_metrics

pytestmark = pytest.mark.slow

SETS = ("training.max_steps=3", "training.micro_batch_size=4", "training.logging_steps=1",
        "training.warmup_steps=0")

# The real training entry point, with the one function every tokenization goes through
# (pipeline.encode_dataset, called by build_datasets) wrapped to leave a per-rank marker file.
MARKED_TRAIN = """
import os, sys
sys.path.insert(0, {root!r})
import sft_scale.data.pipeline as pipeline
original = pipeline.encode_dataset
def marked(*args, **kwargs):
    with open(os.path.join({marks!r}, "tokenized-rank" + os.environ.get("RANK", "0")), "a") as f:
        f.write("x\\n")
    return original(*args, **kwargs)
pipeline.encode_dataset = marked
from sft_scale.train import main
sys.exit(main())
"""


def train_marked(script, out, nproc, *sets):
    cmd = [sys.executable, str(script)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
               "--multi_gpu", "--main_process_port", str(free_port()), str(script)]
    cmd += ["--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    for s in SETS + sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def test_two_processes_with_prepared_data_tokenize_nothing_and_train_the_same(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "train_marked.py"
    script.write_text(MARKED_TRAIN.format(root=str(ROOT), marks=str(marks)))
    out = tmp_path / "run"
    prep = subprocess.run(
        [sys.executable, "-m", "sft_scale.cli", "data", "prepare", "--config", str(DEMO_CONFIG),
         "--output-dir", str(out)] + [a for s in SETS for a in ("--set", s)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-4000:]
    assert f"prepared data in {out / 'prepared_data'}" in prep.stdout
    assert (out / "prepared_data" / "prepared.json").is_file()

    proc = train_marked(script, out, 2)
    assert "world size 2" in proc.stderr
    for rank in (0, 1):  # every rank says it loaded the prepared data
        assert f"data: rank {rank} loads the prepared data from" in proc.stdout
    assert sorted(p.name for p in marks.iterdir()) == [], "a rank tokenized despite prepared data"

    # The same training without prepared data: the marker works (rank 0 tokenizes), and one
    # process with twice the accumulation (same global batch) sees the same losses.
    ref = tmp_path / "ref"
    train_marked(script, ref, 1, "training.gradient_accumulation_steps=2")
    assert (marks / "tokenized-rank0").is_file()
    losses = [m["loss"] for m in train_metrics(out)]
    assert losses == pytest.approx([m["loss"] for m in train_metrics(ref)], rel=1e-4)
