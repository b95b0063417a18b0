"""The benchmark harness end to end in --quick mode (a tiny model, 1 rep, 2 steps): every method
runs and is reported. A smoke test of bench/, not a measurement: performance is never asserted."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_bench_quick_reports_every_method(tmp_path, sft_scale_home):
    out = tmp_path / "BENCH.md"
    env = dict(os.environ, SFT_SCALE_BENCH_CACHE=str(tmp_path / "cache"),
               SFT_SCALE_HOME=str(sft_scale_home))
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--out", str(out),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = json.loads(out.with_suffix(".json").read_text())
    agg, methods = data["aggregate"], data["methods"]
    t = data["spec"]["train"]
    n_examples = t["steps"] * t["micro_batch_size"] * t["gradient_accumulation_steps"]
    ran = [m for m in methods if m["available"] and not agg[m["name"]].get("unavailable")]
    names = {m["name"] for m in ran}
    # The contenders are all there (the switch list follows sft_scale's config).
    assert {"bare_step", "transformers_trainer", "trl_defaults", "trl_packing",
            "trl_padding_free", "sft_scale"} <= names
    for m in methods:
        a = agg[m["name"]]
        if m["name"] not in names:  # not runnable here (a missing package): a reason is given
            assert m["why_not"] or a.get("unavailable"), m["name"]
            continue
        assert a["ok"] == a["reps"] == 1, (m["name"], a["errors"])
        assert a["tokens_per_s"] > 0, m["name"]
        assert math.isfinite(a["final_loss"]), m["name"]
        if not m["synthetic"]:
            # Every real method trained the same number of examples: one epoch of the data.
            assert a["examples"] == [n_examples], (m["name"], a["examples"])

    md = out.read_text()
    assert "python -m bench.run --quick --out " + str(out) in md
    for section in ("## Machine", "## Results", "## Where TRL's gap to the ceiling goes"):
        assert section in md


def test_gpu_check_dry_run_runs_every_method_on_cpu(tmp_path, sft_scale_home):
    """bench/gpu_check.py's code path (the script a lent GPU runs once, with no second chance)
    on a tiny model on CPU. No GPU exists here: the CUDA numbers themselves cannot be tested."""
    out = tmp_path / "gpu"
    env = dict(os.environ, SFT_SCALE_HOME=str(sft_scale_home))
    cmd = [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    results = data["results"]
    assert {r["method"] for r in results} >= {"sft_scale_bf16", "sft_scale_8bit", "sft_scale_4bit"}
    # the limit is measured on the device (here: the CPU, fp32) before the first method and
    # after the last, and every method's MFU is taken against it
    assert len(data["limits"]) == 2 and all(x["peak_gflops"] > 0 for x in data["limits"])
    for r in results:
        assert r["ok"], (r["method"], r.get("error"))
        assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"]), r["method"]
        assert r["mfu"] > 0 and r["of_limit"] > 0, r["method"]
    md = (out / "gpu_check.md").read_text()
    assert "sft_scale_8bit" in md and "sft_scale_4bit" in md and "MFU (measured peak)" in md


def test_bench_interleaved_rounds_report_per_round_ratios_and_the_limit(tmp_path, sft_scale_home):
    """Two rounds of two methods, each run in its own process in a rotated order, with the
    physical limit measured per round; --summary reads the JSON back. No number is asserted
    beyond being measured: this is the harness, not a measurement."""
    out = tmp_path / "BENCH.md"
    env = dict(os.environ, SFT_SCALE_BENCH_CACHE=str(tmp_path / "cache"),
               SFT_SCALE_HOME=str(sft_scale_home))
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--isolation", "method", "--rounds", "2",
           "--methods", "bare_step,sft_scale", "--out", str(out), "--work", str(tmp_path / "w")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rounds = data["rounds"]
    assert [r["order"] for r in rounds] == [["bare_step", "sft_scale"], ["sft_scale", "bare_step"]]
    for r in rounds:
        assert r["limit"]["limit_tokens_per_s"] > 0 and 0 < r["limit"]["limit_mfu"] <= 1
        ref = r["limit"]["reference"]
        # two probe windows around the throughput measurement; the faster is the reference
        assert len(ref["probes"]) == 2 and ref["gflops"] == max(ref["probes"]) > 0
        assert r["limit"]["square_gemm"]["gflops"] > 0
    assert sorted(x["rep"] for x in data["runs"]["sft_scale"]) == [0, 1]
    # every run is bracketed by the machine-speed probe, in its own process
    assert all(len(x["machine_gflops"]) == 2 and min(x["machine_gflops"]) > 0
               for rs in data["runs"].values() for x in rs)
    md = out.read_text()
    assert "## Interleaved rounds" in md and "CPU MFU" in md and "probe GFLOP/s" in md
    assert "**Small matrices?** A 1024x1024x1024 GEMM" in md
    summary = subprocess.run([sys.executable, "-m", "bench.run", "--summary", "--from-json",
                              str(out.with_suffix(".json"))], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    line = summary.stdout.strip()
    assert "\n" not in line and "sft_scale / bare_step" in line and "CPU MFU" in line


def test_trim_last_layer_ab_reports_the_pairs_and_the_predicted_ratio(tmp_path, sft_scale_home):
    out = tmp_path / "TRIM.md"
    env = dict(os.environ, SFT_SCALE_BENCH_CACHE=str(tmp_path / "cache"),
               SFT_SCALE_HOME=str(sft_scale_home))
    cmd = [sys.executable, "-m", "bench.trim_last_layer", "--quick", "--rounds", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "layers.1.mlp" in text and "layers.1.self_attn.q_proj" in text
    assert text.count("x |") == 2  # one row per round
    predicted = float(text.split("predicts ")[1].split("x")[0])
    assert predicted > 1.0  # the tiny model's prompts are untrained too: less work trimmed


@pytest.mark.parametrize("timer", ["dispatch", "profiler"])
def test_profile_attributes_the_run_to_operators(tmp_path, sft_scale_home, timer):
    out = tmp_path / "PROFILE.md"
    env = dict(os.environ, SFT_SCALE_BENCH_CACHE=str(tmp_path / "cache"),
               SFT_SCALE_HOME=str(sft_scale_home))
    cmd = [sys.executable, "-m", "bench.profile", "--quick", "--steps", "2", "--timer", timer,
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert "| GEMM (linear layers, LoRA, LM head) |" in text and "`aten::mm`" in text
    assert "the training steps took" in text
    assert ("## Top 15 operators by input shapes" in text) == (timer == "dispatch")
