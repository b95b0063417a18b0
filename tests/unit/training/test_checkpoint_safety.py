"""Checkpoint files are never unpickled beyond tensors and plain data; damaged or tampered
checkpoints end in one clear line; a resume with a changed config is applied exactly or refused."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from sft_scale.config import load_config
from sft_scale.errors import CheckpointError, ConfigError
from sft_scale.training import checkpoint as ckpt
from tests.helpers import DEMO_CONFIG


class Payload:
    """What an attacker puts in a checkpoint file: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_complete(folder, step=1):
    """Regenerate the COMPLETE marker, as an attacker who edits files would."""
    (folder / ckpt.MARKER).write_text(json.dumps({"step": step, "files": ckpt._inventory(folder)}))


def rng_state():
    import random
    return {"step": 0, "random_state": random.getstate(),
            "numpy_random_seed": np.random.get_state(),
            "torch_manual_seed": torch.get_rng_state()}


def plain_checkpoint(folder, step=1):
    """A checkpoint folder with the files a single-process run writes (safe ones)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    torch.save(rng_state(), folder / "random_states_0.pkl")
    (folder / ckpt.STATE).write_text(json.dumps({"step": step}))
    write_complete(folder, step)
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    assert ckpt.verify(plain_checkpoint(tmp_path / "step-00000001")) is None


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_pickle_payload_with_a_regenerated_marker_is_refused_and_never_runs(tmp_path, name):
    c = plain_checkpoint(tmp_path / "step-00000001")
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, c / name)
    write_complete(c)
    problem = ckpt.verify(c)
    assert problem and name in problem and "system" in problem and "could run code" in problem
    assert not marker.exists()


def test_auto_resume_falls_back_past_a_tampered_checkpoint_and_explicit_resume_refuses(tmp_path):
    good = plain_checkpoint(tmp_path / "checkpoints" / "step-00000002", 2)
    bad = plain_checkpoint(tmp_path / "checkpoints" / "step-00000004", 4)
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, bad / "optimizer.bin")
    write_complete(bad, 4)
    cfg = load_config(DEMO_CONFIG)
    assert ckpt.find_resume_checkpoint(cfg, tmp_path) == good
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                  resume=str(bad)))
    with pytest.raises(CheckpointError, match="cannot resume from it: optimizer.bin references"):
        ckpt.find_resume_checkpoint(cfg, tmp_path)
    assert not marker.exists()


def test_deepspeeds_own_loaders_run_weights_only_inside_weights_only_loads(tmp_path):
    """DeepSpeed's engine and zero_to_fp32 call torch.load(weights_only=False): forced safe."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = tmp_path / "pwned"
    tag = tmp_path / "pytorch_model"
    tag.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Payload(marker)}, tag / name)
    with pytest.raises(CheckpointError, match="refused to load a checkpoint file.*could run code"):
        with ckpt.weights_only_loads(tmp_path):
            TorchCheckpointEngine().load(str(tag / "mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError, match="refused to load"):
        with ckpt.weights_only_loads(tmp_path):
            get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="pytorch_model")
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards
    # plain tensors and DeepSpeed's own state objects still load
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    torch.save({"w": torch.ones(1), "scaler": LossScaler(1.0)}, tag / "ok.pt")
    with ckpt.weights_only_loads(tmp_path):
        assert TorchCheckpointEngine().load(str(tag / "ok.pt"))["scaler"].cur_scale == 1.0


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_a_corrupt_rng_file_makes_the_checkpoint_unusable(tmp_path, content):
    c = plain_checkpoint(tmp_path / "step-00000001")
    (c / "random_states_0.pkl").write_bytes(content)
    write_complete(c)
    assert "random_states_0.pkl is not a readable PyTorch file" in ckpt.verify(c)


def test_an_rng_file_without_rng_states_is_refused(tmp_path):
    c = plain_checkpoint(tmp_path / "step-00000001")
    torch.save({"step": 0}, c / "random_states_0.pkl")
    write_complete(c)
    assert "does not hold the RNG states" in ckpt.verify(c)


@pytest.mark.parametrize("marker", ["[]", '"x"', "{}", '{"files": []}', '{"files": {"a": {}}}',
                                    '{"files": {"a": {"size": "1"}}}', "not json", "\xff"])
def test_hand_made_or_damaged_markers_are_reported_not_raised(tmp_path, marker):
    c = plain_checkpoint(tmp_path / "step-00000001")
    (c / ckpt.MARKER).write_text(marker, encoding="latin-1")
    problem = ckpt.verify(c)
    assert "COMPLETE marker" in problem


def test_a_non_json_trainer_state_is_one_clear_error(tmp_path):
    c = plain_checkpoint(tmp_path / "step-00000001")
    (c / ckpt.STATE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: unreadable trainer state"):
        ckpt.read_state(c)
    (c / ckpt.STATE).write_text('{"step": "3"}')
    with pytest.raises(CheckpointError, match="step is '3'"):
        ckpt.read_state(c)


def test_resume_from_a_path_that_does_not_exist_is_a_config_error(tmp_path):
    cfg = load_config(DEMO_CONFIG, [f"checkpoint.resume={tmp_path}/nonexistent"])
    with pytest.raises(ConfigError, match="no such folder") as e:
        ckpt.find_resume_checkpoint(cfg, tmp_path)
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------- resume policy


def identity(*sets, fingerprint="d1"):
    cfg = load_config(DEMO_CONFIG, list(sets))
    return dict(ckpt.run_identity(cfg, 1, None), data_fingerprint=fingerprint)


@pytest.mark.parametrize("change,key", [
    ("training.learning_rate=0.001", "training.learning_rate"),
    ("lora.alpha=8", "lora.alpha"),
    ("training.weight_decay=0.1", "training.weight_decay"),
    ("training.seed=1", "training.seed"),
    ("data.max_seq_len=32", "data.max_seq_len"),
])
def test_a_change_a_resume_cannot_apply_exactly_is_refused_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + " .* -> ") as e:
        ckpt.check_compatible(identity(), identity(change), "ckpt")
    assert "checkpoint.resume=never" in str(e.value)


def test_changes_a_resume_applies_exactly_are_allowed():
    saved = identity()
    ckpt.check_compatible(saved, identity("training.max_steps=500", "output.dir=/elsewhere",
                                          "checkpoint.every_steps=3", "logging.plot=false",
                                          "data.num_workers=2"), "ckpt")
    # the same global batch split differently trains the same examples per step
    ckpt.check_compatible(saved, identity("training.micro_batch_size=8",
                                          "training.gradient_accumulation_steps=2"), "ckpt")
    with pytest.raises(ConfigError, match="global batch of 16"):
        ckpt.check_compatible(saved, identity("training.micro_batch_size=8"), "ckpt")


def test_changed_training_data_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="training data differs.*allow_data_change=true"):
        ckpt.check_compatible(identity(), identity(fingerprint="d2"), "ckpt")
    ckpt.check_compatible(identity(), identity("checkpoint.allow_data_change=true",
                                               "data.max_seq_len=32", fingerprint="d2"),
                          "ckpt", allow_data=True)


