"""`sft-scale plan`, `distributed.zero: auto` and `sft-scale check`, in-process (no training)."""

import json
from pathlib import Path

import pytest

from sft_scale.cli import main
from sft_scale.config import ConfigError, load_config
from sft_scale.plan import GiB, estimate
from sft_scale.preflight import resolve_auto_zero, resolve_deepspeed
from tests.conftest import DEMO_CONFIG, ROOT

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "model_configs"
LLAMA8B = f"model.name_or_path={FIXTURES / 'llama3_8b.json'}"
FULL_8B = ["--set", LLAMA8B, "--set", "lora.enabled=false", "--set", "model.dtype=bf16",
           "--set", "data.max_seq_len=2048", "--set", "training.micro_batch_size=2",
           "--set", "training.gradient_checkpointing=true"]


def test_plan_cli_json_matches_the_library_and_the_table_names_the_choice(capsys):
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpus-per-node", "8", "--nodes", "1",
                 "--gpu-memory", "80GiB", "--json", *FULL_8B]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = load_config(DEMO_CONFIG, [a for a in FULL_8B if a != "--set"])
    assert plan == json.loads(json.dumps(estimate(cfg, 8, 80 * GiB)))
    assert plan["world_size"] == 8 and plan["recommendation"]["stage"] in (1, 2)
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpus-per-node", "4", "--nodes", "2",
                 "--gpu-memory", "80GiB", *FULL_8B]) == 0
    table = capsys.readouterr().out
    assert "8 GPU(s) x 80.0 GiB" in table
    assert f"recommendation: {plan['recommendation']['name']}, micro-batch up to " \
           f"{plan['recommendation']['micro_batch']}" in table


def test_plan_cli_exit_1_when_nothing_fits_and_clear_errors_for_bad_input(capsys):
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "8GiB", *FULL_8B]) == 1
    assert "micro-batch 2 fits nowhere; ZeRO-3+offload fits 1" in capsys.readouterr().out
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "2GiB", *FULL_8B]) == 1
    assert "recommendation: none" in capsys.readouterr().out
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: not a memory size: 'lots'" in capsys.readouterr().err
    assert main(["plan", "--config", str(DEMO_CONFIG),
                 "--set", "model.name_or_path=/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path='/nonexistent/model': cannot read its config.json" in err


def test_zero_auto_takes_the_plans_recommendation_for_the_given_memory():
    sets = [a for a in FULL_8B if a != "--set"] + ["distributed.zero=auto"]
    for memory, world in ((80 * GiB, 8), (40 * GiB, 8), (80 * GiB, 64)):
        cfg = load_config(DEMO_CONFIG, sets)
        rec = estimate(cfg, world, memory)["recommendation"]
        resolve_auto_zero(cfg, world, memory)
        assert (cfg.distributed.zero, cfg.distributed.offload) == (rec["stage"], rec["offload"])
    # 40 GiB GPUs need at least as much partitioning as 80 GiB ones for the same job (both pick
    # ZeRO-2 here: among the stages with DDP's traffic, the one with the most headroom).
    small, big = load_config(DEMO_CONFIG, sets), load_config(DEMO_CONFIG, sets)
    resolve_auto_zero(small, 8, 40 * GiB)
    resolve_auto_zero(big, 8, 80 * GiB)
    assert (small.distributed.zero, small.distributed.offload) >= \
           (big.distributed.zero, big.distributed.offload)


def test_zero_auto_that_fits_nowhere_is_a_config_error_with_the_table():
    cfg = load_config(DEMO_CONFIG, [a for a in FULL_8B if a != "--set"] + ["distributed.zero=auto"])
    with pytest.raises(ConfigError, match=r"distributed.zero: auto: no ZeRO stage fits "
                                          r"micro-batch 2 in the --gpu-memory given") as e:
        resolve_auto_zero(cfg, 1, 8 * GiB)
    assert "ZeRO-3+offload" in str(e.value)


def test_zero_auto_on_this_cpu_resolves_to_a_real_deepspeed_config():
    """The demo model fits any machine's memory: the least-communication stage, ZeRO-0."""
    cfg = load_config(DEMO_CONFIG, ["distributed.zero=auto"])
    ds = resolve_deepspeed(cfg, world_size=1)
    assert cfg.distributed.zero == 0 and ds["zero_optimization"]["stage"] == 0


def test_zero_auto_with_offload_is_rejected_and_a_bad_value_names_the_choices():
    with pytest.raises(ConfigError, match="'distributed.offload' is chosen by"):
        load_config(DEMO_CONFIG, ["distributed.zero=auto", "distributed.offload=true"])
    with pytest.raises(ConfigError, match="distributed.zero"):
        load_config(DEMO_CONFIG, ["distributed.zero=fast"])


def test_train_dry_run_with_zero_auto_defers_the_choice_to_the_job(capsys):
    assert main(["train", "--config", str(DEMO_CONFIG), "--zero", "auto", "--nproc", "2",
                 "--dry-run"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("$ ")][0]
    assert "--set distributed.zero=auto" in line and "--use_deepspeed" not in line


def test_check_reports_steps_tokens_disk_and_the_launch_line_and_writes_nothing(tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    assert main(["check", "--config", str(DEMO_CONFIG), "--gpus-per-node", "2", "--nodes", "2",
                 "--zero", "2", "--master-addr", "10.0.0.7", "--output-dir", str(out),
                 "--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert not out.exists()
    # demo data: 600 records, micro-batch 16 x 4 ranks = 64 per step, max_steps 80.
    assert report["records"] == 600 and report["steps_per_epoch"] == 10
    assert report["total_steps"] == 80
    assert 10 < report["avg_tokens"] < 20
    assert report["total_tokens"] == pytest.approx(80 * 64 * report["avg_tokens"], rel=0.01)
    assert report["deepspeed"] == "ZeRO-2" and report["disk_ok"]
    assert report["fast_paths"]["loss"] == "chunked"
    assert "«" in text and "»" in text  # the sample is shown with its trained part marked
    assert "--num_machines 2" in report["launch"] and "zero2.json" in report["launch"]
    assert "--main_process_ip 10.0.0.7" in report["launch"]
    assert "on node R use --machine_rank R" in text
    assert "check: ok" in text


def test_check_fails_on_disk_and_on_bad_data_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["check", "--config", str(DEMO_CONFIG), "--output-dir", str(out),
                 "--set", "lora.enabled=false", "--set", "checkpoint.keep_last=1000000000"]) == 1
    assert "NOT ENOUGH" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    assert main(["check", "--config", str(DEMO_CONFIG), "--output-dir", str(out),
                 "--set", f"data.train_files=[{bad}]", "--set", "data.eval_files=[]"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    # A switch that cannot work in this layout is caught too (chunked loss under ZeRO-3).
    assert main(["check", "--config", str(DEMO_CONFIG), "--output-dir", str(out), "--zero", "3",
                 "--set", "training.loss=chunked"]) == 2
    assert "'training.loss: chunked' does not work under DeepSpeed ZeRO-3" in \
        capsys.readouterr().err
    assert not out.exists()
