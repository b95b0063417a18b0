import pytest

from sft_scale.config import Config, ConfigError, check_warmup, config_from_dict, load_config


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
    ("training:\n  max_steps: three\n",
     r"c.yaml:4: 'training.max_steps' expects int, got str 'three'"),
    ("training:\n  max_steps: 2.5\n", r"'training.max_steps' expects int, got float"),
    ("lora:\n  enabled: 'yes'\n", r"'lora.enabled' expects bool"),
    ("training:\n  lr_scheduler: cosin\n",
     r"expects one of 'linear', 'cosine', 'constant', got 'cosin'; did you mean 'cosine'"),
    ("lora:\n  target_modules: [q_proj, 3]\n",
     r"'lora.target_modules' expects str or a list of str, got list"),
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
    ("training.max_step=6", r"^--set training.max_step=6: unknown key 'training.max_step'; "
                            r"did you mean 'training.max_steps'"),
    ("data.datasets=[{path: x, wieght: 2}]",
     r"^--set data.datasets=\[\{path: x, wieght: 2\}\]: unknown key 'data.datasets\[0\].wieght'; "
     r"did you mean 'data.datasets\[0\].weight'"),
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
        load_config(write(tmp_path, BASE + "quantization:\n  load_in_8bit: true\n"
                                           "lora:\n  enabled: false\n"))


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
    from tests.helpers import ROOT
    cfg = load_config(ROOT / "examples" / name)
    assert cfg.data.train_files or cfg.data.datasets


# ----------------------------------------------------------------- hostile or broken YAML

