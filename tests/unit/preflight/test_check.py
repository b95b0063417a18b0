"""`sft-scale plan`, `distributed.zero: auto` and `sft-scale check`, in-process (no training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft_scale.cli import main
from sft_scale.config import ConfigError, load_config
from sft_scale.preflight.command import Layout
from sft_scale.preflight.deepspeed import choose_zero
from sft_scale.preflight.plan import GiB, estimate
from sft_scale.preflight.resolve import in_job_layout, resolve
from tests.helpers import DEMO_CONFIG, ROOT

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model_configs"
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


def test_plan_cli_exit_1_when_nothing_fits_and_clear_errors_for_bad_input(capsys, tmp_path):
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "8GiB", *FULL_8B]) == 1
    assert "micro-batch 2 fits nowhere; ZeRO-3+offload fits 1" in capsys.readouterr().out
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "2GiB", *FULL_8B]) == 1
    assert "recommendation: none" in capsys.readouterr().out
    assert main(["plan", "--config", str(DEMO_CONFIG), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: not a memory size: 'lots'" in capsys.readouterr().err
    assert main(["plan", "--config", str(DEMO_CONFIG),
                 "--set", "model.name_or_path=/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path='/nonexistent/model': the folder /nonexistent/model does not " \
           "exist" in err
    assert main(["plan", "--config", str(DEMO_CONFIG),
                 "--set", f"model.name_or_path={tmp_path}"]) == 2
    assert f"model.name_or_path='{tmp_path}': cannot read its config.json" in \
        capsys.readouterr().err
    assert main(["plan", "--config", str(DEMO_CONFIG),
                 "--set", "model.name_or_path=nobody-h16b/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "huggingface-cli download nobody-h16b/no-such-model" in err
    assert "Planning needs only the model's config.json" in err


def test_zero_auto_takes_the_plans_recommendation_for_the_given_memory():
    sets = [a for a in FULL_8B if a != "--set"] + ["distributed.zero=auto"]
    for memory, world in ((80 * GiB, 8), (40 * GiB, 8), (80 * GiB, 64)):
        cfg = load_config(DEMO_CONFIG, sets)
        rec = estimate(cfg, world, memory)["recommendation"]
        stage, offload, _why = choose_zero(cfg, world, None, memory)
        assert (stage, offload) == (rec["stage"], rec["offload"])
        # decided on the resolved record; the config keeps what its user wrote
        assert resolve(cfg, Layout.for_config(cfg, nproc_per_node=world),
                       memory=memory).zero_stage == rec["stage"]
        assert cfg.distributed.zero == "auto"
    # 40 GiB GPUs need at least as much partitioning as 80 GiB ones for the same job (both pick
    # ZeRO-2 here: among the stages with DDP's traffic, the one with the most headroom).
    small, big = load_config(DEMO_CONFIG, sets), load_config(DEMO_CONFIG, sets)
    assert choose_zero(small, 8, None, 40 * GiB)[:2] >= choose_zero(big, 8, None, 80 * GiB)[:2]


def test_zero_auto_that_fits_nowhere_is_a_config_error_with_the_table():
    cfg = load_config(DEMO_CONFIG, [a for a in FULL_8B if a != "--set"] + ["distributed.zero=auto"])
    with pytest.raises(ConfigError, match=r"distributed.zero: auto: no ZeRO stage fits "
                                          r"micro-batch 2 in the --gpu-memory given") as e:
        choose_zero(cfg, 1, None, 8 * GiB)
    assert "ZeRO-3+offload" in str(e.value)


def test_zero_auto_on_this_cpu_resolves_to_a_real_deepspeed_config():
    """The demo model fits any machine's memory: the least-communication stage, ZeRO-0."""
    cfg = load_config(DEMO_CONFIG, ["distributed.zero=auto"])
    resolved = resolve(cfg, in_job_layout(cfg), in_job=True)
    assert resolved.zero_stage == 0 and resolved.deepspeed["zero_optimization"]["stage"] == 0


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
    # The memory plan of this layout, for GPUs of 80 GiB unless --gpu-memory says otherwise.
    assert "memory plan (assuming 80.0 GiB GPUs; pass --gpu-memory for yours):\n" in text
    assert "4 GPU(s) x 80.0 GiB" in text
    assert report["memory_variant"] == "ZeRO-2" and report["memory_fits"]
    assert "memory: this layout (ZeRO-2) needs ~" in text and "per GPU: fits in 72.0 GiB" in text
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


