"""Checkpoint writing under failure, in-process with a real (single-process) Accelerator."""

import dataclasses
import errno

import pytest

from sft_scale.config import load_config
from sft_scale.preflight.resolve import in_job_layout, resolve
from sft_scale.training import checkpoint as ckpt
from sft_scale.training.distributed import make_accelerator
from sft_scale.training.loop import LoopState, build_optimizer, build_scheduler
from sft_scale.training.model import load_model
from tests.helpers import DEMO_CONFIG


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(DEMO_CONFIG)
    acc = make_accelerator(cfg)
    model = load_model(cfg, resolve(cfg, in_job_layout(cfg)))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    model, opt = acc.prepare(model, opt)
    ckpt.keep_trainable_only(acc, model)
    return cfg, acc, model, opt, sched


def test_a_failing_writer_leaves_the_previous_checkpoint_intact(setup, tmp_path, monkeypatch):
    cfg, acc, model, opt, sched = setup
    ident = ckpt.run_identity(cfg, 1, None)
    state = LoopState(step=2, tokens_seen=10, slots_seen=12, losses=[2.0, 1.0])
    first = ckpt.save_checkpoint(acc, sched, state, ident, tmp_path, keep_last=2)
    assert ckpt.verify(first) is None
    # only trainable (LoRA) weights are in the checkpoint, not the frozen base
    from safetensors.torch import load_file
    keys = load_file(str(first / "model.safetensors")).keys()
    assert keys and all("lora_" in k for k in keys)

    real_save = acc.save_state

    def full_disk(path, **kw):
        real_save(path, **kw)  # some files are written ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(acc, "save_state", full_disk)
    state.step = 4
    with pytest.raises(ckpt.CheckpointError,
                       match=r"could not write the checkpoint for step 4 .*No "
                             r"space left on device.*step-00000002\) is intact"):
        ckpt.save_checkpoint(acc, sched, state, ident, tmp_path, keep_last=2)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert ckpt.verify(first) is None
    monkeypatch.undo()

    # and it still loads
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    found = ckpt.find_resume_checkpoint(cfg, tmp_path)
    assert found == first
    fresh = LoopState()
    ckpt.load_checkpoint(acc, found, sched, fresh, ident)
    assert (fresh.step, fresh.tokens_seen, fresh.losses) == (2, 10, [2.0, 1.0])


def test_verify_reports_why(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    assert "no COMPLETE marker" in ckpt.verify(tmp_path / "step-00000001")


def test_explicit_resume_path_that_is_broken_is_an_error(tmp_path):
    cfg = load_config(DEMO_CONFIG, [f"checkpoint.resume={tmp_path}"])
    with pytest.raises(ckpt.CheckpointError, match="cannot resume from it: incomplete"):
        ckpt.find_resume_checkpoint(cfg, tmp_path)


def test_identity_checks():
    cfg = load_config(DEMO_CONFIG)
    a = ckpt.run_identity(cfg, 2, 2)
    b = dict(a, world_size=4, global_batch_size=a["global_batch_size"] * 2)
    with pytest.raises(Exception, match="written by 2 processes .* this run has 4") as e:
        ckpt.check_compatible(a, b, "x")
    # The refusal names both ways on: the setting, and the manual DeepSpeed converter.
    assert "resume_world_size_change=convert" in str(e.value)
    assert "python -m deepspeed.checkpoint.ds_to_universal --input_folder x/pytorch_model" \
        in str(e.value)
    with pytest.raises(Exception, match="global batch"):  # converting keeps the global batch
        ckpt.check_compatible(a, b, "x", on_world_change="convert")
    same_batch = dict(b, global_batch_size=a["global_batch_size"])
    assert ckpt.check_compatible(a, same_batch, "x", on_world_change="convert") is True
    assert ckpt.check_compatible(a, a, "x", on_world_change="convert") is False
    with pytest.raises(Exception, match="written by 2 processes"):  # DeepSpeed -> DDP
        ckpt.check_compatible(a, dict(same_batch, zero_stage=None), "x", on_world_change="convert")
    ddp_a, ddp_b = dict(a, zero_stage=None), dict(b, zero_stage=None)
    with pytest.raises(Exception, match="global batch"):
        ckpt.check_compatible(ddp_a, ddp_b, "x")
    ckpt.check_compatible(ddp_a, dict(ddp_b, global_batch_size=a["global_batch_size"]), "x")
    # changing where it writes or how long it runs is not a different run
    cfg2 = load_config(DEMO_CONFIG, ["training.max_steps=500", "output.dir=/elsewhere"])
    assert ckpt.run_identity(cfg2, 2, 2)["config_hash"] == a["config_hash"]
