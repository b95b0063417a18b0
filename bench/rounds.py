"""Interleaved rounds: every method once per round, in a rotated order, so slow drift of the
machine (other tenants, thermal state, the host's frequency) lands on every method alike. A ratio
is computed inside each round (both runs minutes apart at most) and reported as the median of the
per-round ratios with its min-max spread; a second run agrees with the first when its median lies
inside the first run's spread."""

from __future__ import annotations

import math
import statistics

from bench import methods as M

TRL_PEERS = ("trl_defaults", "trl_packing", "trl_padding_free")


def round_order(names: list[str], rnd: int) -> list[str]:
    """Round 0: A B C D; round 1: B C D A; ...: each method takes every position in turn."""
    if not names:
        return []
    k = rnd % len(names)
    return names[k:] + names[:k]


def per_round(results: dict[str, list[dict]], name: str, key: str = "tokens_per_s") -> dict:
    return {r["rep"]: r[key] for r in results.get(name, [])
            if r.get("ok") and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}


def stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "values": xs}


def ratio_per_round(results: dict, num: str, den: str) -> dict | None:
    a, b = per_round(results, num), per_round(results, den)
    return stats([a[r] / b[r] for r in sorted(set(a) & set(b)) if b[r]])


def speed_factor(run: dict, limit: dict) -> float:
    """How fast the machine was while this run ran, relative to when the round's limit was
    measured: the median-GEMM probe bracketing the run / the same probe in the limit's process
    (bench/flops.py). 1.0 for results recorded without the probe."""
    probe, ref = run.get("machine_gflops"), (limit.get("reference") or {}).get("gflops")
    if not probe or not ref or any(not (isinstance(x, (int, float)) and x > 0) for x in probe):
        return 1.0
    return statistics.fmean(probe) / ref


def _runs_with_limit(results: dict, name: str, rounds: list[dict]):
    lim = {r["round"]: r["limit"] for r in rounds if r.get("limit")}
    for run in results.get(name, []):
        x = run.get("tokens_per_s")
        if (run.get("ok") and run.get("rep") in lim and isinstance(x, (int, float))
                and math.isfinite(x)):
            yield run, lim[run["rep"]]


def limit_fraction(results: dict, name: str, rounds: list[dict]) -> dict | None:
    """tokens/s of `name` / the physical limit of its round, at the machine speed it ran at."""
    return stats([run["tokens_per_s"] / (lim["limit_tokens_per_s"] * speed_factor(run, lim))
                  for run, lim in _runs_with_limit(results, name, rounds)])


def mfu(results: dict, name: str, rounds: list[dict]) -> dict | None:
    """Model FLOPs per token x tokens/s / the peak GEMM throughput of its round, at the machine
    speed it ran at."""
    return stats([run["tokens_per_s"] * lim["flops_per_token"]
                   / (lim["peak_gflops"] * 1e9 * speed_factor(run, lim))
                   for run, lim in _runs_with_limit(results, name, rounds)])


def speed_spread(results: dict, rounds: list[dict]) -> dict[int, dict | None]:
    """Per round: the spread of the machine-speed factors of the runs in it."""
    out = {}
    for r in rounds:
        if not r.get("limit"):
            continue
        out[r["round"]] = stats([speed_factor(run, r["limit"]) for rs in results.values()
                                 for run in rs if run.get("rep") == r["round"]
                                 and run.get("machine_gflops")])
    return out


def lands_inside(old: dict | None, new: dict | None) -> bool | None:
    """A second run agrees with the first when its median lies inside the first's spread."""
    return None if not (old and new) else old["min"] <= new["median"] <= old["max"]


def best_trl(results: dict) -> str | None:
    meds = {n: statistics.median(per_round(results, n).values())
            for n in TRL_PEERS if per_round(results, n)}
    return max(meds, key=meds.get) if meds else None


