"""The Accelerator's process-group settings (one process; tests/e2e runs several)."""

from datetime import timedelta

import pytest

from sft_scale.config import ConfigError, load_config
from sft_scale.training.distributed import describe, make_accelerator
from tests.helpers import DEMO_CONFIG


def test_process_group_timeout_comes_from_the_config_and_is_printed():
    cfg = load_config(str(DEMO_CONFIG), ["distributed.timeout_minutes=45"])
    acc = make_accelerator(cfg)
    assert acc.init_handler.timeout == timedelta(minutes=45)
    assert "process-group timeout 45 min (distributed.timeout_minutes)" in describe(acc)


@pytest.mark.parametrize("value", ["0", "-1", ".inf", "2000"])
def test_timeout_minutes_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match="distributed.timeout_minutes"):
        load_config(str(DEMO_CONFIG), [f"distributed.timeout_minutes={value}"])
