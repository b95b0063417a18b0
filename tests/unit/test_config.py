import pytest

from sft_scale.config import Config, ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    return p


BASE = "data:\n  train_files: [train.jsonl]\n"


def test_defaults_and_types(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "training:\n  learning_rate: 2e-4\n  max_steps: 3\n"))
    assert isinstance(cfg, Config)
    assert cfg.training.learning_rate == pytest.approx(2e-4)
    assert cfg.training.max_steps == 3
    assert cfg.lora.target_modules == "all-linear"
    # data paths are resolved against the config file, not the working directory
    assert cfg.data.train_files == [str((tmp_path / "train.jsonl").resolve())]


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    p = write(tmp_path, BASE + "training:\n  max_steps: 3\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:5" in msg
    assert "training.learnig_rate" in msg
    assert "did you mean 'training.learning_rate'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainig'; did you mean 'training'"):
        load_config(write(tmp_path, BASE + "trainig:\n  max_steps: 3\n"))


@pytest.mark.parametrize("text, expected", [
    ("training:\n  max_steps: three\n", r"c.yaml:4: 'training.max_steps' expects int, got str 'three'"),
    ("training:\n  max_steps: 2.5\n", r"'training.max_steps' expects int, got float"),
    ("lora:\n  enabled: 'yes'\n", r"'lora.enabled' expects bool"),
    ("training:\n  lr_scheduler: cosin\n", r"expects one of 'linear', 'cosine', 'constant', got 'cosin'; did you mean 'cosine'"),
    ("lora:\n  target_modules: [q_proj, 3]\n", r"'lora.target_modules' expects str or a list of str, got list"),
    ("training: 5\n", r"'training' must be a mapping"),
])
def test_wrong_types(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, BASE + text))


def test_overrides_and_output_dir(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["training.max_steps=6", "lora.target_modules=[q_proj, v_proj]",
                          "model.dtype=bf16"], output_dir=str(tmp_path / "out"))
    assert cfg.training.max_steps == 6
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.dtype == "bf16"
    assert cfg.output.dir == str(tmp_path / "out")


@pytest.mark.parametrize("override, expected", [
    ("training.max_step=6", r"\(or a --set override\): unknown key 'training.max_step'; did you mean 'training.max_steps'"),
    ("max_steps", r"expected KEY=VALUE"),
    ("training.max_steps=x", r"'training.max_steps' expects int"),
])
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, BASE), [override])


def test_value_checks(tmp_path):
    with pytest.raises(ConfigError, match="'training.micro_batch_size' must be >= 1"):
        load_config(write(tmp_path, BASE + "training:\n  micro_batch_size: 0\n"))
    with pytest.raises(ConfigError, match="data.train_files"):
        load_config(write(tmp_path, "training:\n  max_steps: 1\n"))
    with pytest.raises(ConfigError, match="full fine-tuning"):
        load_config(write(tmp_path, BASE + "quantization:\n  load_in_8bit: true\nlora:\n  enabled: false\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "training: [1,\n"))


def test_global_batch(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "training:\n  micro_batch_size: 4\n"
                                             "  gradient_accumulation_steps: 8\n"))
    assert cfg.global_batch_size(world_size=16) == 4 * 8 * 16


@pytest.mark.parametrize("name", ["demo.yaml", "classification.yaml",
                                  "llama3_8b_lora_8bit_zero2.yaml",
                                  "llama3.1_8b_instruct_chat.yaml",
                                  "mistral_7b_instruct_chat.yaml",
                                  "qwen2.5_7b_instruct_chat.yaml"])
def test_shipped_example_configs_are_valid(name):
    from tests.conftest import ROOT
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.data.train_files or cfg.data.datasets
