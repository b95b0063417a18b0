"""sft_scale.optional: availability of the optional packages and the error a setting gets."""

import importlib.util

import pytest

from sft_scale import optional
from sft_scale.errors import ConfigError
from sft_scale.optional import PACKAGES, is_available, require


def test_every_optional_package_is_looked_up_by_its_import_name():
    for name in PACKAGES:
        assert is_available(name) == (importlib.util.find_spec(name) is not None)


def test_a_package_that_is_not_installed_is_not_available():
    assert is_available("torch") and not is_available("sft_scale_no_such_package")


def test_a_setting_that_needs_a_missing_package_names_itself_the_pip_command_and_the_fix(
        monkeypatch):
    monkeypatch.setattr(optional, "is_available", lambda name: False)
    with pytest.raises(ConfigError) as e:
        require("liger_kernel", "'training.loss: liger'", "'auto' or 'chunked'")
    assert str(e.value) == ("'training.loss: liger' needs the liger_kernel package, which is not "
                            "installed (pip install liger-kernel, on a CUDA machine). Use 'auto' "
                            "or 'chunked'.")
    monkeypatch.setattr(optional, "is_available", lambda name: True)
    require("liger_kernel", "'training.loss: liger'", "'auto'")  # installed: no error
