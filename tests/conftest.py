"""Fixtures only: an isolated, offline cache for the builtin model and tiny models of real
families. The helpers tests import are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network in tests: anything that tries to reach a hub fails loudly instead of hanging.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="session", autouse=True)
def sft_scale_home(tmp_path_factory):
    """One builtin tiny-llama per test session, built by the project itself (offline)."""
    home = os.environ.get("SFT_SCALE_TEST_HOME") or str(tmp_path_factory.mktemp("sft_scale_home"))
    os.environ["SFT_SCALE_HOME"] = home
    from sft_scale.model_source import resolve_model_path
    resolve_model_path("builtin:tiny-llama")
    return Path(home)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """`family_model(name) -> Path`: a saved tiny model of a real family (tests/families.py),
    built once per test session and shared by every test that asks for it."""
    from tests.families import build_family

    root = tmp_path_factory.mktemp("families")
    return lambda name: build_family(name, root)
