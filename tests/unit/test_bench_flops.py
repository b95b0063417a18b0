"""bench/flops.py's FLOP count against an independent one: torch's FlopCounterMode on a real
PEFT LoRA step of a tiny Llama. Counts only: no timing is asserted."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from bench.flops import (
    limit_shapes,
    lora_step_workload,
    machine_speed,
    measure_throughput,
    physical_limit,
    reference_shape,
    reference_speed,
    transposed,
)
from bench.rounds import limit_fraction, mfu, ratio_per_round, round_order, speed_factor, stats

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)


def _lora_model(r: int):
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(LlamaConfig(**SHAPE, max_position_embeddings=64)),
                          LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                     target_modules="all-linear"))


def _counted_matmul_flops(length: int, r: int) -> int:
    model = _lora_model(r)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    # SDPA's own kernels are not matmuls: the linear layers and the LM head are.
    return sum(n for op, n in counts.items() if "mm" in str(op))


def test_linear_and_head_flops_equal_torch_flop_counter():
    # transformers' standard loss computes logits at every position: count the head there too.
    length, r = 11, 4
    w = lora_step_workload(SHAPE, [length], [length], r, micro_batches=1, attention=False)
    assert w.flops == _counted_matmul_flops(length, r)


def test_attention_counts_causal_pairs_and_the_head_only_trained_positions():
    w = lora_step_workload(SHAPE, [4, 6], [1, 2], lora_r=4, micro_batches=1)
    att = sum(t.flops for t in w.terms if t.name == "attention")
    pairs = 4 * 5 // 2 + 6 * 7 // 2
    # the last layer: only the queries that predict a trained token (the examples' last ones:
    # position 2 of the first, 3 and 4 of the second)
    last_pairs = 3 + (4 + 5)
    layers = SHAPE["num_hidden_layers"]
    assert att == 12 * SHAPE["hidden_size"] * ((layers - 1) * pairs + last_pairs)
    head = sum(t.flops for t in w.terms if t.name.startswith("lm head"))
    assert head == 2 * 2 * 3 * SHAPE["hidden_size"] * SHAPE["vocab_size"]


def test_trimmed_last_layer_flops_equal_torch_flop_counter():
    # sft_scale's step with training.trim_last_layer (the chunked loss at trained positions,
    # the last layer's q/o/MLP there only) does exactly the GEMM FLOPs the limit counts.
    from sft_scale.training import trained_rows
    from sft_scale.training.loss import summed_loss

    length, prompt, r = 13, 5, 4
    model = _lora_model(r)
    names, _ = trained_rows.install(model.get_base_model())
    assert names
    ids = torch.randint(0, SHAPE["vocab_size"], (1, length))
    labels = ids.clone()
    labels[0, :prompt] = -100
    counter = FlopCounterMode(display=False)
    with counter:
        summed_loss(model, {"input_ids": ids, "labels": labels}, "chunked").backward()
    counts = counter.get_flop_counts()["Global"]
    counted = sum(n for op, n in counts.items() if "mm" in str(op))
    w = lora_step_workload(SHAPE, [length], [length - prompt], r, micro_batches=1,
                           attention=False)
    assert w.flops == counted
    full = lora_step_workload(SHAPE, [length], [length - prompt], r, micro_batches=1,
                              attention=False, trained_only_last_layer=False)
    assert w.flops < full.flops


def test_physical_limit_is_the_sum_of_each_term_at_its_own_throughput():
    w = lora_step_workload(SHAPE, [8, 8], [4, 4], lora_r=4, micro_batches=2)
    thr = measure_throughput(limit_shapes(w), threads=1, min_time=0.002, reps=2)
    lim = physical_limit(w, thr)
    want = sum(t.flops / max(thr[t.shape], thr[transposed(t.shape)]) for t in w.terms)
    assert abs(lim["limit_seconds"] - want) < 1e-12
    assert lim["limit_tokens_per_s"] == 16 / lim["limit_seconds"]
    assert 0 < lim["limit_mfu"] <= 1


def test_each_product_is_timed_in_its_faster_orientation():
    # C = A B and C^T = B^T A^T are the same FLOPs; the limit takes whichever this machine
    # computes faster (the LoRA weight gradients differ 2-4x on CPU).
    w = lora_step_workload(SHAPE, [8], [4], lora_r=4, micro_batches=1)
    shapes = limit_shapes(w)
    assert all(transposed(s) in shapes for s in shapes)
    assert transposed((2, 3, 5)) == (5, 3, 2) and transposed((7, 2, 3, 5)) == (7, 5, 3, 2)
    slow = {s: 1e9 for s in shapes}
    one = w.terms[0].shape
    assert transposed(one) != one
    fast = {**slow, transposed(one): 4e9}
    gained = physical_limit(w, slow)["limit_seconds"] - physical_limit(w, fast)["limit_seconds"]
    same = sum(t.flops for t in w.terms if t.shape in (one, transposed(one)))
    assert abs(gained - (same / 1e9 - same / 4e9)) < 1e-12


def test_rounds_rotate_and_ratios_are_taken_within_a_round():
    names = ["a", "b", "c"]
    orders = [round_order(names, k) for k in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(sorted(o.index(n) for o in orders) == [0, 1, 2] for n in names)
    results = {"x": [{"rep": 0, "ok": True, "tokens_per_s": 10.0},
                     {"rep": 1, "ok": True, "tokens_per_s": 30.0}],
               "y": [{"rep": 0, "ok": True, "tokens_per_s": 5.0},
                     {"rep": 1, "ok": True, "tokens_per_s": 10.0},
                     {"rep": 2, "ok": True, "tokens_per_s": 1.0}]}
    s = ratio_per_round(results, "x", "y")
    assert s["values"] == [2.0, 3.0] and s["median"] == 2.5 and (s["min"], s["max"]) == (2, 3)
    assert stats([]) is None


def test_machine_speed_probe_is_the_largest_frozen_gemm():
    w = lora_step_workload(SHAPE, [8, 8], [4, 4], lora_r=4, micro_batches=2)
    # rows = tokens per micro-batch; the MLP's projections are the largest frozen GEMMs (ties:
    # the larger shape tuple, here down_proj's)
    assert reference_shape(w) == (8, SHAPE["intermediate_size"], SHAPE["hidden_size"])
    assert machine_speed((8, 4, 4), window=0.001) > 0


def test_a_slow_probe_window_does_not_set_the_limits_reference_speed():
    """A moment of contention in one of the limit's two probe windows would otherwise scale
    every method's limit in that round (speed factor = method's probe / the reference)."""
    assert reference_speed([22.2, 34.1]) == reference_speed([34.1, 22.2]) == 34.1
    lim = {"reference": {"gflops": reference_speed([22.2, 34.1])}}
    assert speed_factor({"machine_gflops": [33.9, 34.3]}, lim) == pytest.approx(1.0, abs=0.01)


def test_mfu_and_limit_fraction_use_the_speed_each_method_ran_at():
    """A run bracketed by a probe at 0.8x the limit's probe is judged against 0.8x the limit;
    an unprobed (older) run against the limit as measured."""
    lim = {"limit_tokens_per_s": 100.0, "flops_per_token": 1e9, "peak_gflops": 50.0,
           "reference": {"shape": [8, 32, 48], "gflops": 40.0}}
    rounds = [{"round": 0, "limit": lim}, {"round": 1, "limit": lim}]
    results = {"m": [{"rep": 0, "ok": True, "tokens_per_s": 40.0, "machine_gflops": [30.0, 34.0]},
                     {"rep": 1, "ok": True, "tokens_per_s": 40.0}]}
    assert speed_factor(results["m"][0], lim) == 0.8
    assert speed_factor(results["m"][1], lim) == 1.0
    assert limit_fraction(results, "m", rounds)["values"] == [0.5, 0.4]
    assert mfu(results, "m", rounds)["values"] == [40 * 1e9 / (50e9 * 0.8), 40 * 1e9 / 50e9]


def test_two_runs_side_by_side_per_method():
    from bench import methods as M
    from bench.rounds import method_comparison

    def run(tps_bare, tps_m):
        runs = {M.CEILING: [{"rep": i, "ok": True, "tokens_per_s": x} for i, x in
                            enumerate(tps_bare)],
                "m": [{"rep": i, "ok": True, "tokens_per_s": x} for i, x in enumerate(tps_m)]}
        return {"runs": runs, "rounds": []}

    earlier = run([100, 110, 90], [200, 210, 190])
    now = run([100, 100, 100], [300, 300, 300])
    methods = [M.Method(M.CEILING, "bare", "", ""), M.Method("m", "sft", "", "")]
    rows = {r.split(" | ")[0].lstrip("| "): r for r in
            method_comparison(earlier, now["runs"], methods, []) if r.startswith("| ")}
    assert "tok/s yes; vs bare yes" in rows[M.CEILING]
    assert "tok/s no; vs bare no" in rows["m"] and "200 [190–210] | 300 [300–300]" in rows["m"]


def test_runs_whose_best_trl_method_differs_compare_both_by_name():
    from bench.rounds import reproduction

    def one(xs):
        return [{"rep": i, "ok": True, "tokens_per_s": x} for i, x in enumerate(xs)]

    def run(packing, padding_free):
        return {"sft_scale": one([300, 300]), "trl_packing": one(packing),
                "trl_padding_free": one(padding_free), "trl_defaults": one([100, 100])}

    earlier = {"runs": run([150, 150], [140, 140]), "rounds": [], "machine": {}}
    now = run([140, 140], [150, 150])
    rows = {r.split(" | ")[0].lstrip("| "): r for r in reproduction(earlier, now, [])
            if r.startswith("| sft_scale / trl_p")}
    assert "2.00x [2.00x–2.00x] | 2.14x [2.14x–2.14x] | **no**" in rows["sft_scale / trl_packing"]
    assert "2.14x [2.14x–2.14x] | 2.00x [2.00x–2.00x]" in rows["sft_scale / trl_padding_free"]
