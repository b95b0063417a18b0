"""Packed rows against padded, length-grouped batches, on data whose padding is controlled:
sft_scale's real entry point (`sft_scale.train.main`, as bench/worker.py runs it) with
`data.packing: true` and `false`, nothing else changed, in interleaved rounds.

    python -m bench.packing_layout --rounds 4 --threads 1 --out /tmp/packing.md  # docs/PACKING.md

Data sets (prompt/completion, lengths in tokens as sft_scale encodes them: BOS + prompt +
completion + EOS): `equal` (every example the same length: padded batches are 100% real tokens),
`narrow` (uniform over a narrow range: ~97-99% after length grouping), `wide` (uniform over a wide
range), `bench` (the main bench's Alpaca-like mix, bench/data.py: ~75%). Models: `bench` (the
main bench's ~21M Llama, bench/spec.py) and `tiny` (the smoke test's, 2 layers of width 64:
where per-call overheads weigh most). In each round every (model, data) pair runs once per
layout, pairs in a rotated order and the two layouts of a pair back to back, first one then the
other in alternate rounds; a ratio is taken inside its round and reported as the median
[min-max] over rounds (bench/rounds.py). Everything runs in this one process (the model and
LoRA are rebuilt by every run); the load average is recorded per round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.rounds import fmt, round_order, stats
from bench.spec import Spec, default_spec, quick_spec

LAYOUTS = {"packed": "data.packing=true", "padded": "data.packing=false"}
DATA = {  # name: (what, lengths drawn as (low, high) uniform, or None for the bench's mix)
    "equal": ("every example 96 tokens", (96, 96)),
    "narrow": ("uniform 84-96 tokens", (84, 96)),
    "wide": ("uniform 24-96 tokens, those shorter than the prompt redrawn", (24, 96)),
    "bench": ("the main bench's Alpaca-like mix (bench/data.py)", None),
}
MODELS = {"bench": default_spec, "tiny": quick_spec}


def single_token_words(tok) -> list[str]:
    """Words that are one token both at the start of a text and after a space, so a text of k
    of them is k tokens (checked again on every text built)."""
    from bench.data import WORDS

    one = lambda s: len(tok(s, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    return sorted({w for w in WORDS if one(w) and one(" " + w)})


def exact_records(tok, n: int, low: int, high: int, seed: int) -> list[dict]:
    """`n` prompt/completion records whose encoded length (BOS + prompt + completion + EOS) is
    drawn uniformly from [low, high], exactly."""
    words = single_token_words(tok)
    rng = random.Random(seed)
    count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    recs = []
    while len(recs) < n:
        target = rng.randint(low, high)
        prompt = "### Instruction:\n" + " ".join(rng.choice(words) for _ in range(6)) \
            + "\n\n### Response:\n"
        k = target - 2 - count(prompt)
        completion = " ".join(rng.choice(words) for _ in range(k))
        if k >= 1 and count(completion) == k:
            recs.append({"prompt": prompt, "completion": completion})
    return recs


def prepare(model: str, data: str, steps: int, work: Path) -> tuple[Spec, list[int]]:
    """The spec (model folder, data file, sft_scale config) of one (model, data) pair, and the
    examples' encoded lengths."""
    from bench.data import build_model_dir, encode, load_tokenizer, make_records
    from bench.sft import write_config

    spec = MODELS[model](steps)
    # Only the model differs between the two: the same data (max_seq_len 256) and training.
    spec.data, spec.train = default_spec().data, default_spec(steps).train
    spec.model_dir = str(build_model_dir(spec))
    tok = load_tokenizer(spec.model_dir)
    n = spec.train.n_examples
    lengths_from = DATA[data][1]
    recs = make_records(spec, tok, n) if lengths_from is None else \
        exact_records(tok, n, *lengths_from, spec.data.seed)
    folder = work / f"{model}-{data}"
    folder.mkdir(parents=True, exist_ok=True)
    spec.data_file = str(folder / "train.jsonl")
    Path(spec.data_file).write_text("".join(json.dumps(r) + "\n" for r in recs))
    spec.sft_config = str(write_config(spec, folder / "sft.yaml"))
    return spec, [len(encode(tok, r)["input_ids"]) for r in recs]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first "
                    "is warm-up, not timed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="bench,tiny")
    ap.add_argument("--data", default=",".join(DATA))
    ap.add_argument("--out", required=True, help="markdown report (a .json next to it)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--from-json", default=None, help="only render an earlier run's .json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        Path(args.out).write_text("\n".join(render(data)) + "\n")
        return 0
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    import torch

    from bench import report
    from bench.worker import preload, run_one

    torch.set_num_threads(args.threads)
    machine = report.machine_info()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="packing_layout_"))
    pairs = [(m, d) for m in args.models.split(",") for d in args.data.split(",")]
    specs, lengths = {}, {}
    for p in pairs:
        specs[p], lengths[p] = prepare(*p, args.steps, work)
    preload(["sft"])
    results = {p: {x: {} for x in LAYOUTS} for p in pairs}
    rounds = []
    t_start = time.time()
    for rnd in range(args.rounds):
        info = {"round": rnd, "loadavg_start": os.getloadavg(), "order": []}
        for p in round_order(pairs, rnd):
            layouts = list(LAYOUTS) if rnd % 2 == 0 else list(LAYOUTS)[::-1]
            for layout in layouts:
                name = f"{p[0]}-{p[1]}-{layout}"
                res = run_one(specs[p], {"name": name, "safe": name, "kind": "sft",
                                         "options": {"set": [LAYOUTS[layout]]}}, rnd, work / "runs")
                shutil.rmtree(work / "runs" / f"{name}-rep{rnd}", ignore_errors=True)
                if not res["ok"]:
                    print(f"packing_layout: {name} failed:\n{res.get('error')}", file=sys.stderr)
                    return 1
                results[p][layout][str(rnd)] = res
                info["order"].append(name)
                print(f"[round {rnd + 1}/{args.rounds}] {name:24s} {res['tokens_per_s']:8.1f} "
                      f"tok/s  pad eff {res['padding_efficiency']:.1%}  cores busy "
                      f"{res.get('cores_busy') or float('nan'):.2f}", flush=True)
        info["loadavg_end"] = os.getloadavg()
        rounds.append(info)
    data = {"command": "python -m bench.packing_layout " + " ".join(argv), "machine": machine,
            "threads": args.threads, "steps": args.steps, "seconds": time.time() - t_start,
            "rounds": rounds, "pairs": [{"model": m, "data": d, "lengths": lengths[(m, d)],
                                         "runs": results[(m, d)]} for m, d in pairs]}
    Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1, default=float))
    Path(args.out).write_text("\n".join(render(data)) + "\n")
    print(f"packing_layout: {args.out} written ({data['seconds']:.0f} s)")
    return 0