def test_a_checkpoint_step_beyond_the_total_steps_is_refused(tmp_path):
    c = plain_checkpoint(tmp_path / "step-00000999", 999)
    ident = identity()
    (c / ckpt.STATE).write_text(json.dumps({"step": 999, "tokens_seen": 0, "slots_seen": 0,
                                            "losses": [], "scheduler": {}, "identity": ident}))
    with pytest.raises(ConfigError, match="at step 999, beyond this run's 80 total steps"):
        ckpt.check_resume(c, ident, 80, False)
    assert ckpt.check_resume(c, ident, 999, False)["step"] == 999


def test_the_data_fingerprint_follows_the_tokens_and_their_order():
    from datasets import Dataset
    a = Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [-100]]})
    b = Dataset.from_dict({"input_ids": [[1, 2], [4]], "labels": [[1, 2], [-100]]})
    c = Dataset.from_dict({"input_ids": [[1], [2, 3]], "labels": [[1], [2, -100]]})
    fps = {ckpt.data_fingerprint(d) for d in (a, b, c)}
    assert len(fps) == 3
    assert ckpt.data_fingerprint(a) == ckpt.data_fingerprint(
        Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [-100]]}))
    assert ckpt.data_fingerprint(a.select([1, 0])) != ckpt.data_fingerprint(a)


def test_the_data_fingerprint_does_not_depend_on_arrow_chunking():
    import pyarrow as pa
    from datasets import Dataset
    one = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]]})
    chunked = Dataset(pa.Table.from_batches(one.data.table.to_batches(max_chunksize=1)))
    assert chunked.data.table.column("input_ids").num_chunks == 3
    assert ckpt.data_fingerprint(chunked) == ckpt.data_fingerprint(one)


def test_a_missing_checkpoint_is_said_to_not_exist(tmp_path):
    assert ckpt.verify(tmp_path / "nonexistent") == "does not exist"
