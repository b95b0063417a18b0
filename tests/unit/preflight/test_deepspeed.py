"""DeepSpeed config resolution, compatibility checks and launch-line composition (no processes)."""

import dataclasses
import json
import logging

import pytest

from sft_scale.cli import main as cli_main
from sft_scale.config import ConfigError, load_config
from sft_scale.preflight.command import Layout, launch_command
from sft_scale.preflight.deepspeed import (
    DS_CONFIG_DIR,
    check_compatibility,
    load_ds_config,
    resolve_ds_config,
)
from sft_scale.preflight.resolve import resolve
from tests.helpers import DEMO_CONFIG


@pytest.fixture
def cfg():
    return load_config(DEMO_CONFIG, ["training.micro_batch_size=4",
                                     "training.gradient_accumulation_steps=2"])


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero2_offload", "zero3",
                                  "zero3_offload"])
def test_every_shipped_config_resolves_completely(cfg, name):
    ds = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / f"{name}.json")), cfg, 8, 64)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    if name.startswith("zero3"):
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)


def test_bf16_dtype_fills_bf16(cfg):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="bf16"))
    ds = resolve_ds_config(load_ds_config(str(DS_CONFIG_DIR / "zero2.json")), cfg, 2, 64)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_user_json_contradicting_the_config_is_refused(cfg, tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8,
                             "gradient_accumulation_steps": "auto",
                             "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError,
                       match=r"mine.json: train_micro_batch_size_per_gpu=8 contradicts "
                             r"the training config \(4"):
        resolve_ds_config(load_ds_config(str(p)), cfg, 2, 64, source=str(p))


def test_fp16_and_bf16_together_are_refused(cfg, tmp_path):
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="fp16"))
    with pytest.raises(ConfigError, match="bf16.enabled=True contradicts model.dtype=fp16"):
        resolve_ds_config({"bf16": {"enabled": True}, "fp16": {"enabled": "auto"}}, cfg, 1, 64)


def test_unknown_key_in_user_json_warns_with_suggestion(tmp_path, caplog):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"gradient_cliping": 1.0, "zero_optimization": {"stage": 2}}))
    with caplog.at_level(logging.WARNING):
        load_ds_config(str(p))
    assert ("unknown DeepSpeed key 'gradient_cliping' (did you mean 'gradient_clipping'?)"
            in caplog.text)


def test_bad_json_names_line(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"mine.json:3: not valid JSON"):
        load_ds_config(str(p))


def test_8bit_with_zero3_is_refused_before_loading():
    def deepspeed(zero):
        cfg = load_config(DEMO_CONFIG, ["quantization.load_in_8bit=true",
                                        f"distributed.zero={zero}"])
        return resolve(cfg, Layout.for_config(cfg, nproc_per_node=2)).deepspeed

    with pytest.raises(ConfigError, match="8-bit .* cannot be partitioned by ZeRO-3. Use ZeRO-2"):
        deepspeed(3)
    assert deepspeed(2)["zero_optimization"]["stage"] == 2


def test_offload_without_deepspeed_and_quantized_full_finetune_are_refused(tmp_path):
    with pytest.raises(ConfigError,
                       match="'distributed.offload: true' needs DeepSpeed ZeRO-2 or ZeRO-3"):
        load_config(DEMO_CONFIG, ["distributed.offload=true"])
    with pytest.raises(ConfigError, match="full fine-tuning"):
        load_config(DEMO_CONFIG, ["quantization.load_in_8bit=true", "lora.enabled=false"])
    with pytest.raises(ConfigError, match="CPU offload needs ZeRO stage 1-3"):
        check_compatibility(load_config(DEMO_CONFIG),
                            {"zero_optimization": {"stage": 0,
                                                   "offload_optimizer": {"device": "cpu"}}})


def test_launch_lines():
    one = launch_command("c.yaml", Layout(nproc_per_node=8, zero=3))
    assert one[:4] == ["accelerate", "launch", "--num_processes", "8"]
    assert "--use_deepspeed" in one
    assert one[one.index("--deepspeed_config_file") + 1].endswith("zero3.json")
    off = launch_command("c.yaml", Layout(nproc_per_node=8, zero=2, offload=True))
    assert off[off.index("--deepspeed_config_file") + 1].endswith("zero2_offload.json")
    ddp = launch_command("c.yaml", Layout(nproc_per_node=2))
    assert "--multi_gpu" in ddp and "--use_deepspeed" not in ddp
    multi = launch_command("c.yaml", Layout(nproc_per_node=8, nodes=2, node_rank=1,
                                            master_addr="10.1.1.1", zero=2), output_dir="o")
    joined = " ".join(multi)
    assert "--num_processes 16 --multi_gpu --num_machines 2 --machine_rank 1" in joined
    assert "--main_process_ip 10.1.1.1" in joined and "--rdzv_backend static" in joined
    assert "--use_deepspeed" not in multi  # DeepSpeed comes from the config, not its launcher
    assert multi[-4:-2] == ["--set", f"distributed.deepspeed_config={DS_CONFIG_DIR}/zero2.json"]
    with pytest.raises(ConfigError, match="--offload needs DeepSpeed"):
        launch_command("c.yaml", Layout(offload=True))


def test_sft_scale_train_dry_run_prints_resolved_values_and_the_line(capsys):
    assert cli_main(["train", "--config", str(DEMO_CONFIG), "--zero", "3", "--nproc", "8",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"train_batch_size": 128' in out and '"train_micro_batch_size_per_gpu": 16' in out
    assert "world size 8 = 1 node(s) x 8 process(es); global batch 128" in out
    assert "$ accelerate launch --num_processes 8 --use_deepspeed" in out
    assert cli_main(["train", "--config", str(DEMO_CONFIG), "--zero", "3", "--nproc", "2",
                     "--set", "quantization.load_in_8bit=true", "--dry-run"]) == 2
