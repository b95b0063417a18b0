"""The one command: every method in interleaved rounds, each run in a fresh process; per-round
ratios, the physical limit, markdown.

    .venv/bin/python -m bench.run --reps 3 --out docs/BENCHMARKS.md
    .venv/bin/python -m bench.run --reps 3 --compare docs/BENCHMARKS.json --out docs/BENCHMARKS-2.md
    .venv/bin/python -m bench.run --summary [--from-json docs/BENCHMARKS.json]
    .venv/bin/python -m bench.run --quick --out /tmp/bench.md
    .venv/bin/python -m bench.run --list
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import methods as M
from bench.spec import Spec, default_spec, quick_spec

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", "--rounds", dest="reps", type=int, default=None,
                    help="rounds (default 3; --quick: 1). With --isolation method (the default) "
                    "every round runs each method once, in a rotated order, and measures the "
                    "physical limit; ratios are taken within a round")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default "
                    "5, the first not timed; --quick: 2)")
    ap.add_argument("--quick", action="store_true", help="tiny model, short rows, 1 rep, 2 steps: "
                    "a smoke test of the harness")
    ap.add_argument("--methods", default=None, help="comma-separated names (default: all "
                    "default methods); 'all' adds the optional ones (trl_defaults_bf16)")
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument("--out", default=None, help="markdown report (e.g. docs/BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="raw results (default: the --out path with "
                    ".json)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, "
                    "removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run before it is "
                    "killed and reported as failed")
    ap.add_argument("--isolation", choices=["method", "rep", "none"], default=None,
                    help="method (default): one fresh process per method, its reps inside "
                    "(each rep rebuilds model, trainer and data; peak RSS reset per rep); rep: one "
                    "process per method and rep, sft_scale through its CLI (slower: every rep "
                    "pays the imports); none (--quick's default): every method in one process, "
                    "peak RSS not per method")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every run "
                    "(default: torch's default, one per core; --quick: 1). On a machine shared "
                    "with other jobs, 1 avoids OpenMP threads spinning on a taken core")
    ap.add_argument("--no-group", action="store_true", help="with --isolation method, give "
                    "each sft_scale switch its own process too (cleaner peak RSS, ~10 s of imports "
                    "more per switch)")
    ap.add_argument("--list", action="store_true", help="list the methods and exit")
    ap.add_argument("--summary", action="store_true", help="no training: print one line of the "
                    "key per-round ratios of a results JSON (--from-json, default "
                    "docs/BENCHMARKS.json)")
    ap.add_argument("--compare", default=None, metavar="JSON", help="an earlier run's results "
                    "JSON: the report says whether this run's ratios land inside its spread")
    ap.add_argument("--no-limit", action="store_true", help="skip measuring the physical limit "
                    "(bench/flops.py) at the start of each round")
    ap.add_argument("--from-json", default=None, metavar="JSON", help="no training: write the "
                    "markdown again (to --out) from the results JSON of an earlier run, e.g. "
                    "after a change to bench/report.py")
    return ap.parse_args(argv)


def all_methods(base_config: Path, include_optional: bool = False,
                resolve: bool = False) -> list[M.Method]:
    fixed = [m for m in M.FIXED if m.default or include_optional]
    try:
        variants = M.sft_variants(str(base_config), resolve=resolve)
    except Exception as e:  # noqa: BLE001 - the bench still runs the rest
        variants = [M.Method("sft_scale[switches]", "sft", "switch", "switches",
                             available=False, why_not=f"not available: {e}")]
    return fixed + variants


# --------------------------------------------------------------------------- running


def child_env(run_dir: Path) -> dict:
    env = dict(os.environ)
    # torch.compile's cache: this bench run's own, so its first compile is cold (as a user's
    # first run is) and later reps reuse it (as a user's later runs do).
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(run_dir.parent / "inductor_cache"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_CACHE=str(run_dir / "hf_datasets"),  # cold cache in every process
               WANDB_DISABLED="true", TQDM_MININTERVAL="5",
               BENCH_LAUNCHED_AT=repr(time.time()))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "")
                                                      .split(os.pathsep) if p])
    return env


def run_child(cmd: list[str], env: dict, log: Path, timeout: int) -> dict:
    """Run `cmd`, wait for it with wait4 (its own peak RSS, ru_maxrss), kill at timeout."""
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    timed_out = True
                    proc.kill()
                    pid, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.1)
        except BaseException:
            # Interrupted: take the worker down with us (SIGKILL: an sft_scale run in it would
            # treat SIGTERM as preemption and checkpoint first).
            proc.kill()
            proc.wait()
            raise
    return {"returncode": os.waitstatus_to_exitcode(status),
            "process_wall_s": time.perf_counter() - t0,
            "process_peak_rss_mb": ru.ru_maxrss / 1024, "timed_out": timed_out}


def run_group(group: list[M.Method], reps: int, rep_offset: int, spec_path: Path,
              run_dir: Path, timeout: int, prepare: bool = False) -> list[dict]:
    """One fresh worker process for `group` (its reps run inside it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = [{"name": m.name, "safe": _safe(m.name), "kind": m.kind, "options": m.options,
                "rep_offset": rep_offset} for m in group]
    (run_dir / "methods.json").write_text(json.dumps(payload))
    cmd = [sys.executable, "-m", "bench.worker", str(spec_path), str(run_dir / "methods.json"),
           str(run_dir), str(reps)] + (["--prepare"] if prepare else [])
    proc = run_child(cmd, child_env(run_dir), run_dir / "log.txt",
                     timeout * reps * len(group))
    path = run_dir / "results.jsonl"
    got = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] \
        if path.exists() else []
    done = {(r["method"], r["rep"]) for r in got}
    for m in group:  # a crashed or killed worker: the missing reps are failures
        for rep in range(rep_offset, rep_offset + reps):
            if (m.name, rep) not in done:
                why = "timed out" if proc["timed_out"] else f"worker exited {proc['returncode']}"
                got.append({"method": m.name, "rep": rep, "ok": False,
                            "error": f"{why}: {_tail(run_dir / 'log.txt')}"})
    for r in got:
        r.update(proc)
        r["process_methods"] = len(group)
    return got


