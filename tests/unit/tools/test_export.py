"""`sft-scale export` (sft_scale/tools/export.py) in-process from real checkpoints, written by
checkpoint.save_checkpoint on a real single-process Accelerator: the adapter of the newest
complete checkpoint (or the one asked for) equals what the model held then, and unusable runs or
checkpoints are refused. DeepSpeed ZeRO checkpoints and full fine-tunes through the CLI:
tests/e2e/test_merge_export_e2e.py; tampered checkpoints: tests/e2e/test_safety_e2e.py."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from sft_scale.config import load_config
from sft_scale.errors import ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.preflight.resolve import in_job_layout, resolve
from sft_scale.tools import export as ex
from sft_scale.training import checkpoint as ckpt
from sft_scale.training.distributed import make_accelerator
from sft_scale.training.loop import LoopState, build_optimizer, build_scheduler
from sft_scale.training.model import load_model
from tests.helpers import DEMO_CONFIG


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with checkpoints at steps 2 and 4 holding different LoRA weights, and what
    the model's adapter was at each."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(DEMO_CONFIG, output_dir=str(out))
    acc = make_accelerator(cfg)
    model = load_model(cfg, resolve(cfg, in_job_layout(cfg)))
    sched = build_scheduler(build_optimizer(model, cfg), cfg, 10)
    model = acc.prepare(model)
    ckpt.keep_trainable_only(acc, model)
    identity = ckpt.run_identity(cfg, 1, None)
    adapters = {}
    torch.manual_seed(0)
    for step in (2, 4):
        with torch.no_grad():  # as if trained: every LoRA matrix moved
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        adapters[step] = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        ckpt.save_checkpoint(acc, sched, LoopState(step=step, losses=[1.0] * step), identity,
                             out, keep_last=2)
    (out / "manifest.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return out, adapters


def exported(folder) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_newest_checkpoint_exports_the_adapter_the_model_held(run, tmp_path):
    out, adapters = run
    target = ex.export(str(out), str(tmp_path / "adapter"))
    assert same(exported(target), adapters[4])
    acfg = json.loads((target / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == resolve_model_path("builtin:tiny-llama")
    assert acfg["r"] == 16 and (target / "tokenizer.json").is_file()
    info = json.loads((target / "export_info.json").read_text())
    assert info["kind"] == "adapter" and info["checkpoint"].endswith("step-00000004")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing left beside it


def test_a_chosen_checkpoint_exports_its_own_weights(run, tmp_path):
    out, adapters = run
    chosen = out / "checkpoints" / "step-00000002"
    assert not same(adapters[2], adapters[4])
    assert same(exported(ex.export(str(out), str(tmp_path / "a"), str(chosen))), adapters[2])


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(run, tmp_path):
    out, adapters = run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "manifest.json").write_text((out / "manifest.json").read_text())
    for step in ("step-00000002", "step-00000004"):
        src, dst = out / "checkpoints" / step, copy / "checkpoints" / step
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    weights = copy / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated by a dying disk
    assert same(exported(ex.export(str(copy), str(tmp_path / "a"))), adapters[2])
    with pytest.raises(ConfigError, match=r"--checkpoint .*step-00000004: not a usable "
                                          r"checkpoint: .*model.safetensors"):
        ex.export(str(copy), str(tmp_path / "b"), str(weights.parent))
    assert not (tmp_path / "b").exists()


def test_a_folder_that_is_no_run_or_has_no_checkpoint_is_refused(run, tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json; is this an sft_scale output dir"):
        ex.export(str(tmp_path), str(tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text((run[0] / "manifest.json").read_text())
    with pytest.raises(ConfigError, match=r"no complete checkpoint in .*empty/checkpoints"):
        ex.export(str(empty), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_checkpoints_weights_come_back_as_fp32_without_the_ddp_prefix(tmp_path):
    save_file({"module.layer.weight": torch.ones(2, 2, dtype=torch.bfloat16),
               "head.bias": torch.zeros(3, dtype=torch.float16)},
              str(tmp_path / "model.safetensors"))
    sd = ex.checkpoint_state_dict(tmp_path)
    assert sorted(sd) == ["head.bias", "layer.weight"]
    assert all(v.dtype == torch.float32 for v in sd.values())
