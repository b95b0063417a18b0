"""bench/profile.py: the dispatch timer attributes each aten operator's time to its name and input
shapes, and the report sums them by kind. Times are printed, never asserted against a speed."""

import torch

from bench.profile import aten_name, dispatch_rows, kind_of, op_timer, report
from bench.spec import quick_spec


def test_dispatch_timer_counts_each_operator_by_shapes():
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    timer = op_timer()
    with timer:
        for _ in range(3):
            c = a @ b
        torch.nn.functional.silu(c)
    assert timer.ops[("aten::mm", ((4, 5), (5, 6)))][0] == 3
    assert timer.ops[("aten::silu", ((4, 6),))][0] == 1
    assert all(sec >= 0 for _, sec in timer.ops.values())


def test_names_and_kinds():
    assert aten_name(torch.ops.aten.mm.default) == "aten::mm"
    assert kind_of("aten::mm").startswith("GEMM")
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu").startswith("attention")
    assert kind_of("aten::addcmul_").startswith("elementwise")
    assert kind_of("aten::slice_backward").startswith("memory")


def test_report_sums_by_kind_and_lists_shapes():
    ops = {("aten::mm", ((4, 5), (5, 6))): [3, 0.3], ("aten::mul", ((4, 6), (4, 6))): [1, 0.1]}
    text = report(dispatch_rows(ops), command="python -m bench.profile", spec=quick_spec(2),
                  threads=1, wall=1.0, steps_s=0.5, timer="dispatch", top=5)
    assert "| GEMM (linear layers, LoRA, LM head) | 0.30 | 75% |" in text
    assert "| `aten::mm` | 4x5 5x6 | 3 | 100.000 | 0.30 | 75% |" in text
    assert "add up to 0.40 s" in text and "the training steps took 0.50 s" in text