def run_sft_cli(m: M.Method, spec: Spec, rep: int, run_dir: Path, timeout: int) -> dict:
    """--isolation rep: the real CLI in its own process, as users run it."""
    from bench.sft import parse_sft_metrics, sft_argv

    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "out"
    cmd = [sys.executable, "-m", "sft_scale.train"] + sft_argv(
        Path(spec.sft_config), out, m.options.get("set", []))
    proc = run_child(cmd, child_env(run_dir), run_dir / "log.txt", timeout)
    res = dict(proc, method=m.name, rep=rep, wall_s=proc["process_wall_s"],
               peak_rss_mb=proc["process_peak_rss_mb"], startup_s=None)
    if proc["returncode"] != 0:
        return dict(res, ok=False, error=_tail(run_dir / "log.txt"))
    try:
        res.update(parse_sft_metrics(out, spec.train.warmup_steps_excluded), ok=True)
    except Exception as e:  # noqa: BLE001
        res.update(ok=False, error=f"could not read sft_scale's metrics: {e!r}")
    return res


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text()[-n:]
    except OSError:
        return ""


def _status(res: dict) -> str:
    if res.get("ok"):
        busy = res.get("cores_busy")
        return (f"{res['tokens_per_s']:9.1f} tok/s  pad-eff {res['padding_efficiency']:.2f}  "
                f"rss {res['peak_rss_mb']:6.0f} MB  wall {res['wall_s']:6.1f} s"
                + (f"  cores busy {busy:.2f}" if busy else ""))
    if res.get("unavailable"):
        return res["error"][:200]
    lines = (res.get("error") or "").strip().splitlines()
    return "FAILED: " + (lines[-1][:200] if lines else "?")


