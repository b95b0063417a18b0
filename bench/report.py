"""Medians, ratios and the markdown of docs/BENCHMARKS.md."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from bench import methods as M
from bench.data import length_summary
from bench.rounds import markdown as interleaved_markdown
from bench.spec import Spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets"]


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB"
    except OSError:
        pass
    versions = {}
    from importlib.metadata import PackageNotFoundError, version
    for p in PACKAGES:
        try:
            versions[p] = version(p)
        except PackageNotFoundError:
            versions[p] = "not installed"
    threads = None  # filled in from the workers' results (importing torch here costs seconds)
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "sft_scale", "bench"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "torch_threads": threads,
            "python": platform.python_version(), "os": platform.platform(), "versions": versions,
            "git_commit": commit + (" (with uncommitted changes in sft_scale/ or bench/)"
                                    if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg": os.getloadavg()}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _median(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def aggregate(results: dict[str, list[dict]]) -> dict[str, dict]:
    agg = {}
    for name, runs in results.items():
        ok = [r for r in runs if r.get("ok")]
        a = {"reps": len(runs), "ok": len(ok),
             "unavailable": next((r["error"] for r in runs if r.get("unavailable")), None),
             "errors": [r.get("error", "").strip().splitlines()[-1][:300]
                        for r in runs if not r.get("ok") and r.get("error")
                        and not r.get("unavailable")]}
        for k in ("tokens_per_s", "padding_efficiency", "peak_rss_mb", "wall_s", "final_loss",
                  "startup_s", "process_wall_s", "process_peak_rss_mb", "cores_busy",
                  "timed_s", "train_s", "fp32_tokens_per_s", "bf16_tokens_per_s",
                  "bf16_slowdown"):
            a[k] = _median([r.get(k) for r in ok])
        a["tokens_per_s_reps"] = [r.get("tokens_per_s") for r in ok]
        # Real tokens per CPU-second of the process: the same ranking as tokens/s on a quiet
        # machine, and robust to other jobs taking the cores (DataLoader worker processes'
        # CPU time is not counted, which flatters num_workers > 0).
        a["tokens_per_cpu_s"] = _median([r["tokens_per_s"] / r["cores_busy"] for r in ok
                                         if r.get("cores_busy") and r.get("tokens_per_s")])
        a["examples"] = sorted({r.get("examples") for r in ok if r.get("examples") is not None})
        a["distinct_examples"] = sorted({r.get("distinct_examples") for r in ok
                                         if r.get("distinct_examples") is not None})
        a["steps"] = sorted({r.get("steps") for r in ok})
        a["real_tokens"] = sorted({r.get("real_tokens") for r in ok})
        a["notes"] = sorted({r["note"] for r in ok if r.get("note")})
        agg[name] = a
    return agg


def _f(x, fmt="{:,.0f}", none="–"):
    return none if x is None else fmt.format(x)


def _ratio(a, b):
    return a / b if a is not None and b else None


def build(spec: Spec, lengths: list[int], methods: list[M.Method], results: dict,
          reps: int, command: str, machine: dict, machine_after: dict, total_s: float,
          quick: bool = False, isolation: str = "method", rounds: list[dict] | None = None,
          previous: dict | None = None) -> dict:
    agg = aggregate(results)
    machine = dict(machine, torch_threads=next(
        (r["torch_threads"] for rs in results.values() for r in rs if r.get("torch_threads")),
        machine.get("torch_threads")))
    byname = M.by_name(methods)
    base = agg.get(M.BASELINE, {})
    ceil = agg.get(M.CEILING, {})
    b_tps, c_tps = base.get("tokens_per_s"), ceil.get("tokens_per_s")
    b_rss = base.get("peak_rss_mb")
    c_cpu = ceil.get("tokens_per_cpu_s")
    t = spec.train
    L = []
    w = L.append
    w("# Benchmarks: sft_scale vs TRL vs transformers Trainer vs the bare step (CPU)\n")
    w("Generated by `bench/run.py`; every number below comes from the run described here. "
      "Performance is measured here, never asserted in tests.\n")
    if quick:
        w("> **--quick smoke run**: a tiny model and 1 rep; these numbers mean nothing.\n")
    busy = [a["cores_busy"] for a in agg.values() if a.get("cores_busy")]
    threads = machine.get("torch_threads")
    if busy and threads == 1 and min(busy) >= 0.9:
        # one torch thread per run: a run that got its core for the whole timed span shows
        # ~1.0 CPU-s per wall-s; other jobs on the machine would pull that figure down
        w(f"> Quiet machine: every method's runs kept their core busy (cores busy "
          f"{min(busy):.2f}-{max(busy):.2f}, one torch thread), so no other job took CPU time "
          f"from them (load average {machine['loadavg'][0]:.1f} at the start, "
          f"{machine_after['loadavg'][0]:.1f} at the end). Ratios taken in the same run are "
          "still the point: absolute tokens/s depend on the CPU.\n")
    else:
        w("> These numbers were taken on a shared machine while other jobs were running (load "
          f"average {machine['loadavg'][0]:.1f} at the start, "
          f"{machine_after['loadavg'][0]:.1f} at the end; see the cores-busy column): absolute "
          "tokens/s are noisy; ratios taken in the same run, and the per-CPU-second columns, "
          "are the point. Re-run the command below on a quiet machine.\n")
    w("## Command\n")
    w("```bash\n.venv/bin/" + command.replace("python -m", "python -m", 1) + "\n```\n")
    iso = {"method": "interleaved rounds: in each round every method runs once in its own "
                     "fresh process (sft_scale's grouped switches share one), in a rotated order",
           "rep": "one fresh process per method and rep; sft_scale through its CLI",
           "none": "every method in one process (smoke test: peak RSS is not per method)"}
    w(f"Total time: {total_s / 60:.1f} min for {sum(len(v) for v in results.values())} runs, "
      f"{reps} {'round' if rounds else 'rep'}(s) per method; isolation: "
      f"{iso.get(isolation, isolation)}.\n")
    w("## Machine\n")
    v = machine["versions"]
    w(f"- CPU: {machine['cpu']}, {machine['cores']} cores (torch threads: "
      f"{machine['torch_threads']}), memory {machine['memory']}")
    w(f"- {machine['os']}, Python {machine['python']}")
    w("- " + ", ".join(f"{k} {v[k]}" for k in PACKAGES))
    w(f"- sft_scale at git {machine['git_commit'] or '?'}; date {machine['date']}\n")

    ls = length_summary(lengths)
    w("## Setup (identical for every method)\n")
    m = spec.model
    w(f"- Model: random-init Llama, {spec.parameters:,} parameters (hidden {m.hidden_size}, "
      f"{m.num_hidden_layers} layers, intermediate {m.intermediate_size}, "
      f"{m.num_attention_heads} heads / {m.num_key_value_heads} KV heads, vocabulary "
      "of the builtin tokenizer), fp32, SDPA attention, built from a config (no download).")
    w(f"- LoRA r={t.lora_r}, alpha={t.lora_alpha}, dropout={t.lora_dropout}, target "
      f"{t.lora_target}; AdamW lr {t.learning_rate}, {t.lr_scheduler} schedule, no warmup, "
      f"weight decay {t.weight_decay}, grad-norm clip {t.max_grad_norm}.")
    w(f"- Data: {ls['n']} Alpaca-like prompt/completion examples generated by the bench "
      f"(seed {spec.data.seed}; Alpaca prompt template, log-normal instruction/input/output "
      f"lengths): {spec.real_tokens:,} tokens, per example mean {ls['mean']}, median "
      f"{ls['p50']}, p90 {ls['p90']}, max {ls['max']} (max_seq_len {spec.data.max_seq_len}); "
      "loss on the completion and EOS only. TRL's own tokenization gives the same ids as "
      "sft_scale's (checked on every example).")
    w(f"- Steps: {t.steps} optimizer steps x global batch {t.global_batch} (micro-batch "
      f"{t.micro_batch_size} x accumulation {t.gradient_accumulation_steps}) = one epoch: every "
      f"method trains each of the {t.n_examples} examples exactly once. The first "
      f"{t.warmup_steps_excluded} step(s) are warm-up and not timed.")
    w(f"- Ceiling (bare_step): the same PEFT model on random rows of {t.micro_batch_size} x "
      f"{spec.mean_example_len} tokens (micro-batch x mean example length: the same tokens per "
      "micro-batch as the data, no padding, no mask, attention within each row), forward + "
      "backward + AdamW, no data pipeline, measured in the same run. bare_packed_row puts the "
      f"same tokens in one causal row of 1 x {spec.packed_row_len} (attention across examples, "
      "as packing without boundaries would).\n")
    w("Columns: **real tok/s** = non-pad tokens (attention-mask ones; all tokens of packed rows) "
      "trained per second over the timed steps (medians over reps); **pad eff** = real tokens / "
      "token slots computed; **peak RSS** = high-water resident memory of the rep (wait4 "
      "ru_maxrss, or VmHWM reset per rep); **wall** = the rep from building the model to the "
      "end of saving (with --isolation rep: the whole process); **loss** = the "
      "last step's training loss (a sanity check: ~ln(vocab) for a random model; each method "
      "shuffles differently); **examples** = sequences trained (distinct ones in brackets when "
      "some repeat); **cores busy** = CPU seconds of the process per wall second over the timed "
      f"steps (torch uses {machine['torch_threads']} threads: a clearly lower figure means "
      "other jobs took the cores during that method).\n")

    def shared_rss(name):  # ran in one process after other runs: its peak RSS carries theirs
        mm = byname.get(name)
        return bool(mm is not None and mm.group and isolation == "method")

    def row(name):
        a = agg.get(name)
        mm = byname.get(name)
        if mm is not None and not mm.available:
            return f"| {name} | {mm.why_not} | | | | | | | | | | | |"
        if a and not a["ok"] and a.get("unavailable"):
            return f"| {name} | {a['unavailable'][:200]} | | | | | | | | | | | |"
        if not a or not a["ok"]:
            err = (a or {}).get("errors") or ["did not run"]
            return f"| {name} | failed: {err[0][:160]} | | | | | | | | | | | |"
        tps = a["tokens_per_s"]
        reps_s = " / ".join(_f(x) for x in a["tokens_per_s_reps"])
        ex = ", ".join(str(x) for x in a["examples"]) or "n/a"
        if a["distinct_examples"] and a["distinct_examples"] != a["examples"]:
            ex += " (" + ", ".join(str(x) for x in a["distinct_examples"]) + " distinct)"
        shared = "†" if shared_rss(name) else ""
        return (f"| {name} | {_f(tps)} ({reps_s}) | {_f(_ratio(tps, b_tps), '{:.2f}x')} | "
                f"{_f(_ratio(tps, c_tps), '{:.0%}')} | {_f(a['padding_efficiency'], '{:.0%}')} | "
                f"{_f(a['peak_rss_mb'])}{shared} | "
                f"{_f(_ratio(a['peak_rss_mb'], b_rss), '{:.2f}x')}{shared} | "
                f"{_f(a['wall_s'], '{:.1f}')} | {_f(a['final_loss'], '{:.3f}')} | {ex} | "
                f"{_f(a['cores_busy'], '{:.2f}')} | {_f(a['tokens_per_cpu_s'])} | "
                f"{_f(_ratio(a['tokens_per_cpu_s'], c_cpu), '{:.0%}')} |")

    head = ("| method | real tok/s median (reps) | vs baseline | vs ceiling | pad eff | "
            "peak RSS MB | RSS vs baseline | wall s | loss | examples | cores busy | "
            "tok per CPU-s | per CPU-s vs ceiling |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    main_names = [M.CEILING, M.BASELINE, "trl_defaults", "trl_packing", "trl_padding_free",
                  "sft_scale"]
    w("## Results\n")
    w(head)
    for n in main_names:
        if n in results or n in byname:
            w(row(n))
    w("")
    switches = [mm.name for mm in methods if mm.role == "switch"]
    if switches:
        w("### sft_scale switches (each flips one setting from sft_scale's default)\n")
        w(head)
        w(row("sft_scale"))
        for n in switches:
            w(row(n))
        w("")
        if any(shared_rss(n) for n in switches):
            w("† These switches ran one after another in one process (`--isolation method`; "
              "`--no-group` gives each its own): glibc keeps the heap an earlier run grew, so "
              "their peak RSS carries the earlier runs' and is not comparable. The rows without "
              "† ran in a fresh process each.\n")
    diags = [mm.name for mm in methods if mm.role == "diagnostic" and mm.name != "bare_bf16"]
    if diags:
        w("### Diagnostics (rungs of the ladder below, not contenders)\n")
        w(head)
        for n in diags:
            w(row(n))
        w("")
    L.extend(interleaved_markdown(results, methods, rounds or [], previous))
    w("Method definitions:\n")
    for mm in methods:
        w(f"- **{mm.name}**: {mm.about}")
    w("")
    n_ex = spec.train.n_examples
    repeats = [n for n, a in agg.items() if a.get("distinct_examples")
               and min(a["distinct_examples"]) < n_ex]
    if repeats:
        w(f"**Not the same examples:** {', '.join(repeats)} trained fewer than the {n_ex} "
          "distinct examples of the epoch (some examples repeated, others never seen). "
          "sft_scale's length-grouped sampler (`data.group_by_length: true`, the default "
          "without packing) sorts a window of 32 global batches of the example stream; when "
          "the data set is smaller than that window, the window holds several epochs and a "
          "batch can hold copies of one example, which also inflates its padding "
          "efficiency. Compare the `group_by_length=false` and `packing=true` rows.\n")
    notes = [(n, a["notes"]) for n, a in agg.items() if a.get("notes")]
    for n, ns in notes:
        w(f"- note ({n}): {'; '.join(ns)}")

    # ---- goals
    w("\n## Goals (issue 10), as measured in this run\n")
    ours = {n: a for n, a in agg.items() if (n == "sft_scale" or n.startswith("sft_scale["))
            and a.get("tokens_per_s")}

    def valid(n):  # trained each example of the epoch once (or cannot tell)
        d = ours[n].get("distinct_examples")
        return not d or min(d) >= n_ex

    valid_ours = [n for n in ours if valid(n)]
    best_ours = max(valid_ours, key=lambda n: ours[n]["tokens_per_s"]) if valid_ours else None
    trl = {n: agg[n] for n in ("trl_defaults", "trl_packing", "trl_padding_free")
           if agg.get(n, {}).get("tokens_per_s")}
    best_trl = max(trl, key=lambda n: trl[n]["tokens_per_s"]) if trl else None
    lo_trl = min(trl, key=lambda n: trl[n]["peak_rss_mb"] or 1e18) if trl else None
    probe = agg.get("bare_bf16", {})
    slow = probe.get("bf16_slowdown")

    def goal(label, value, target, ok, cpu_value="–"):
        state = "–" if ok is None else ("**met**" if ok else "**not met**")
        w(f"| {label} | {value} | {cpu_value} | {target} | {state} |")

    def cpu(n):
        return agg.get(n, {}).get("tokens_per_cpu_s")

    w("Checked for sft_scale's default config and for its fastest configuration that trains the "
      "same examples as everyone else (a switch row above). Ratios of medians; met/not met "
      "is judged on tokens/s, the per-CPU-second column is the same ratio corrected for "
      "other jobs on the machine.\n")
    w("| goal | measured | per CPU-s | target | |\n|---|---|---|---|---|")
    for n in dict.fromkeys(filter(None, ["sft_scale", best_ours])):
        if n not in ours:
            continue
        a = ours[n]
        tag = n + ("" if valid(n) else " (repeats examples: not comparable)")
        r = _ratio(a["tokens_per_s"], c_tps)
        goal(f"{tag}: real tok/s vs ceiling", _f(r, "{:.0%}"), ">= 90%",
             None if r is None else r >= 0.9, _f(_ratio(cpu(n), c_cpu), "{:.0%}"))
        if best_trl:
            r = _ratio(a["tokens_per_s"], trl[best_trl]["tokens_per_s"])
            goal(f"{tag}: vs TRL's best ({best_trl})", _f(r, "{:.2f}x"), ">= 2x",
                 None if r is None else r >= 2, _f(_ratio(cpu(n), cpu(best_trl)), "{:.2f}x"))
        if "trl_defaults" in trl:
            r = _ratio(a["tokens_per_s"], trl["trl_defaults"]["tokens_per_s"])
            goal(f"{tag}: vs trl_defaults (fp32)", _f(r, "{:.2f}x"), ">= 3x",
                 None if r is None else r >= 3, _f(_ratio(cpu(n), cpu("trl_defaults")),
                                                   "{:.2f}x"))
            if slow and r:
                goal(f"{tag}: vs TRL's true defaults (use_cpu + bf16 autocast; estimated as "
                     "trl_defaults / the bare_bf16 slowdown)", _f(r * slow, "{:.0f}x"),
                     ">= 3x", r * slow >= 3)
        if lo_trl and a.get("peak_rss_mb") and not shared_rss(n):
            r = _ratio(a["peak_rss_mb"], trl[lo_trl]["peak_rss_mb"])
            goal(f"{tag}: peak RSS vs TRL's lowest ({lo_trl})", _f(r, "{:.2f}x"), "<= 1.00x",
                 None if r is None else r <= 1.0)
        pe = a.get("padding_efficiency")
        goal(f"{tag}: padding efficiency", _f(pe, "{:.0%}"), ">= 95%",
             None if pe is None else pe >= 0.95)
    w("")
    gc = ours.get("sft_scale[gradient_checkpointing=true]")
    if best_trl and c_tps:
        bound = _ratio(c_tps, trl[best_trl]["tokens_per_s"])
        w(f"How far the speed goals can go: a trainer running at exactly the ceiling would be "
          f"{_f(bound, '{:.2f}x')} {best_trl} and "
          f"{_f(_ratio(c_tps, trl.get('trl_defaults', {}).get('tokens_per_s')), '{:.2f}x')} "
          "trl_defaults in this run; beyond that only computing less than the bare step does "
          "(sft_scale's chunked loss skips the logits of untrained positions, which with a "
          "vocabulary as small as this model's saves little, and its trim_last_layer the last "
          "layer's q/o projections and MLP there).\n")
    if gc and best_trl and lo_trl:
        w(f"At TRL's own memory trade-off (gradient checkpointing on, as TRL's default): "
          f"sft_scale[gradient_checkpointing=true] runs at "
          f"{_f(_ratio(gc['tokens_per_s'], trl[best_trl]['tokens_per_s']), '{:.2f}x')} "
          f"{best_trl}'s tokens/s with "
          f"{_f(_ratio(gc.get('peak_rss_mb'), trl[lo_trl]['peak_rss_mb']), '{:.2f}x')} "
          f"{lo_trl}'s peak RSS.\n")

    # ---- ladder
    w("## Where TRL's gap to the ceiling goes\n")
    ladder = [
        (M.CEILING, "ceiling", "bare step, full rows of the data's tokens"),
        ("bare_padded", "padding", "the same bare step on Trainer-style padded batches"),
        (M.BASELINE, "Trainer machinery", "dataloader, collator, accelerate wrapper, "
         "scheduler, callbacks, fused AdamW"),
        ("trl_no_gc", "TRL's additions", "its collator, fused chunked LM head with entropy/"
         "accuracy metrics (an extra `.item()` per micro-batch), token counting"),
        ("trl_defaults", "gradient checkpointing", "TRL's default; every layer's forward "
         "runs twice"),
    ]
    w("Each rung changes one thing from the rung above; the factor is the slowdown it causes "
      "(median tokens/s of the rung above / this rung).\n")
    w("| rung | method | real tok/s | pad eff | factor | cumulative vs ceiling | "
      "tok per CPU-s | factor per CPU-s |\n|---|---|---|---|---|---|---|---|")
    prev = prev_cpu = None
    factors = []
    for name, short, label in ladder:
        a = agg.get(name, {})
        tps = a.get("tokens_per_s")
        f = _ratio(prev, tps) if prev else None
        if f:
            fcpu = _ratio(prev_cpu, a.get("tokens_per_cpu_s")) if prev_cpu else None
            factors.append((f, short, name, fcpu))
        tc = a.get("tokens_per_cpu_s")
        fc = _ratio(prev_cpu, tc) if prev_cpu else None
        w(f"| {short}: {label} | {name} | {_f(tps)} | "
          f"{_f(a.get('padding_efficiency'), '{:.0%}')} | "
          f"{_f(f, '{:.2f}x')} | {_f(_ratio(c_tps, tps), '{:.2f}x')} | {_f(tc)} | "
          f"{_f(fc, '{:.2f}x')} |")
        prev = tps if tps else prev
        prev_cpu = tc if tc else prev_cpu
    d_tps = agg.get("trl_defaults", {}).get("tokens_per_s")
    if slow:
        est = d_tps / slow if d_tps else None
        w(f"| bf16 autocast (TRL's default `bf16=True`), emulated on this CPU | "
          f"trl_defaults / bare_bf16 factor | {_f(est, '{:,.1f}')} (estimated) | | "
          f"{slow:.1f}x | {_f(_ratio(c_tps, est), '{:,.0f}x')} | | |")
    w("")
    if slow:
        w(f"bare_bf16 probe: the bare step on a 1 x {spec.probe_tokens} row runs at "
          f"{_f(probe.get('fp32_tokens_per_s'))} tok/s in fp32 and "
          f"{_f(probe.get('bf16_tokens_per_s'), '{:,.1f}')} tok/s under bf16 autocast "
          f"({slow:.1f}x slower): this CPU has no AVX-512-BF16/AMX, so bf16 matmuls are "
          "emulated. TRL's `SFTConfig` defaults to `bf16=True`; on a machine without a GPU that "
          "default does not even start (\"Your setup doesn't support bf16/gpu. You need to "
          "assign use_cpu...\"), and with `use_cpu=True` it trains under emulated bf16 "
          "autocast. The trl_defaults row pins fp32 so the comparison is about the trainer; "
          "`trl_defaults_bf16` (`--methods all`) runs the true default with use_cpu=True.\n")
    if factors:
        if slow:
            factors.append((slow, "bf16 autocast (with use_cpu=True)", "bare_bf16", None))
        factors.sort(key=lambda x: -x[0])
        w("In this run, by size: " + "; ".join(
            f"{label} {f:.2f}x" + (f" ({fc:.2f}x per CPU-s)" if fc else "") + f" ({name})"
            for f, label, name, fc in factors) + ". Factors below 1.00x mean the rung was "
          "faster than the one above it (noise, or a cheaper kernel).\n")
    tpn = agg.get("trl_packing_no_gc", {}).get("tokens_per_s")
    tp = agg.get("trl_packing", {}).get("tokens_per_s")
    bpr = agg.get("bare_packed_row", {}).get("tokens_per_s")
    if tp and tpn:
        w(f"Packing in TRL: trl_packing_no_gc reaches {_f(_ratio(tpn, c_tps), '{:.0%}')} of the "
          f"ceiling, and TRL's default checkpointing costs it another {tpn / tp:.2f}x. With SDPA "
          "(no flash-attention on CPU) transformers turns the packed row's position ids into a "
          "dense block-diagonal mask over the whole row, so attention is computed over all "
          "row x row pairs and SDPA leaves its causal fast path"
          + (f"; the bare step with the same tokens in one causal row (bare_packed_row) runs at "
             f"{_f(_ratio(bpr, c_tps), '{:.0%}')} of the ceiling" if bpr else "") + ".\n")
    pf = agg.get("trl_padding_free", {}).get("tokens_per_s")
    n_tps = agg.get("trl_no_gc", {}).get("tokens_per_s")
    d_gc = _ratio(n_tps, d_tps)
    if tp or pf:
        w("TRL's packing and padding-free modes remove the padding rung but keep gradient "
          "checkpointing on (TRL's default) and the fused-head metrics: "
          + "; ".join(s for s in [
              f"trl_packing reaches {_f(_ratio(tp, c_tps), '{:.0%}')} of the ceiling" if tp else "",
              f"trl_padding_free {_f(_ratio(pf, c_tps), '{:.0%}')}" if pf else "",
              f"removing checkpointing alone was worth {d_gc:.2f}x on the padded runs"
              if d_gc else ""] if s) + ".\n")
    w("Time outside the timed steps, medians: startup = interpreter start + imports (once per "
      "process); rest = the rep's wall time minus its timed steps (model load, data "
      "preparation, trainer set-up, the warm-up step, final save):\n")
    w("| method | startup s | rep wall s | timed steps s | rest s |\n|---|---|---|---|---|")
    for n in [M.CEILING, M.BASELINE, "trl_defaults", "trl_packing", "trl_padding_free",
              "sft_scale"] + [mm.name for mm in methods if mm.role == "switch"]:
        a = agg.get(n, {})
        if a.get("wall_s") and a.get("timed_s"):
            w(f"| {n} | {_f(a.get('startup_s'), '{:.1f}')} | {a['wall_s']:.1f} | "
              f"{a['timed_s']:.1f} | {a['wall_s'] - a['timed_s']:.1f} |")
    w("")
    unavailable = [(mm.name, mm.why_not) for mm in methods if not mm.available] + [
        (n, a["unavailable"]) for n, a in agg.items() if a.get("unavailable") and not a["ok"]]
    if unavailable:
        w("## Not run\n")
        for n, why in unavailable:
            w(f"- {n}: {why}")
        w("")
    data = {"spec": asdict(spec), "machine": machine, "machine_after": machine_after,
            "command": command, "reps": reps, "total_s": total_s, "isolation": isolation,
            "quick": quick, "aggregate": agg, "runs": results, "rounds": rounds or [],
            "methods": [asdict(mm) for mm in methods], "lengths": lengths}
    return {"markdown": "\n".join(L) + "\n", "data": data}
