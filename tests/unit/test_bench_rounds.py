"""bench/rounds.py's goal verdicts on synthetic runs: a run meets a goal only when every round
does. Nothing is timed."""

import pytest

from bench import rounds


def results(sft: list[float], defaults: list[float]) -> dict:
    """A bench run's per-method reps: sft_scale and trl_defaults tokens/s per round."""
    tok = {"sft_scale": sft, "trl_defaults": defaults, "trl_packing": [s / 2.2 for s in sft],
           "bare_step": [300.0] * len(sft)}
    return {m: [{"rep": i, "ok": True, "tokens_per_s": x} for i, x in enumerate(xs)]
            for m, xs in tok.items()}


@pytest.mark.parametrize("lo, hi, expected", [
    (3.0, 3.2, "**met**: the whole spread"), (2.5, 2.99, "**not met**"),
    (2.9, 3.1, "**on the line**")])
def test_goal_verdict_judges_the_whole_range(lo, hi, expected):
    assert rounds.goal_verdict(lo, hi, 3.0).startswith(expected)
    assert rounds.goal_verdict(lo, hi, None) == "–"


def test_a_run_whose_median_meets_a_goal_but_one_round_misses_it_is_on_the_line():
    rows = {label: (s, target, verdict) for label, s, target, verdict
            in rounds.goal_rows(results([310.0] * 4, [100.0, 98.0, 106.0, 101.0]), [])}
    s, target, verdict = rows["sft_scale / trl_defaults (fp32)"]
    assert s["median"] > 3.0 > s["min"] and target == "≥ 3x"
    assert verdict.startswith("**on the line**")
    s, target, verdict = rows["sft_scale / TRL's best (trl_packing)"]
    assert s["min"] >= 2.0 and verdict.startswith("**met**") and target == "≥ 2x"
    assert rows["sft_scale / bare_step"][1:] == ("", "–")


def test_small_matrices_puts_each_term_against_the_square_gemm_largest_time_first():
    limit = {"square_gemm": {"shape": [1024, 1024, 1024], "gflops": 40.0},
             "terms": {"lora forward": {"gflops": 1.0, "gflop_per_s": 10.0, "seconds": 0.1},
                       "frozen forward": {"gflops": 3.0, "gflop_per_s": 36.0, "seconds": 0.083},
                       "attention": {"gflops": 4.0, "gflop_per_s": 20.0, "seconds": 0.2}}}
    text = rounds.small_matrices(limit)
    assert "A 1024x1024x1024 GEMM" in text and "40.0 GFLOP/s" in text
    assert text.index("attention 50% (50% of the FLOPs)") < text.index(
        "lora forward 25% (12% of the FLOPs)") < text.index("frozen forward 90% (38% of")
