"""Fixtures only: an isolated, offline cache for the builtin model and tiny models of real
families. The helpers tests import are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No network in tests: anything that tries to reach a hub fails loudly instead of hanging.
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

# Under pytest-xdist (`make test` runs two workers) the cores are split between the workers: each
# worker, and every process its tests start, gets cores // workers threads. torch's default (all
# cores per process) oversubscribes, and its threads then spin against each other: on 2 cores the
# unit tests took 244 s in two workers at 2 threads each, 88 s at 1 thread, 140 s in one process.
# Before torch is imported, so that it takes effect in this process as well.
# The cores this process may run on (a container or taskset can allow fewer than the host has).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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
