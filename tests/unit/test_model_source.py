"""Model names: builtin models, local folders and hub ids resolve, or fail in seconds with the
fix."""

from pathlib import Path

import pytest

from sft_scale.config import ConfigError
from sft_scale.model_source import resolve_model_path


def test_builtin_model_resolves_to_a_model_folder():
    assert (Path(resolve_model_path("builtin:tiny-llama")) / "model.safetensors").exists()


def test_unknown_builtin_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"model.name_or_path='builtin:tiny-lama': unknown "
                                          r"builtin model; available: builtin:tiny-llama"):
        resolve_model_path("builtin:tiny-lama")


@pytest.mark.parametrize("name", ["/nonexistent/model", "./models/llama", "~/no/such/model",
                                  "../a/b/c"])
def test_a_missing_local_folder_says_so(name):
    with pytest.raises(ConfigError, match=r"the folder .* does not exist. Point "
                                          r"model.name_or_path at a model folder"):
        resolve_model_path(name)


def test_an_existing_file_or_folder_passes_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(str(tmp_path / "config.json")) == str(tmp_path / "config.json")


def test_an_uncached_hub_id_offline_says_how_to_download_it():
    """The tests run with HF_HUB_OFFLINE=1 (conftest): the same path as a machine without
    network, where transformers would retry for over a minute (tests/unit/preflight/test_check.py
    runs the real no-network case)."""
    with pytest.raises(ConfigError) as e:
        resolve_model_path("nobody-h16b/no-such-model", key="model.tokenizer")
    msg = str(e.value)
    assert "model.tokenizer='nobody-h16b/no-such-model': this hub model is not in the local cache" \
        in msg
    assert "`huggingface-cli download nobody-h16b/no-such-model --local-dir models/no-such-model`" \
        in msg
    assert "set model.tokenizer: /path/to/models/no-such-model" in msg
    # "org/name" may also have been meant as a folder: say that none exists either.
    assert f"nor is there a folder {Path('nobody-h16b/no-such-model').absolute()}" in msg


def test_a_cached_hub_model_or_tokenizer_passes_offline(tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/SHA/FILE)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for repo, name in (("org-a/model", "config.json"), ("org-a/tok", "tokenizer_config.json")):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc123")
        (folder / "snapshots" / "abc123").mkdir(parents=True)
        (folder / "snapshots" / "abc123" / name).write_text("{}")
        assert resolve_model_path(repo) == repo