def key_ratios(results: dict, rounds: list[dict],
               peers: tuple[str, ...] = ()) -> dict[str, dict | None]:
    """The ratios the goals are judged on, each a per-round distribution; `peers` adds
    sft_scale / each named TRL method (two runs whose best TRL method differs compare both)."""
    out = {}
    best = best_trl(results)
    if best:
        out[f"sft_scale / TRL's best ({best})"] = ratio_per_round(results, "sft_scale", best)
    for peer in peers:
        out[f"sft_scale / {peer}"] = ratio_per_round(results, "sft_scale", peer)
    out["sft_scale / trl_defaults (fp32)"] = ratio_per_round(results, "sft_scale", "trl_defaults")
    out["sft_scale / bare_step"] = ratio_per_round(results, "sft_scale", M.CEILING)
    out["sft_scale / transformers_trainer"] = ratio_per_round(results, "sft_scale", M.BASELINE)
    out["sft_scale / physical limit"] = limit_fraction(results, "sft_scale", rounds)
    out["sft_scale CPU MFU"] = mfu(results, "sft_scale", rounds)
    return out


def goal_verdict(lo: float, hi: float, target: float | None, span: str = "spread") -> str:
    """A goal judged on a range of a ratio (one run's min-max over rounds, or the pooled
    interval of several runs): met only when the whole range is at or above the target, not
    met when it is all below, and on the line otherwise (the host's drift between rounds is
    then as large as the distance to the target, and one more round could go either way)."""
    if target is None:
        return "–"
    if lo >= target:
        return f"**met**: the whole {span} is at or above it"
    if hi < target:
        return f"**not met**: the whole {span} is below it"
    return f"**on the line**: the {span} holds the target"


# Issue 20's speed goals: sft_scale over TRL's best configuration, and over TRL's fp32 defaults.
TRL_BEST_TARGET, TRL_DEFAULTS_TARGET = 2.0, 3.0
GOALS = {"TRL's best": (TRL_BEST_TARGET, f"≥ {TRL_BEST_TARGET:g}x"),
         "trl_defaults": (TRL_DEFAULTS_TARGET, f"≥ {TRL_DEFAULTS_TARGET:g}x")}


def goal_rows(results: dict, rounds: list[dict]) -> list[tuple[str, dict | None, str, str]]:
    """(label, per-round distribution, target, verdict) for every key ratio of one run; the
    ratios without a goal get no target and the verdict "–"."""
    rows = []
    for label, s in key_ratios(results, rounds).items():
        tgt = next((t for k, t in GOALS.items() if k in label), None)
        verdict = goal_verdict(s["min"], s["max"], tgt[0]) if s and tgt else "–"
        rows.append((label, s, tgt[1] if tgt else "", verdict))
    return rows


def fmt(s: dict | None, pct: bool = False) -> str:
    if not s:
        return "–"
    f = (lambda x: f"{x:.0%}") if pct else (lambda x: f"{x:.2f}x")
    return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def fmt_key(label: str, s: dict | None) -> str:
    """A key ratio formatted as key_ratios labels it: the limit and MFU in percent."""
    return fmt(s, pct="limit" in label or "MFU" in label)


def summary_line(data: dict) -> str:
    """One line of the key ratios (python -m bench.run --summary)."""
    runs, rounds = data["runs"], data.get("rounds") or []
    parts = []
    for label, s in key_ratios(runs, rounds).items():
        if s:
            parts.append(f"{label}: {fmt_key(label, s)}")
    n = max((len(per_round(runs, "sft_scale")),), default=0)
    return (f"bench ({n} interleaved rounds, median [min-max] of per-round ratios; "
            f"{data['machine'].get('date', '?')}): " + "; ".join(parts))


def small_matrices(limit: dict) -> str:
    """Whether the model's matrix sizes are what limits a trainer: each term's throughput at its
    own shapes against a large square GEMM timed in the same process."""
    sq = limit["square_gemm"]
    n = "x".join(map(str, sq["shape"]))
    terms = sorted(limit["terms"].items(), key=lambda kv: -kv[1]["seconds"])
    flops = sum(v["gflops"] for _, v in terms)
    parts = "; ".join(f"{k} {v['gflop_per_s'] / sq['gflops']:.0%} ({v['gflops'] / flops:.0%} "
                      "of the FLOPs)" for k, v in terms)
    return (f"**Small matrices?** A {n} GEMM, large enough for the BLAS to reach its "
            f"steady-state speed, ran at {sq['gflops']:.1f} GFLOP/s in the limit's process. Each "
            f"term's shapes reach, of that: {parts}.\n")