@pytest.mark.parametrize("argv, flag", [
    (["train", "--nproc", "0"], "--nproc"), (["train", "--nproc", "-2"], "--nproc"),
    (["train", "--nodes", "0"], "--nodes"), (["train", "--master-port", "70000"], "--master-port"),
    (["plan", "--micro-batch", "0"], "--micro-batch"),
    (["plan", "--gpus-per-node", "0"], "--gpus-per-node"), (["plan", "--nodes", "x"], "--nodes"),
    (["check", "--nodes", "0"], "--nodes"), (["check", "--gpus-per-node", "-1"], "--gpus-per-node"),
])
def test_counts_below_one_are_refused_by_the_parser(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv[:1] + ["--config", str(DEMO_CONFIG)] + argv[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and (">= 1" in err or "1-65535" in err)


def test_train_node_rank_outside_the_nodes_and_an_empty_output_dir_are_refused(capsys, tmp_path):
    assert main(["train", "--config", str(DEMO_CONFIG), "--nodes", "2", "--node-rank", "2",
                 "--dry-run"]) == 2
    assert "--node-rank 2: must be in [0, --nodes 2)" in capsys.readouterr().err
    assert main(["train", "--config", str(DEMO_CONFIG), "--output-dir", "", "--dry-run"]) == 2
    assert "'output.dir' must name a folder; an empty one would write the run into the current " \
           "directory" in capsys.readouterr().err


def test_eval_with_a_missing_adapter_is_a_config_error(capsys, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    assert main(["eval", "--model", "builtin:tiny-llama", "--adapter", "/nonexistent",
                 "--data", str(data)]) == 2
    assert "--adapter /nonexistent: no PEFT adapter there (no adapter_config.json)" in \
        capsys.readouterr().err


def test_check_prints_the_memory_plan_and_fails_when_the_layout_does_not_fit(capsys, tmp_path):
    out = tmp_path / "run"
    # The planner counts 1 GiB of CUDA/NCCL overhead per GPU: nothing fits in 1 GiB.
    assert main(["check", "--config", str(DEMO_CONFIG), "--output-dir", str(out),
                 "--gpu-memory", "1GiB"]) == 1
    text = capsys.readouterr().out
    assert "memory plan:\n" in text and "1 GPU(s) x 1.0 GiB" in text
    assert "memory: this layout (ZeRO-0) needs ~" in text and "does NOT fit in 921.6 MiB" in text
    assert "check: FAILED (memory)" in text
    assert not out.exists()


def test_check_refuses_what_only_the_model_or_data_can_show(capsys, tmp_path):
    out = tmp_path / "run"
    base = ["check", "--config", str(DEMO_CONFIG), "--output-dir", str(out)]
    cases = [
        (["lora.target_modules=[q_proj, v_prj]"], "'lora.target_modules': 'v_prj' names no module"),
        (["lora.r=512"], "'lora.r' (512) is larger than the layers it adapts"),
        (["data.chat_template=chatml2"], "'data.chat_template': 'chatml2' is not 'auto'"),
        # demo: 600 records, 16 per step: 38 steps in one epoch.
        (["training.max_steps=0", "training.warmup_steps=500"],
         "'training.warmup_steps' (500) is far beyond the run's 38 steps"),
        (["model.name_or_path=builtin:nope"], "unknown builtin model"),
        (["model.name_or_path=nobody-h16b/no-such-model"],
         "huggingface-cli download nobody-h16b/no-such-model --local-dir"),
    ]
    for sets, expected in cases:
        argv = base + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 2, sets
        assert expected in capsys.readouterr().err
    assert not out.exists()


def test_slurm_submit_with_an_uncached_hub_model_fails_before_rendering(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["slurm", "submit", "--config", str(DEMO_CONFIG), "--output-dir", str(out),
                 "--set", "model.name_or_path=nobody-h16b/no-such-model", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "this hub model is not in the local cache" in err and "huggingface-cli download" in err
    assert not out.exists()


@pytest.mark.slow
def test_without_network_check_and_submit_say_how_to_download_the_model(tmp_path):
    """The real no-network case (not HF_HUB_OFFLINE): a hub endpoint that refuses connections.
    One request, no retries: exit 2 with the fix, where transformers retried for over a minute."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    for cmd in (["check"], ["slurm", "submit", "--dry-run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "sft_scale.cli", *cmd, "--config", str(DEMO_CONFIG),
             "--output-dir", str(tmp_path / "run"), "--set", "model.name_or_path=org-x/model-y"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "config error: model.name_or_path='org-x/model-y': this hub model is not in the " \
               "local cache" in proc.stderr
        assert "`huggingface-cli download org-x/model-y --local-dir models/model-y`" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
