"""bench/pool.py on synthetic runs: the pooled median, the two-level bootstrap interval, the goal
verdicts, and the refusals of runs that measured different things. Nothing is timed."""

import json
import statistics
import subprocess

import pytest

from bench import pool
from tests.helpers import ROOT

HEAD = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                      text=True, check=True).stdout.strip()


def run(sft: list[float], defaults: list[float], commit: str = HEAD, **spec) -> dict:
    """A bench run's JSON: sft_scale and trl_defaults tokens/s per round, the rest fixed."""
    rounds = [{"round": i, "limit": {"flops_per_token": 8e7, "limit_tokens_per_s": 400.0,
                                     "peak_gflops": 35.0, "reference": {"gflops": 34.0}}}
              for i in range(len(sft))]
    tok = {"sft_scale": sft, "trl_defaults": defaults, "trl_packing": [s / 2.2 for s in sft],
           "bare_step": [300.0] * len(sft)}
    return {"spec": {"name": "default", "model": {"hidden_size": 512}, "model_dir": "/tmp/x",
                     **spec},
            "machine": {"git_commit": commit, "date": "2026-12-02 05:00 UTC",
                        "versions": {"torch": "2.13.0+cpu"}},
            "rounds": rounds, "quick": False,
            "runs": {m: [{"rep": i, "ok": True, "tokens_per_s": x} for i, x in enumerate(xs)]
                     for m, xs in tok.items()}}


def write(tmp_path, name, data) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def row(rows, label):
    return next(r for r in rows if r["metric"].label == label)


def test_pooled_median_is_over_every_round_of_every_run_and_the_interval_holds_it():
    runs = [dict(run([300, 310, 320], [100, 100, 100]), path="a"),
            dict(run([290, 330, 300, 310], [100, 110, 95, 100]), path="b")]
    r = row(pool.pool(runs), "sft_scale / trl_defaults (fp32)")
    ratios = [3.0, 3.1, 3.2] + [2.9, 3.0, 300 / 95, 3.1]
    assert r["median"] == pytest.approx(statistics.median(ratios))
    assert (r["min"], r["max"]) == (pytest.approx(2.9), pytest.approx(3.2))
    assert r["lo"] <= r["median"] <= r["hi"] and r["min"] <= r["lo"] and r["hi"] <= r["max"]
    again = row(pool.pool(runs), "sft_scale / trl_defaults (fp32)")
    assert (again["lo"], again["hi"]) == (r["lo"], r["hi"])  # fixed seed: the same interval


def test_a_run_that_drifts_as_a_whole_widens_the_interval():
    """The bootstrap resamples runs, not only rounds: a second run that sits apart counts as
    one more host state, not as more rounds that agree."""
    same = [[3.0, 3.01, 3.02, 3.0]] * 2
    apart = [[3.0, 3.01, 3.02, 3.0], [2.7, 2.71, 2.72, 2.7]]
    lo_same, hi_same = pool.cluster_bootstrap(same)
    lo_apart, hi_apart = pool.cluster_bootstrap(apart)
    assert hi_apart - lo_apart > 5 * (hi_same - lo_same)
    assert lo_apart <= 2.72 and hi_apart >= 3.0


@pytest.mark.parametrize("defaults, expected", [
    (100.0, "**met**"), (130.0, "**not met**"), (None, "**on the line**")])
def test_goal_verdict_comes_from_the_whole_interval(defaults, expected):
    tok = [90.0, 110.0, 95.0, 105.0, 100.0, 108.0] if defaults is None else [defaults] * 3
    runs = [dict(run([310.0] * len(tok), tok), path=str(i)) for i in range(2)]
    r = row(pool.pool(runs), "sft_scale / trl_defaults (fp32)")
    assert r["verdict"].startswith(expected)


def test_runs_of_different_workloads_or_code_are_refused_by_name(tmp_path):
    a = dict(run([300] * 3, [100] * 3), path="a.json")
    b = dict(run([300] * 3, [100] * 3, model={"hidden_size": 256}), path="b.json")
    with pytest.raises(pool.PoolError, match=r"b.json: spec.model differs from a.json's"):
        pool.check_same([a, b])
    c = dict(run([300] * 3, [100] * 3), path="c.json")
    c["rounds"][0]["limit"]["flops_per_token"] = 9e7
    with pytest.raises(pool.PoolError, match="c.json: flops_per_token differs"):
        pool.check_same([a, c])
    d = dict(run([300] * 3, [100] * 3, commit="other"), path="d.json")
    with pytest.raises(pool.PoolError, match=r"d.json: sft_scale/ at git other differs"):
        pool.check_same([a, d], tree=lambda commit: f"tree-{commit}")
    with pytest.raises(pool.PoolError, match=r"git cannot show sft_scale/ at commit 'other'"):
        pool.check_same([a, d])
    e = dict(run([300] * 3, [100] * 3), path="e.json")  # another run's scratch paths pool
    e["spec"]["model_dir"] = "/tmp/elsewhere"
    pool.check_same([a, e])


def test_bad_files_are_refused_with_the_file_and_what_to_give(tmp_path):
    good = write(tmp_path, "good.json", run([300] * 3, [100] * 3))
    cases = {
        "missing.json": None,
        "bad.json": "{\n  oops",
        "quick.json": json.dumps(dict(run([300] * 3, [100] * 3), quick=True)),
        "norounds.json": json.dumps(dict(run([300] * 3, [100] * 3), rounds=[])),
    }
    expected = {"missing.json": "no such file", "bad.json": "line 2: not JSON",
                "quick.json": "--quick smoke run", "norounds.json": "no interleaved rounds"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(pool.PoolError, match=expected[name]):
            pool.load([tmp_path / name, good])
    with pytest.raises(pool.PoolError, match="at least two runs"):
        pool.load([good])


def test_main_writes_the_report_with_its_command(tmp_path, capsys):
    a = write(tmp_path, "a.json", run([300, 320, 310], [100, 100, 100]))
    b = write(tmp_path, "b.json", run([305, 315], [101, 99]))
    out = tmp_path / "POOLED.md"
    assert pool.main([a, b, "--out", str(out)]) == 0
    text = out.read_text()
    assert f"python -m bench.pool {a} {b} --out {out}" in text
    assert "2 runs, 5 rounds" in text
    assert "| sft_scale / trl_defaults (fp32) | 3.10x |" in text and "≥ 3x" in text
    assert "300 / 320 / 310" in text
    b2 = write(tmp_path, "b2.json", run([305, 315], [101, 99], model={"hidden_size": 1}))
    assert pool.main([a, b2]) == 2
    assert "b2.json: spec.model differs" in capsys.readouterr().err