def markdown(results: dict, methods: list[M.Method], rounds: list[dict],
             previous: dict | None) -> list[str]:
    L = []
    w = L.append
    if not rounds:
        return L
    w("## Interleaved rounds: per-round ratios and the physical limit\n")
    w(f"{len(rounds)} rounds; in each, every method ran once in its own fresh process, in a "
      "rotated order (each method takes every position in turn), and the physical limit was "
      "measured at the start of the round (`bench/flops.py`). Each ratio is computed within "
      "a round and reported as the **median [min–max] over rounds**.\n")
    lim0 = next((r["limit"] for r in rounds if r.get("limit")), None)
    if lim0:
        w(f"**The physical limit.** The bench's LoRA epoch must do "
          f"{lim0['flops'] / 1e9:,.1f} GFLOP ({lim0['flops_per_token'] / 1e6:.1f} MFLOP per "
          f"real token, {lim0['real_tokens']:,} real tokens, {lim0['trained_tokens']:,} "
          "trained), counted exactly for the bench model (`bench/flops.py` states the formula: "
          "frozen forward + input gradients, LoRA forward/backward, causal attention pairs, "
          "the LM head and the last layer's own-position work (q/o projections, MLP, the "
          "attention of its queries) at trained positions only). Each term at the GEMM "
          f"throughput this CPU reaches at that term's own shape ({lim0['threads']} thread(s), "
          "fp32, best of several timings, in the faster of A B and (B^T A^T)^T) gives the "
          "least time any trainer can take.\n")
        w("| term | GFLOP | GFLOP/s at its shapes | seconds at the limit |\n|---|---|---|---|")
        for k, v in lim0["terms"].items():
            w(f"| {k} | {v['gflops']:,.3g} | {v['gflop_per_s']:.1f} | {v['seconds']:.3g} |")
        w("")
        if lim0.get("square_gemm"):
            w(small_matrices(lim0))
    speeds = speed_spread(results, rounds)
    probe = next((r["limit"]["reference"] for r in rounds
                  if (r.get("limit") or {}).get("reference")), None)
    if probe:
        # Runs before 2026-12-02 05:50 UTC recorded one probe window in the limit's process.
        where = (" (two windows, before and after its throughput measurement: the faster "
                 "counts, as its best-of throughputs ignore a moment of contention)"
                 if probe.get("probes") else "")
        w(f"**The machine's speed while each method ran.** The limit is measured once per round, "
          f"but the machine's speed drifts within a round (other tenants, the host's clock). So "
          f"one GEMM, the model's largest ({'x'.join(map(str, probe['shape']))}), is timed as "
          f"the median of many calls in the limit's process{where} and again just before and "
          "just after every method's run, in that method's process. A method's limit and peak "
          "are scaled by its own probe / the limit's probe; the last column shows that "
          "factor's spread over the runs of each round.\n")
    w("| round | order | load avg start → end | limit tok/s | peak GEMM GFLOP/s | "
      "probe GFLOP/s | machine speed while methods ran (x the limit's) |")
    w("|---|---|---|---|---|---|---|")
    for r in rounds:
        lim = r.get("limit") or {}
        sp = speeds.get(r["round"])
        w(f"| {r['round'] + 1} | {' → '.join(r['order'])} | {r['loadavg_start']:.2f} → "
          f"{r['loadavg_end']:.2f} | {lim.get('limit_tokens_per_s', float('nan')):,.0f} | "
          f"{lim.get('peak_gflops', float('nan')):.1f} | "
          f"{(lim.get('reference') or {}).get('gflops', float('nan')):.1f} | "
          f"{fmt(sp) if sp else '– (not probed)'} |")
    w("")
    w("Every method against the limit of its own round, at the machine speed it ran at: "
      "**of limit** = tok/s / (limit tok/s x speed factor); **CPU MFU** = model FLOPs per token "
      "x tok/s / (peak GEMM FLOP/s x speed factor); **vs ceiling** = tok/s / bare_step's tok/s "
      "in the same round.\n")
    w("| method | tok/s per round | of limit | CPU MFU | vs ceiling | vs baseline |")
    w("|---|---|---|---|---|---|")
    for m in methods:
        pr = per_round(results, m.name)
        if not pr or m.name == "bare_bf16":
            continue
        vals = " / ".join(f"{pr[k]:,.0f}" for k in sorted(pr))
        w(f"| {m.name} | {vals} | {fmt(limit_fraction(results, m.name, rounds), True)} | "
          f"{fmt(mfu(results, m.name, rounds), True)} | "
          f"{fmt(ratio_per_round(results, m.name, M.CEILING))} | "
          f"{fmt(ratio_per_round(results, m.name, M.BASELINE))} |")
    w("")
    w("### Goals (issue 20), judged on the per-round spread\n")
    w("A goal is met when every round of this run meets it; `python -m bench.pool` judges it on "
      "all the rounds of several runs of the same code.\n")
    w("| ratio | median [min–max] | target | |\n|---|---|---|---|")
    for label, s, target, verdict in goal_rows(results, rounds):
        w(f"| {label} | {fmt_key(label, s)} | {target} | {verdict} |")
    w("")
    if previous:
        L.extend(reproduction(previous, results, rounds))
        L.extend(method_comparison(previous, results, methods, rounds))
    return L


