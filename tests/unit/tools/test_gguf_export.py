"""GGUF export's guards, without running the converter: what the installer keeps from the sdist,
which tokenizers get the gpt-2 pre-tokenizer, and the errors that say what to do."""

import io
import json
import tarfile

import pytest

from sft_scale.cli import main
from sft_scale.errors import ConfigError
from sft_scale.tools import gguf_export
from sft_scale.tools.gguf_export import (
    _VENDOR,
    _wanted,
    convert,
    gpt2_pre_tokenizer,
    install_converter,
)


def member(name, kind=tarfile.REGTYPE):
    m = tarfile.TarInfo(name)
    m.type = kind
    return m


def test_installer_keeps_only_the_converter_files_of_the_vendored_llama_cpp():
    keep = ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE",
            "conversion/llama.py", "gguf-py/gguf/gguf_reader.py"]
    drop = ["ggml/src/ggml.c", "convert_llama_ggml_to_gguf.py", "conversion/../../evil.py"]
    assert all(_wanted(member(_VENDOR + k)) for k in keep)
    assert not any(_wanted(member(_VENDOR + d)) for d in drop)
    assert not _wanted(member(_VENDOR + "conversion/link.py", tarfile.SYMTYPE))
    assert not _wanted(member("llama_cpp/llama.py"))


def test_installer_refuses_an_sdist_that_is_not_the_pinned_one(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = b"print('not llama.cpp')\n"
        m = member(_VENDOR + "convert_hf_to_gguf.py")
        m.size = len(data)
        tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ConfigError, match="sha256 .* expected"):
        install_converter(tmp_path / "conv", sdist)
    assert not (tmp_path / "conv").exists()


def write_tokenizer(folder, pre, normalizer=None):
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(
        {"normalizer": normalizer, "pre_tokenizer": pre}))
    return folder


def test_only_an_exact_gpt2_split_is_given_the_gpt2_pre_tokenizer(tmp_path):
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": True}
    assert gpt2_pre_tokenizer(write_tokenizer(tmp_path / "a", gpt2))
    assert not gpt2_pre_tokenizer(write_tokenizer(tmp_path / "b", {**gpt2,
                                                                   "add_prefix_space": True}))
    assert not gpt2_pre_tokenizer(write_tokenizer(tmp_path / "c", {**gpt2, "use_regex": False}))
    assert not gpt2_pre_tokenizer(write_tokenizer(tmp_path / "d", gpt2, {"type": "NFC"}))
    # Llama-3 / Qwen: a Sequence with their own regex split first.
    assert not gpt2_pre_tokenizer(write_tokenizer(tmp_path / "e", {"type": "Sequence",
                                                                   "pretokenizers": [gpt2]}))


def test_missing_converter_names_the_one_command_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SFT_SCALE_GGUF_CONVERTER", str(tmp_path / "none"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(["gguf", "convert", "--model", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert "converter is not installed" in err and "sft-scale gguf setup" in err


def test_an_adapter_folder_is_refused_with_the_merge_route(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no config.json.*sft-scale merge --adapter"):
        convert(tmp_path, tmp_path / "x.gguf")


def test_unknown_output_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected one of f32, f16, q8_0"):
        convert(tmp_path, tmp_path / "x.gguf", "q4_k_m")
    assert gguf_export.OUTTYPES == ("f32", "f16", "q8_0")
