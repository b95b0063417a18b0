"""The run directory (training/rundir.py), written for real into tmp folders: which runs count
as finished, the records a run starts with and how a resume trims them, the manifest, the data
trace, and the adapter and probe a real (single-process) Accelerator saves. Umask, run lock,
writability and write failures: tests/unit/test_outputs_safety.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sft_scale.config import load_config
from sft_scale.data import collate
from sft_scale.errors import ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import in_job_layout, resolve
from sft_scale.training import rundir as outputs
from sft_scale.training.distributed import make_accelerator
from sft_scale.training.model import load_model, load_tokenizer
from sft_scale.training.serving import for_training
from tests.helpers import DEMO_CONFIG, read_jsonl


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO_CONFIG)


def test_a_run_is_finished_only_when_completed_and_its_weights_are_there(tmp_path):
    assert outputs.finished_run(tmp_path) is None  # no manifest
    outputs.update_manifest(tmp_path, status="running")
    (tmp_path / "adapter").mkdir()
    assert outputs.finished_run(tmp_path) is None  # still running (or killed)
    outputs.update_manifest(tmp_path, status="completed")
    assert outputs.finished_run(tmp_path)["status"] == "completed"
    (tmp_path / "adapter").rename(tmp_path / "model")  # a full fine-tune's output
    assert outputs.finished_run(tmp_path) is not None
    (tmp_path / "model").rmdir()  # completed, but its weights are gone
    assert outputs.finished_run(tmp_path) is None


def test_refusing_a_finished_run_names_the_dir_and_both_ways_out(tmp_path):
    with pytest.raises(ConfigError, match=rf"output dir {tmp_path} already holds a finished run"
                                          r".*--output-dir.*output\.overwrite=true"):
        outputs.refuse_finished(tmp_path)


def test_a_new_run_starts_with_its_resolved_config_and_empty_metrics(tmp_path, cfg):
    out = tmp_path / "new" / "run"
    resolved = {"global_batch_size": 16, "zero_stage": None}
    outputs.start_run_dir(out, cfg, resolved, None, resume_step=None)
    written = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert written["resolved"] == resolved
    assert written["training"]["max_steps"] == cfg.training.max_steps
    assert (out / "metrics.jsonl").read_text() == ""
    assert not (out / "deepspeed.resolved.json").exists()  # no DeepSpeed, no file
    ds = {"zero_optimization": {"stage": 2}, "train_batch_size": 16}
    outputs.start_run_dir(out, cfg, resolved, ds, resume_step=None)
    assert json.loads((out / "deepspeed.resolved.json").read_text()) == ds


def test_a_resume_keeps_the_metrics_up_to_its_checkpoint_and_drops_the_rest(tmp_path, cfg):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
             {"step": 3, "loss": 2.0}, {"step": 4, "eval_loss": 2.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    outputs.start_run_dir(tmp_path, cfg, {}, None, resume_step=2)
    assert read_jsonl(tmp_path / "metrics.jsonl") == lines[:3]  # steps 3-4 are trained again
    # a resume into a folder without metrics (deleted by hand) starts them afresh
    (tmp_path / "metrics.jsonl").unlink()
    outputs.start_run_dir(tmp_path, cfg, {}, None, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_the_manifest_merges_fields_and_the_summary_is_written_whole(tmp_path):
    assert outputs.read_manifest(tmp_path) is None
    outputs.update_manifest(tmp_path, status="running", attempts=[{"ended": "running"}])
    m = outputs.update_manifest(tmp_path, status="completed")
    assert m == outputs.read_manifest(tmp_path) == {"status": "completed",
                                                    "attempts": [{"ended": "running"}]}
    outputs.finish_run_dir(tmp_path, {"steps": 12, "final_loss": 0.5})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 12, "final_loss": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "summary.json"]


def test_the_data_trace_records_each_steps_examples_by_their_source(tmp_path):
    dataset = [{"_source": f"train.jsonl:{i + 1}"} for i in range(6)]
    trace = outputs.sample_tracer(tmp_path, 1, dataset)
    trace(1, [[0, 3], [5]])
    trace(2, [[2]])
    assert read_jsonl(tmp_path / "data_trace" / "rank1.jsonl") == [
        {"step": 1, "examples": [["train.jsonl:1", "train.jsonl:4"], ["train.jsonl:6"]]},
        {"step": 2, "examples": [["train.jsonl:3"]]}]
    outputs.sample_tracer(tmp_path, 1, dataset)  # a new attempt starts its trace afresh
    assert (tmp_path / "data_trace" / "rank1.jsonl").read_text() == ""


@pytest.fixture(scope="module")
def trained(cfg):
    """The demo's LoRA model on a real single-process Accelerator, with the serving parts."""
    acc = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    model = acc.prepare(load_model(cfg, resolve(cfg, in_job_layout(cfg))))
    serving = for_training(tokenizer, resolve_model_path(cfg.model.name_or_path), None, True)
    return acc, model, tokenizer, serving


def test_save_model_writes_the_adapter_and_what_serving_needs_in_one_rename(tmp_path, cfg,
                                                                            trained):
    acc, model, _, serving = trained
    target = outputs.save_model(acc, model, serving, cfg, tmp_path)
    assert target == tmp_path / "adapter"
    files = {p.name for p in target.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "generation_config.json"} <= files
    assert ("tokenizer.json" in files) == cfg.output.save_tokenizer
    saved = load_file(str(target / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter only, not the base
    best = outputs.save_model(acc, model, serving, cfg, tmp_path, name="best_adapter")
    assert best == tmp_path / "best_adapter" and (best / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "best_adapter"]  # no temps


def test_the_probe_holds_the_models_own_logits_on_the_first_examples(tmp_path, trained):
    acc, model, tokenizer, _ = trained
    rows = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]}
            for t in ("Review: the soup was awful\nSentiment:", "Hello", "unused third")]
    model.train()
    outputs.save_probe(acc, model, rows, tokenizer.pad_token_id, tmp_path)
    assert model.training  # back to training after the probe's eval-mode forward
    probe = load_file(str(tmp_path / "probe.safetensors"))
    batch = collate(rows[:2], tokenizer.pad_token_id)  # n=2 by default
    assert torch.equal(probe["input_ids"], batch["input_ids"])
    with torch.no_grad():
        want = model.eval()(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    assert torch.equal(probe["logits"], want.float())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"]