def reproduction(previous: dict, results: dict, rounds: list[dict]) -> list[str]:
    """The key ratios of an earlier run and this one, with whether this one's median lies
    inside the earlier run's spread."""
    L = []
    w = L.append
    w("### Reproduction: this run against an earlier one\n")
    w(f"Earlier run: {previous['machine'].get('date', '?')}, git "
      f"{previous['machine'].get('git_commit', '?')}, command `{previous.get('command')}`. "
      "A ratio reproduces when this run's median lies inside the earlier run's min–max "
      "spread.\n")
    w("| ratio | earlier run | this run | reproduces? |\n|---|---|---|---|")
    # Which TRL method is fastest can differ between runs: then each run's best is also
    # compared by name, in both runs.
    bests = (best_trl(previous["runs"]), best_trl(results))
    peers = tuple(dict.fromkeys(b for b in bests if b)) if bests[0] != bests[1] else ()
    old = key_ratios(previous["runs"], previous.get("rounds") or [], peers)
    new = key_ratios(results, rounds, peers)
    for label in dict.fromkeys(list(old) + list(new)):
        o, n = old.get(label), new.get(label)
        ok = {None: "–", True: "yes", False: "**no**: outside the spread"}[lands_inside(o, n)]
        w(f"| {label} | {fmt_key(label, o)} | {fmt_key(label, n)} | {ok} |")
    w("")
    return L


def method_comparison(previous: dict, results: dict, methods: list[M.Method],
                      rounds: list[dict]) -> list[str]:
    """Every method of both runs side by side: tok/s, the ratio to the bare step and CPU MFU,
    each median [min-max] over that run's rounds."""
    old_runs, old_rounds = previous["runs"], previous.get("rounds") or []
    names = [m.name for m in methods if per_round(results, m.name) or per_round(old_runs, m.name)]
    if not names:
        return []
    L = ["Every method, both runs side by side (median [min–max] over each run's rounds; "
         "\"reproduces\" when this run's median lies inside the earlier run's spread):\n",
         "| method | tok/s, earlier | tok/s, this run | vs bare_step, earlier | "
         "vs bare_step, this run | CPU MFU, earlier | CPU MFU, this run | reproduces? |",
         "|---|---|---|---|---|---|---|---|"]

    def tps(runs, name):
        return stats(list(per_round(runs, name).values()))

    def agrees(o, n):
        return {None: "–", True: "yes", False: "no"}[lands_inside(o, n)]

    def f0(s):
        return "–" if not s else f"{s['median']:,.0f} [{s['min']:,.0f}–{s['max']:,.0f}]"

    for name in names:
        cells = [(tps(old_runs, name), tps(results, name)),
                 (ratio_per_round(old_runs, name, M.CEILING),
                  ratio_per_round(results, name, M.CEILING)),
                 (mfu(old_runs, name, old_rounds), mfu(results, name, rounds))]
        verdict = "; ".join(f"{what} {agrees(o, n)}" for what, (o, n) in
                            zip(("tok/s", "vs bare", "MFU"), cells, strict=True))
        (ot, nt), (ob, nb), (om, nm) = cells
        L.append(f"| {name} | {f0(ot)} | {f0(nt)} | {fmt(ob)} | {fmt(nb)} | {fmt(om, True)} | "
                 f"{fmt(nm, True)} | {verdict} |")
    L.append("")
    return L
