"""The real training script refuses what only the model can show before it writes anything."""

import pytest

from tests.helpers import run_train

pytestmark = pytest.mark.slow


def test_train_refuses_unknown_lora_target_modules_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, "lora.target_modules=[q_proj, v_prj]", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: 'lora.target_modules': 'v_prj' names no module of this llama model. " \
           "Its Linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, " \
           "v_proj; or use 'all-linear'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
