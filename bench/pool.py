"""Pool the interleaved rounds of several bench runs of the same code and workload.

One run of a few rounds gives each ratio a median and a min-max spread, and a second run "agrees"
when its median lies inside the first's spread. On a shared VM, hosts drift by 10-20% between
runs, so a goal that sits near a ratio's median (sft_scale / TRL's fp32 defaults near 3x) can be
met by one run and missed by the next. This module answers the question every single run leaves
open: given all the rounds measured on this code, where does the ratio lie, and how sure is that?

Each round is one independent measurement of every ratio (both sides ran minutes apart, in the
same process layout). Rounds of one run share that run's host state, so the interval is a
two-level (cluster) bootstrap: resample runs with replacement, then rounds within each chosen
run, and take the median of the pooled rounds; 95% percentile interval, fixed seed. A goal is
met when the whole interval lies at or above its target, missed when it lies below, and is on
the line otherwise.

Runs pool only when they measured the same thing: the same workload (bench spec, FLOPs per
token), the same library versions and the same `sft_scale/` package (git tree of the recorded
commit). Anything else is refused with the file and the field that differ.

    .venv/bin/python -m bench.pool docs/BENCHMARKS.json docs/BENCHMARKS_run1.json ... \
        --out docs/BENCHMARKS_POOLED.md
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.rounds import (
    TRL_BEST_TARGET,
    TRL_DEFAULTS_TARGET,
    goal_verdict,
    limit_fraction,
    mfu,
    per_round,
    ratio_per_round,
)

ROOT = Path(__file__).resolve().parents[1]
SEED, RESAMPLES, LEVEL = 0, 10_000, 0.95
# Where a run's spec names its own scratch files: different in every run, not the workload.
RUN_PATHS = ("model_dir", "data_file", "sft_config")


@dataclass(frozen=True)
class Metric:
    label: str
    values: Callable[[dict, list[dict]], dict | None]  # (results, rounds) -> stats
    target: float | None = None
    pct: bool = False


METRICS = (
    Metric("sft_scale / trl_packing", lambda r, rd: ratio_per_round(r, "sft_scale", "trl_packing"),
           TRL_BEST_TARGET),
    Metric("sft_scale / trl_padding_free",
           lambda r, rd: ratio_per_round(r, "sft_scale", "trl_padding_free"), TRL_BEST_TARGET),
    Metric("sft_scale / trl_defaults (fp32)",
           lambda r, rd: ratio_per_round(r, "sft_scale", "trl_defaults"), TRL_DEFAULTS_TARGET),
    Metric("sft_scale / transformers_trainer",
           lambda r, rd: ratio_per_round(r, "sft_scale", "transformers_trainer")),
    Metric("sft_scale / bare_step", lambda r, rd: ratio_per_round(r, "sft_scale", "bare_step")),
    Metric("sft_scale / physical limit", lambda r, rd: limit_fraction(r, "sft_scale", rd),
           pct=True),
    Metric("sft_scale CPU MFU", lambda r, rd: mfu(r, "sft_scale", rd), pct=True),
)


class PoolError(ValueError):
    pass


def load(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except FileNotFoundError:
            raise PoolError(f"{p}: no such file (give the .json a bench run wrote next to its "
                            ".md)") from None
        except json.JSONDecodeError as e:
            raise PoolError(f"{p}: line {e.lineno}: not JSON ({e.msg})") from None
        if data.get("quick"):
            raise PoolError(f"{p}: a --quick smoke run; its numbers mean nothing to pool")
        if not data.get("rounds"):
            raise PoolError(f"{p}: no interleaved rounds (a run with --isolation none?); "
                            "pool only runs made with rounds")
        runs.append(dict(data, path=str(p)))
    if len(runs) < 2:
        raise PoolError("give at least two runs to pool")
    return runs


def _workload(run: dict) -> dict:
    spec = {k: v for k, v in run["spec"].items() if k not in RUN_PATHS}
    flops = sorted({r["limit"]["flops_per_token"] for r in run["rounds"] if r.get("limit")})
    return {"spec": spec, "flops_per_token": flops,
            "versions": run["machine"].get("versions")}


def package_tree(commit: str | None) -> str | None:
    """The git tree of sft_scale/ at the run's commit (None where git does not know it)."""
    if not commit:
        return None
    res = subprocess.run(["git", "rev-parse", f"{commit}:sft_scale"], cwd=ROOT,
                         capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def check_same(runs: list[dict], tree=package_tree) -> None:
    """Refuse to pool runs that measured different things, naming the files and the field."""
    first = runs[0]
    ref = _workload(first)
    ref_tree = tree(first["machine"].get("git_commit"))
    for run in runs[1:]:
        w = _workload(run)
        for key in ref:
            if w[key] != ref[key]:
                diff = key if key != "spec" else "spec." + next(
                    k for k in sorted(set(ref["spec"]) | set(w["spec"]))
                    if ref["spec"].get(k) != w["spec"].get(k))
                raise PoolError(f"{run['path']}: {diff} differs from {first['path']}'s; these "
                                "runs measured different workloads and do not pool")
        t = tree(run["machine"].get("git_commit"))
        if ref_tree is None or t is None:
            raise PoolError(f"git cannot show sft_scale/ at commit "
                            f"{(run if t is None else first)['machine'].get('git_commit')!r} "
                            f"({(run if t is None else first)['path']}); pool runs made from "
                            "this repository's history")
        if t != ref_tree:
            raise PoolError(f"{run['path']}: sft_scale/ at git {run['machine']['git_commit']} "
                            f"differs from {first['path']}'s at {first['machine']['git_commit']}"
                            "; pool only runs of the same product code")


def per_run_values(run: dict, metric: Metric) -> list[float]:
    s = metric.values(run["runs"], run["rounds"])
    return list(s["values"]) if s else []


def cluster_bootstrap(groups: list[list[float]], resamples: int = RESAMPLES,
                      level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of the pooled median: runs resampled, then rounds within each run."""
    groups = [g for g in groups if g]
    rng = random.Random(seed)
    meds = []
    for _ in range(resamples):
        pooled = []
        for g in rng.choices(groups, k=len(groups)):
            pooled.extend(rng.choices(g, k=len(g)))
        meds.append(statistics.median(pooled))
    meds.sort()
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def pool(runs: list[dict]) -> list[dict]:
    rows = []
    for m in METRICS:
        groups = [per_run_values(run, m) for run in runs]
        pooled = [x for g in groups for x in g]
        if not pooled:
            continue
        lo, hi = cluster_bootstrap(groups)
        rows.append({"metric": m, "groups": groups, "median": statistics.median(pooled),
                     "lo": lo, "hi": hi, "min": min(pooled), "max": max(pooled),
                     "verdict": goal_verdict(lo, hi, m.target, "interval")})
    return rows


def _f(x: float, pct: bool) -> str:
    return f"{x:.0%}" if pct else f"{x:.2f}x"


def markdown(runs: list[dict], rows: list[dict], command: str) -> str:
    n_rounds = sum(len(r["rounds"]) for r in runs)
    L = ["# Benchmarks pooled: every interleaved round of the same code\n",
         "Generated by `bench/pool.py` from the JSON the runs wrote; no number here is measured "
         "anew. Performance is measured, never asserted in tests.\n",
         f"```bash\n{command}\n```\n",
         f"{len(runs)} runs, {n_rounds} rounds, one workload and one `sft_scale/` package "
         "(checked: bench spec, FLOPs per token, library versions, git tree of sft_scale/). "
         "Each round gives one value of each ratio; the pooled median is over all rounds, the "
         f"interval a {LEVEL:.0%} two-level bootstrap (runs, then rounds within a run; "
         f"{RESAMPLES:,} resamples, seed {SEED}). A goal is met when the whole interval is at "
         "or above its target.\n",
         "## The runs\n",
         "| file | date | git | rounds | sft_scale tok/s per round | trl_defaults tok/s per "
         "round |", "|---|---|---|---|---|---|"]
    for r in runs:
        def toks(name, r=r):
            return " / ".join(f"{v:.0f}" for _, v in sorted(per_round(r["runs"], name).items()))
        L.append(f"| `{r['path']}` | {r['machine'].get('date', '?')} | "
                 f"{r['machine'].get('git_commit', '?')} | {len(r['rounds'])} | "
                 f"{toks('sft_scale')} | {toks('trl_defaults')} |")
    L += ["", "## Pooled ratios\n",
          "| ratio | pooled median | 95% interval | min–max of rounds | medians of the runs | "
          "target | |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["metric"]
        per_run = " / ".join(_f(statistics.median(g), m.pct) if g else "–"
                             for g in row["groups"])
        target = f"≥ {m.target:g}x" if m.target else ""
        L.append(f"| {m.label} | {_f(row['median'], m.pct)} | "
                 f"{_f(row['lo'], m.pct)}–{_f(row['hi'], m.pct)} | "
                 f"{_f(row['min'], m.pct)}–{_f(row['max'], m.pct)} | {per_run} | {target} | "
                 f"{row['verdict']} |")
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="the JSON files of bench runs (bench/run.py --out)")
    ap.add_argument("--out", help="markdown report (default: print)")
    args = ap.parse_args(argv)
    try:
        runs = load([Path(p) for p in args.runs])
        check_same(runs)
    except PoolError as e:
        print(f"bench.pool: {e}", file=sys.stderr)
        return 2
    command = "python -m bench.pool " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = markdown(runs, pool(runs), command)
    if args.out:
        Path(args.out).write_text(text)
        print(f"bench.pool: wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