# --------------------------------------------------------------------------- main


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    if args.summary:
        from bench.rounds import summary_line
        path = Path(args.from_json or ROOT / "docs" / "BENCHMARKS.json")
        print(summary_line(json.loads(path.read_text())))
        return 0
    if args.from_json:
        return rerender(Path(args.from_json), Path(args.out) if args.out else None,
                        Path(args.compare) if args.compare else None)
    spec = quick_spec(args.steps) if args.quick else default_spec(args.steps)
    reps = args.reps or (1 if args.quick else 3)
    isolation = args.isolation or ("none" if args.quick else "method")
    threads = args.threads or (1 if args.quick else None)
    if threads:
        os.environ.update(BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                          MKL_NUM_THREADS=str(threads))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sft_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    from bench.sft import write_config

    wanted = None if args.methods in (None, "all") else args.methods.split(",")
    skip = set(filter(None, args.skip.split(",")))
    methods = [m for m in all_methods(write_config(spec, work / "bench.yaml"),
                                      args.methods == "all" or bool(wanted))
               if (wanted is None or m.name in wanted) and m.name not in skip]
    if wanted:
        methods.sort(key=lambda m: wanted.index(m.name))
        unknown = set(wanted) - {m.name for m in methods}
        if unknown:
            print(f"bench: unknown methods {sorted(unknown)}; see --list", file=sys.stderr)
            return 2
    if args.quick:
        for m in methods:
            if m.slow and m.available and (wanted is None or m.name not in wanted):
                m.available, m.why_not = False, "skipped in --quick (slow on CPU)"
    if args.list:
        for m in methods:
            state = "" if m.available else f"  [{m.why_not}]"
            print(f"{m.name:44s} {m.role:10s} {m.about}{state}")
        return 0

    t_start = time.time()
    from bench import report
    from bench.data import prepare

    machine_before = report.machine_info()
    spec_path = work / "spec.json"
    runnable = [m for m in methods if m.available]
    if isolation == "none":  # the one worker prepares: the imports are paid once
        spec.data_file, spec.sft_config = str(work / "train.jsonl"), str(work / "bench.yaml")
        spec.save(spec_path)
        print(f"bench: {len(runnable)} methods x {reps} reps in one process (model and data "
              f"prepared there), work folder {work}", flush=True)
    else:
        print(f"bench: preparing model and data in {work}", flush=True)
        spec, lengths = prepare(spec, work)
        spec.sft_config = str(write_config(spec, work / "bench.yaml"))
        spec.save(spec_path)
        # Now that the model folder exists, let sft_scale say what each switch means here.
        keep = {m.name for m in methods}
        methods = [m for m in all_methods(Path(spec.sft_config), True,
                                          resolve=True) if m.name in keep]
        if wanted:
            methods.sort(key=lambda m: wanted.index(m.name))
        runnable = [m for m in methods if m.available]
        print(f"bench: {len(runnable)} methods x {reps} reps (isolation: {isolation}); model "
              f"{spec.parameters:,} parameters; {spec.train.n_examples} examples, "
              f"{spec.real_tokens:,} tokens", flush=True)

    results: dict[str, list[dict]] = {m.name: [] for m in methods}
    rounds: list[dict] = []

    def record(rs: list[dict]) -> None:
        for r in sorted(rs, key=lambda r: r["rep"]):
            results[r["method"]].append(r)
            print(f"[rep {r['rep'] + 1}/{reps}] {r['method']:44s} {_status(r)}", flush=True)

    if isolation == "none":
        record(run_group(runnable, reps, 0, spec_path, work / "all", args.timeout,
                         prepare=True))
        lengths_file = work / "all" / "lengths.json"
        if not lengths_file.exists():
            print(f"bench: the worker failed before training:\n{_tail(work / 'all' / 'log.txt')}",
                  file=sys.stderr)
            return 1
        spec, lengths = Spec.load(spec_path), json.loads(lengths_file.read_text())
    elif isolation == "method":
        groups: dict[str, list[M.Method]] = {}
        for m in runnable:
            groups.setdefault(m.name if args.no_group else (m.group or m.name), []).append(m)
        for rnd in range(reps):
            rounds.append(run_round(rnd, groups, spec_path, work, args, threads, record))
    else:  # rep: a fresh process per method and rep; sft_scale through its CLI
        for rep in range(reps):
            for m in runnable:
                d = work / f"{_safe(m.name)}-rep{rep}"
                record([run_sft_cli(m, spec, rep, d, args.timeout)] if m.kind == "sft"
                       else run_group([m], 1, rep, spec_path, d, args.timeout))

    command = "python -m bench.run " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    doc = report.build(spec, lengths, methods, results, reps=reps, command=command,
                       machine=machine_before, machine_after=report.machine_info(),
                       total_s=time.time() - t_start, quick=args.quick, isolation=isolation,
                       rounds=rounds, previous=_load(args.compare))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(doc["markdown"])
        json_path = Path(args.json) if args.json else out.with_suffix(".json")
        json_path.write_text(json.dumps(doc["data"], indent=1, default=float))
        print(f"bench: wrote {out} and {json_path}", flush=True)
    else:
        print(doc["markdown"])
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench: done in {time.time() - t_start:.0f} s", flush=True)
    failed = [n for n, rs in results.items()
              if any(not r.get("ok") and not r.get("unavailable") for r in rs)]
    return 1 if failed else 0


