"""`sft-scale merge` (sft_scale/tools/merge.py) in-process on the builtin tiny Llama and a real PEFT
adapter made for it here: what it refuses before loading weights, how it reads adapters and
runs, the shift report against a probe, and a verified merge. The CLI, 8-bit training and
sharding: tests/e2e/test_merge_export_e2e.py; --out overlapping inputs: test_outputs_safety.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sft_scale.config import load_config
from sft_scale.errors import ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.tools import merge as m
from tests.helpers import DEMO_CONFIG


@pytest.fixture(scope="module")
def base() -> str:
    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture(scope="module")
def run(tmp_path_factory, base):
    """A run folder as training leaves it: adapter/ (LoRA B non-zero, so merging changes the
    logits), manifest.json with the training config, summary.json."""
    folder = tmp_path_factory.mktemp("merge") / "run"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(folder / "adapter")
    cfg = load_config(DEMO_CONFIG)
    (folder / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "status":
                                                      "completed"}))
    (folder / "summary.json").write_text(json.dumps({"final_loss": 0.25, "steps": 80}))
    return folder


def test_an_adapter_folder_is_read_and_a_plain_folder_refused(run, tmp_path):
    acfg = m.read_adapter(run / "adapter")
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 4
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a PEFT adapter folder, missing "
                                          r"\['adapter_model.safetensors'\]. Point --adapter"):
        m.read_adapter(tmp_path)


def test_the_run_folder_and_training_config_of_an_adapter(run, tmp_path, caplog):
    assert m.run_dir_of(run / "adapter") == run.resolve()
    assert m.training_config(run / "adapter").training.max_steps == 80
    loose = tmp_path / "adapter"
    loose.mkdir()
    assert m.run_dir_of(loose) is None and m.training_config(loose) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"training": {"lr": 1}}}))
    assert m.training_config(loose) is None  # unreadable: merged without it, and said so
    assert "cannot read the training config" in caplog.text


def test_quantization_names():
    cfg = load_config(DEMO_CONFIG)
    assert m.quantization_name(None) is None and m.quantization_name(cfg) is None
    cfg = load_config(DEMO_CONFIG, ["quantization.load_in_8bit=true"])
    assert m.quantization_name(cfg) == "8-bit (LLM.int8)"
    cfg = load_config(DEMO_CONFIG, ["quantization.load_in_4bit=true"])
    assert m.quantization_name(cfg) == "4-bit nf4"


def test_disk_space_is_checked_against_the_real_free_space(tmp_path, base):
    n = m.param_count(base)
    assert n == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    m.check_disk(tmp_path / "out", n * 4)  # a tiny model fits anywhere
    with pytest.raises(ConfigError, match=r"not enough disk for the merged model in .*: it needs "
                                          r"about 931322574\.62 GiB"):
        m.check_disk(tmp_path / "deeper" / "out", 10 ** 18)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_shard_size": "huge"}, "--max-shard-size 'huge': expected a size such as 5GB"),
    ({"dequantize": True}, r"--dequantize: .*manifest.json says the run trained on an "
                           r"unquantized base; merge without --dequantize"),
])
def test_refusals_before_any_weights_load_write_nothing(run, tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        m.merge(str(run / "adapter"), str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_classification_adapter_without_its_head_is_refused(run, tmp_path):
    adapter = tmp_path / "cls"
    adapter.mkdir()
    acfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(acfg, task_type="SEQ_CLS")))
    save_file(load_file(str(run / "adapter" / "adapter_model.safetensors")),
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="without its head .*Export it again from the run"):
        m.merge(str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def probe_of(model, folder, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits": logits},
              str(folder / "probe.safetensors"))
    return folder / "probe.safetensors"


def test_the_shift_against_training_is_measured_on_the_probe(tmp_path, base):
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    probe = probe_of(model, tmp_path, ids)
    same = m.probe_shift(model, probe)
    assert same == {"max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0,
                    "greedy_agreement": 1.0, "positions": 10, "warn": False}
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # every preference reversed
    moved = m.probe_shift(model, probe)
    assert moved["warn"] and moved["greedy_agreement"] < m.SHIFT_WARN_AGREEMENT
    assert moved["max_abs_logit_diff"] > m.SHIFT_WARN_MAX_LOGIT
    assert m.probe_shift(model, tmp_path / "missing.safetensors") is None
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "logits": torch.zeros(2, 3)}, str(probe))  # a classifier's probe
    assert m.probe_shift(model, probe) is None


def test_rope_theta_is_written_at_the_top_level_too(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"rope_parameters": {"rope_theta": 500000.0}}))
    m._add_rope_theta(config)
    assert json.loads(config.read_text())["rope_theta"] == 500000.0
    config.write_text(json.dumps({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}}))
    m._add_rope_theta(config)  # an existing top-level value is left alone
    assert json.loads(config.read_text())["rope_theta"] == 1.0


def test_a_merge_is_verified_reloadable_and_described(run, tmp_path, base):
    out = tmp_path / "merged"
    report = m.merge(str(run / "adapter"), str(out))
    assert report["max_abs_logit_diff"] <= m.TOLERANCE["fp32"]
    assert report["greedy_generations_equal"] and report["tokenizer_matches_base"]
    assert report["trained_on"] == "unquantized" and report["merged_into"] == "original weights"
    assert report["shift_vs_training"] is None  # the run has no probe.safetensors
    assert json.loads((out / "merge_report.json").read_text()) == report
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 10000.0
    card = (out / "README.md").read_text()
    assert "- final training loss: 0.25" in card and "- steps: 80" in card
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():  # the adapter really changed the model
        assert not torch.allclose(merged(input_ids=ids).logits, plain(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite"):
        m.merge(str(run / "adapter"), str(out))
