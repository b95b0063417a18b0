"""The offloaded optimizer: DeepSpeed's CPU Adam where its op builds, torch AdamW (with the reason
printed) where it does not. The op's JIT build takes minutes (docs/BENCHMARKS.md), so no test here
builds it: the fallback is provoked by a real build with a compiler that does not exist."""

import os
import subprocess
import sys

import pytest

from sft_scale.config import load_config
from sft_scale.preflight.deepspeed import DS_CONFIG_DIR, load_ds_config, resolve_ds_config
from tests.helpers import DEMO_CONFIG, ROOT


@pytest.mark.parametrize("name, force", [("zero2_offload", True), ("zero3_offload", True),
                                         ("zero2", False)])
def test_shipped_configs_ask_for_cpu_adam_when_the_optimizer_is_offloaded(name, force):
    ds = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / f"{name}.json")),
                           load_config(DEMO_CONFIG), 2, 64)
    assert ds.get("zero_force_ds_cpu_optimizer", False) is force


def test_a_users_explicit_choice_is_kept():
    ds = load_ds_config(str(DS_CONFIG_DIR / "zero2_offload.json"))
    ds["zero_force_ds_cpu_optimizer"] = False
    assert resolve_ds_config(ds, load_config(DEMO_CONFIG), 2, 64)[
        "zero_force_ds_cpu_optimizer"] is False


def test_when_cpu_adam_cannot_be_built_training_falls_back_and_says_why(tmp_path):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if CPUAdamBuilder().is_compatible(verbose=False) and _preinstalled():
        pytest.skip("this DeepSpeed ships a prebuilt cpu_adam op: nothing to build")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/nonexistent/c++",
               PYTHONPATH=str(ROOT), RANK="0")
    code = ("from sft_scale.config import load_config; from sft_scale.preflight.resolve import "
            "resolve, in_job_layout; "
            f"cfg = load_config({str(DEMO_CONFIG)!r}, ['distributed.zero=2', "
            "'distributed.offload=true']); "
            "ds = resolve(cfg, in_job_layout(cfg), in_job=True).deepspeed; "
            "print('force', ds['zero_force_ds_cpu_optimizer'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "force False" in proc.stdout
    assert "offload optimizer: torch AdamW, the slow path (building the cpu_adam op failed" \
        in proc.stdout


def _preinstalled() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("cpu_adam"))