def per_cpu_s(res: dict) -> float:
    """Real tokens per CPU-second of the timed steps: on a machine that other jobs share, what
    a run got of the core it ran on drops out."""
    return res["tokens_per_s"] / res["cores_busy"]


def ratio(pk: dict, pd: dict, f) -> dict | None:
    return stats([f(pk[r]) / f(pd[r]) for r in sorted(pk) if r in pd])


def render(data: dict) -> list[str]:
    L = []
    w = L.append
    m = data["machine"]
    w("## Measurement\n")
    w(f"`{data['command']}` ({data['seconds'] / 60:.1f} min), {m['date']}, git "
      f"{m['git_commit']}; {m['cpu']}, {m['cores']} cores, torch {m['versions'].get('torch')}, "
      f"transformers {m['versions'].get('transformers')}, {data['threads']} torch thread(s). "
      f"Micro-batch 8, no accumulation, {data['steps']} optimizer steps per run (the first not "
      "timed), LoRA r=8 on all linear layers, fp32, SDPA, sft_scale's defaults otherwise "
      "(chunked loss); packed = `data.packing: true` (one row per micro-batch, causal SDPA per "
      "example), padded = `data.packing: false` (rows padded to the micro-batch's longest, "
      "`group_by_length` on: sorted by length within windows of 32 global batches).\n")
    w("| round | order | load avg (1/5/15 min) start → end |\n|---|---|---|")
    for r in data["rounds"]:
        la = lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
        w(f"| {r['round'] + 1} | {' → '.join(r['order'])} | {la(r['loadavg_start'])} → "
          f"{la(r['loadavg_end'])} |")
    w("")
    w("**tok/s** = real tokens per second of the timed steps; **per CPU-s** = real tokens per "
      "CPU-second of the process over the timed steps (tok/s / cores busy); ratios are taken "
      "within each round, median [min–max] over rounds. No memory column: in one process the "
      "allocator keeps what earlier runs freed, so a run's peak RSS is not its own.\n")
    w("| model | data | lengths min / mean / max | padded: pad eff | packed tok/s per round | "
      "padded tok/s per round | **packed / padded** tok/s | packed / padded per CPU-s | "
      "cores busy |")
    w("|---|---|---|---|---|---|---|---|---|")
    for p in data["pairs"]:
        ls = p["lengths"]
        pk, pd = p["runs"]["packed"], p["runs"]["padded"]
        eff = statistics.median(x["padding_efficiency"] for x in pd.values())
        busy = [x["cores_busy"] for v in (pk, pd) for x in v.values()]
        w(f"| {p['model']} | {p['data']} ({DATA[p['data']][0]}) | {min(ls)} / "
          f"{sum(ls) / len(ls):.0f} / {max(ls)} | {eff:.1%} | {per_round(pk)} | "
          f"{per_round(pd)} | {fmt(ratio(pk, pd, lambda x: x['tokens_per_s']))} | "
          f"{fmt(ratio(pk, pd, per_cpu_s))} | {min(busy):.2f}–{max(busy):.2f} |")
    w("")
    return L


def per_round(runs: dict[str, dict]) -> str:
    return " / ".join(f"{runs[r]['tokens_per_s']:,.0f}" for r in sorted(runs, key=int))


if __name__ == "__main__":
    sys.exit(main())
