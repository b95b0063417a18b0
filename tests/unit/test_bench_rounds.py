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