def rerender(json_path: Path, out: Path | None, compare: Path | None = None) -> int:
    from bench import report

    d = json.loads(json_path.read_text())
    spec = Spec.from_dict(d["spec"])
    methods = [M.Method(**m) for m in d["methods"]]
    total = d.get("total_s") or sum({r.get("process_wall_s", 0) for rs in d["runs"].values()
                                      for r in rs})
    doc = report.build(spec, d["lengths"], methods, d["runs"], reps=d["reps"],
                       command=d["command"], machine=d["machine"],
                       machine_after=d["machine_after"], total_s=total,
                       quick=d.get("quick", False), isolation=d.get("isolation", "method"),
                       rounds=d.get("rounds") or [], previous=_load(compare))
    out = out or json_path.with_suffix(".md")
    out.write_text(doc["markdown"])
    json_path.write_text(json.dumps(doc["data"], indent=1, default=float))
    print(f"bench: wrote {out} from {json_path}")
    return 0


def _load(path) -> dict | None:
    return json.loads(Path(path).read_text()) if path else None


def run_round(rnd: int, groups: dict[str, list[M.Method]], spec_path: Path, work: Path, args,
              threads: int | None, record) -> dict:
    """One round: the physical limit first, then every group once, in this round's order."""
    from bench.rounds import round_order

    info = {"round": rnd, "loadavg_start": os.getloadavg()[0], "started": time.time()}
    if not args.no_limit:
        d = work / f"limit-round{rnd}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.flops", str(spec_path), str(d / "limit.json"),
               "--threads", str(threads or 1)]
        proc = run_child(cmd, child_env(d), d / "log.txt", args.timeout)
        info["limit"] = json.loads((d / "limit.json").read_text()) \
            if proc["returncode"] == 0 else None
        if info["limit"]:
            print(f"[round {rnd + 1}] physical limit {info['limit']['limit_tokens_per_s']:,.0f} "
                  f"tok/s (peak GEMM {info['limit']['peak_gflops']:.1f} GFLOP/s)", flush=True)
    order = round_order(list(groups), rnd)
    info["order"] = order
    for g in order:
        record(run_group(groups[g], 1, rnd, spec_path, work / f"{_safe(g)}-round{rnd}",
                         args.timeout))
    info.update(loadavg_end=os.getloadavg()[0], ended=time.time())
    return info


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


if __name__ == "__main__":
    sys.exit(main())