def bomb(levels: int) -> str:
    """The classic 'billion laughs': each level lists the previous one nine times."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    text = bomb(9)  # ~400 bytes, 9^9 values once expanded: this hung for minutes
    with pytest.raises(ConfigError, match=r"c.yaml: the YAML expands to more than 100,000 values "
                                          r"\(aliases '\*name' copy"):
        load_config(write(tmp_path, text))


def test_self_referencing_alias_is_a_config_error_with_its_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:3: an alias refers to the anchor that "
                                          r"contains it"):
        load_config(write(tmp_path, BASE + "training: &t\n  seed: [*t]\n"))
    with pytest.raises(ConfigError, match="refers to the anchor"):
        load_config(write(tmp_path, BASE), ["training.seed=&a [*a]"])


def test_deep_nesting_is_a_config_error(tmp_path):
    for depth in (100, 5000):  # 5000 would overflow a recursive YAML composer
        with pytest.raises(ConfigError, match="nests deeper than 64 levels|exceeded maximum "
                                              "nesting depth"):
            load_config(write(tmp_path, BASE + "x: " + "[" * depth + "]" * depth + "\n"))


def test_anchors_aliases_and_merge_keys_still_work(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train_files: &files [train.jsonl]\n"
                                      "  eval_files: *files\n"
                                      "training:\n  <<: {max_steps: 3}\n  seed: 7\n"))
    assert cfg.data.eval_files == cfg.data.train_files
    assert (cfg.training.max_steps, cfg.training.seed) == (3, 7)


def test_duplicate_keys_and_sections_are_refused_naming_both_lines(tmp_path):
    p = write(tmp_path, BASE + "training:\n  max_steps: 3\n  max_steps: 4\n"
                               "lora:\n  r: 4\ntraining:\n  seed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "2 problems in" in msg
    assert f"{p}:5: 'training.max_steps' is given twice, at lines 4 and 5; YAML would silently " \
           "keep only the last" in msg
    assert f"{p}:8: 'training' is given twice, at lines 3 and 8" in msg


def test_non_utf8_config_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(BASE.encode() + b"training:\n  # caf\xe9\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: not UTF-8 text \(byte 0xe9 at offset "
                                          r"\d+\); save the config as UTF-8"):
        load_config(p)


def test_every_problem_of_a_file_is_reported_at_once_in_file_order(tmp_path):
    p = write(tmp_path, BASE + "training:\n  learnig_rate: 0.1\n  max_steps: three\n"
                               "  adam_beta1: 2.0\nlora:\n  alpha: -16\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["training.seed=-1"])
    lines = str(e.value).splitlines()
    assert lines[0] == f"5 problems in {p}:"
    assert lines[1].startswith(f"  {p}:4: unknown key 'training.learnig_rate'; did you mean "
                               "'training.learning_rate'?")
    assert lines[2] == f"  {p}:5: 'training.max_steps' expects int, got str 'three'"
    assert lines[3] == f"  {p}:6: 'training.adam_beta1' must be in [0, 1), e.g. 0.9"
    assert lines[4].startswith(f"  {p}:8: 'lora.alpha' must be > 0")
    assert lines[5] == "  --set training.seed=-1: 'training.seed' must be in [0, 2^32)"


@pytest.mark.parametrize("text, expected", [
    ("training:\n  learning_rate: inf\n",
     r"c.yaml:4: 'training.learning_rate' must be a finite number, got 'inf'"),
    ("training:\n  learning_rate: .nan\n",
     r"'training.learning_rate' must be a finite number, got nan"),
    ("training:\n  num_epochs: .inf\n", r"'training.num_epochs' must be a finite number, got inf"),
    ("training:\n  num_epochs: 1e308\n", r"'training.num_epochs' must be at most 1e\+06"),
    ("training:\n  adam_beta1: 2.0\n", r"'training.adam_beta1' must be in \[0, 1\)"),
    ("training:\n  adam_beta2: -0.5\n", r"'training.adam_beta2' must be in \[0, 1\)"),
    ("training:\n  seed: -1\n", r"c.yaml:4: 'training.seed' must be in \[0, 2\^32\)"),
    ("training:\n  seed: 4294967296\n", r"'training.seed' must be in \[0, 2\^32\)"),
    ("lora:\n  alpha: -16\n", r"'lora.alpha' must be > 0 \(the adapter's scale is alpha / r\)"),
    ("lora:\n  r: 0\n", r"'lora.r' must be >= 1"),
    ("lora:\n  target_modules: []\n", r"'lora.target_modules' must name at least one module"),
    ("training:\n  max_steps: 10\n  warmup_steps: 500\n",
     r"c.yaml:5: 'training.warmup_steps' \(500\) is far beyond training.max_steps \(10\): the "
     r"learning rate would stay near 0"),
    ("output:\n  dir: ''\n", r"c.yaml:4: 'output.dir' must name a folder; an empty one would "
                            r"write the run into the current directory"),
    ("  eval_fraction: .inf\n", r"c.yaml:3: 'data.eval_fraction' must be a finite number"),
])
def test_values_out_of_range_are_refused(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, BASE + text))


def test_empty_output_dir_from_the_command_line_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="^--output-dir '': 'output.dir' must name a folder"):
        load_config(write(tmp_path, BASE), output_dir="")


def test_warmup_far_beyond_the_steps_derived_from_the_data_is_refused(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "training:\n  warmup_steps: 50\n"))
    assert check_warmup(cfg, 50) is None
    # Longer than the run (a short smoke test of a real recipe): a loud warning, not a refusal.
    assert "peaks at 98% of it" in check_warmup(cfg, 49)
    with pytest.raises(ConfigError, match=r"'training.warmup_steps' \(50\) is far beyond the "
                                          r"run's 4 steps"):
        check_warmup(cfg, 4)


def test_a_saved_config_is_checked_the_same_way():
    d = Config().to_dict()
    d["data"]["train_files"] = ["x.jsonl"]
    d["training"]["learning_rate"] = float("inf")
    d["lora"]["alpha"] = -1
    with pytest.raises(ConfigError, match=r"2 problems in manifest.json:\n  manifest.json: "
                                          r"'training.learning_rate' must be a finite"):
        config_from_dict(d, "manifest.json")
