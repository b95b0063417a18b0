"""Optional packages: whether each is installed (looked up once, nothing imported), and the one
error a config setting gets when it asks for one that is missing.

Optional means: not in pyproject.toml's `dependencies`; sft_scale runs without it and uses it only
when a setting asks for it (or `auto` finds it). Every dependency is imported at the top of the
module that uses it; an optional package is imported where it is used, after the check here.
"""

from __future__ import annotations

import functools
import importlib.util

from sft_scale.errors import ConfigError

# import name -> (pip name, what the package needs beyond pip)
PACKAGES = {
    "flash_attn": ("flash-attn", ", on a CUDA machine"),
    "liger_kernel": ("liger-kernel", ", on a CUDA machine"),
    "wandb": ("wandb", ""),
}


@functools.cache
def is_available(name: str) -> bool:
    """Whether the package `name` (its import name) is installed: an optional one, or a
    dependency that a broken install may lack where transformers would name the wrong cause."""
    return importlib.util.find_spec(name) is not None


def require(name: str, setting: str, instead: str) -> None:
    """Unless the optional package `name` is installed: a ConfigError naming `setting` (e.g.
    "'training.loss: liger'"), the pip command, and what to use `instead` (e.g. "'auto'")."""
    if is_available(name):
        return
    pip, where = PACKAGES[name]
    raise ConfigError(f"{setting} needs the {name} package, which is not installed (pip install "
                      f"{pip}{where}). Use {instead}.")
