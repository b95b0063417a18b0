"""The physical limit of this machine for the bench's training job: the FLOPs a LoRA step must
do, counted exactly for the bench model and data, divided by the GEMM throughput this CPU reaches
at the model's own matrix shapes (measured in the same run, fp32, the bench's thread count).

    python -m bench.flops SPEC.json OUT.json [--threads 1]

What a LoRA step must compute, per layer and per real token (T tokens in the epoch):
- frozen linear W (d_in x d_out): forward 2 d_in d_out; backward only the input gradient,
  2 d_in d_out (no weight gradient). In the first layer the input of q/k/v (the normed
  embeddings) depends on no trainable parameter, so autograd computes no input gradient there.
- LoRA A (d_in x r), B (r x d_out): forward 2 r (d_in + d_out); backward weight gradients
  2 r (d_in + d_out), input gradients 2 r d_out (into A's output) + 2 r d_in (into x, not in
  the first layer's q/k/v).
- attention, per example of length L and layer: causal score pairs P = L (L + 1) / 2; forward
  QK^T and AV 2 x 2 h P; backward dQ, dK, dV, dP 4 x 2 h P: 12 h P in all (h = hidden size).
- LM head (frozen, h x V): forward and input gradient 2 x 2 h V, only at positions whose next
  token is trained (the loss needs no other logits).
- The last layer: what it computes position by position after the keys and values (q_proj,
  o_proj, the MLP, their LoRA terms) and its attention pairs feed only the hidden state at their
  own position, which the loss reads only where the next token is trained; they are counted at
  those positions only (`trained_only_last_layer`). Its attention counts the pairs whose query
  predicts a trained token; the trained tokens are taken to be each example's last ones (the
  bench's single-turn completions).
Not counted (stated, a few percent at most on this model): embeddings lookups, norms, RoPE,
SiLU, softmax, the loss's exp/log, the optimizer on the LoRA parameters.

Each term's time is its FLOPs divided by the best throughput measured for its GEMM shape (rows =
the mean real tokens of a micro-batch) in either orientation: C = A B (m x k x n) and its
transpose C^T = B^T A^T (n x k x m) are the same FLOPs, and a trainer may compute either (on this
CPU the skinny LoRA products differ 2-4x between the two); the sum is the least time any
trainer can take on this machine, and `limit_tokens_per_s` = T / that time. `peak_gflops` is
the best throughput at any of the model's shapes: MFU = model FLOPs per token x tokens/s / peak.
`square_gemm` is the throughput of a large square GEMM in the same process (`SQUARE_SHAPE`): the
speed this CPU's BLAS reaches when the matrices are not small, which the model's shapes are
compared with.

The machine's speed drifts (other tenants of the host, its clock): a limit measured a few minutes
before a method ran would move every MFU with it. So `machine_speed` times one GEMM, the model's
largest frozen-forward shape (`reference_shape`), as the median of many calls over a short window;
the limit records it (`reference_speed`: the faster of two windows, before and after its own
throughput measurement), and the bench worker measures it again just before and just after each
method's run. A method's limit and peak are scaled by (its own bracket / the limit's), so each
method is judged against the machine as fast as it was while that method ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.spec import Spec


@dataclass
class Term:
    name: str
    flops: float  # over the whole epoch
    shape: tuple  # (m, k, n) of torch.mm, or (batch, m, k, n) of torch.bmm


@dataclass
class Workload:
    terms: list[Term] = field(default_factory=list)
    real_tokens: int = 0
    trained_tokens: int = 0

    def add(self, name: str, flops: float, shape: tuple) -> None:
        self.terms.append(Term(name, float(flops), tuple(int(x) for x in shape)))

    @property
    def flops(self) -> float:
        return sum(t.flops for t in self.terms)


def lora_step_workload(model: dict, lengths: list[int], trained: list[int], lora_r: int,
                       micro_batches: int, attention: bool = True,
                       trained_only_last_layer: bool = True) -> Workload:
    """The FLOPs of one epoch of LoRA (all-linear) training over examples of `lengths` tokens,
    `trained[i]` of which are loss positions, for a Llama-shaped `model` config dict."""
    h, inter = model["hidden_size"], model["intermediate_size"]
    layers, vocab = model["num_hidden_layers"], model["vocab_size"]
    heads = model["num_attention_heads"]
    kv = model.get("num_key_value_heads") or heads
    hd = h // heads
    T, Tt = sum(lengths), sum(trained)
    M = max(1, round(T / micro_batches))  # rows of a micro-batch's GEMMs (packed, no padding)
    Mt = max(1, round(Tt / micro_batches))
    r = lora_r
    linears = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
               "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
               "down_proj": (inter, h)}
    # In layer 0 these read the normed (frozen) embeddings: no input gradient is needed.
    first_layer_inputs = {"q_proj", "k_proj", "v_proj"}
    # In the last layer these feed only their own position's output (see the docstring).
    own_position = {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    w = Workload(real_tokens=T, trained_tokens=Tt)
    for layer in range(layers):
        last = trained_only_last_layer and layer == layers - 1
        for name, (din, dout) in linears.items():
            n, m = (Tt, Mt) if last and name in own_position else (T, M)
            needs_input_grad = layer > 0 or name not in first_layer_inputs
            w.add("frozen forward", 2 * n * din * dout, (m, din, dout))
            if needs_input_grad:
                w.add("frozen input grad", 2 * n * din * dout, (m, dout, din))
            w.add("lora forward", 2 * n * din * r, (m, din, r))
            w.add("lora forward", 2 * n * r * dout, (m, r, dout))
            w.add("lora weight grad", 2 * n * din * r, (din, m, r))
            w.add("lora weight grad", 2 * n * r * dout, (r, m, dout))
            w.add("lora input grad", 2 * n * dout * r, (m, dout, r))
            if needs_input_grad:
                w.add("lora input grad", 2 * n * r * din, (m, r, din))
        if attention:
            mean_len = max(1, round(sum(lengths) / len(lengths)))
            pairs = sum(L * (L + 1) // 2 for L in lengths)
            if last:  # queries at positions L-t-1 .. L-2 see i + 1 keys each
                pairs = sum(t * (2 * L - t - 1) // 2 for L, t in zip(lengths, trained,
                                                                       strict=True))
            w.add("attention", 12 * h * pairs, (heads, mean_len, hd, mean_len))
    w.add("lm head forward", 2 * Tt * h * vocab, (Mt, h, vocab))
    w.add("lm head input grad", 2 * Tt * h * vocab, (Mt, vocab, h))
    return w


def measure_throughput(shapes: list[tuple], threads: int | None, min_time: float = 0.05,
                       reps: int = 5, device: str = "cpu", dtype=None) -> dict[tuple, float]:
    """Best FLOP/s of torch.mm / torch.bmm at each shape (`threads` threads on CPU; fp32 unless
    `dtype`, e.g. bf16 on a GPU, where every timing waits for the device)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = dtype or torch.float32
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    out = {}
    for shape in shapes:
        if len(shape) == 3:
            m, k, n = shape
            a, b = randn(m, k), randn(k, n)
            fn, flops = (lambda a=a, b=b: torch.mm(a, b)), 2 * m * k * n
        else:
            bt, m, k, n = shape
            a, b = randn(bt, m, k), randn(bt, k, n)
            fn, flops = (lambda a=a, b=b: torch.bmm(a, b)), 2 * bt * m * k * n
        fn()
        sync()
        t0 = time.perf_counter()
        calls = 0
        while time.perf_counter() - t0 < min_time / 5 or calls < 2:
            fn()
            sync()
            calls += 1
        inner = max(1, int(calls * 5 * min_time / max(time.perf_counter() - t0, 1e-9) / 5))
        best = float("inf")
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            best = min(best, (time.perf_counter() - t0) / inner)
        out[shape] = flops / best
    return out


# A GEMM large enough that the BLAS runs at its steady-state speed on this CPU: the model's shapes
# are judged against it, to tell whether their size (small matrices) is what holds a trainer back.
SQUARE_SHAPE = (1024, 1024, 1024)


def reference_shape(w: Workload) -> tuple:
    """The frozen-forward GEMM shape with the most FLOPs: the machine-speed probe."""
    terms = [t for t in w.terms if t.name == "frozen forward" and len(t.shape) == 3]
    return max(terms, key=lambda t: (t.shape[1] * t.shape[2], t.shape)).shape


def machine_speed(shape: tuple, threads: int | None = None, window: float = 1.0) -> float:
    """GFLOP/s of torch.mm at `shape` (m, k, n): the median of single calls over `window`
    seconds (the median, not the best: it follows the machine's sustained speed, not a burst)."""
    import statistics

    import torch

    if threads:
        torch.set_num_threads(threads)
    m, k, n = shape
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    torch.mm(a, b)
    samples: list[float] = []
    end = time.perf_counter() + window
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b)
        samples.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(samples) / 1e9


def reference_speed(probes: list[float]) -> float:
    """The machine's speed while the limit was measured, from probes taken before and after it.

    The limit's per-shape throughputs are best-of timings, which a moment of contention does not
    move; a single probe window can be (round 1 of two runs on 2026-12-02 read 22 GFLOP/s against
    a 33-35 GFLOP/s peak in the same process, which then scaled every method's limit of that round
    by 1.4-1.55x). The faster window is the one that saw the machine as the throughputs did."""
    return max(probes)


def transposed(shape: tuple) -> tuple:
    """The same product computed as its transpose: (m, k, n) -> (n, k, m); batched likewise."""
    *batch, m, k, n = shape
    return (*batch, n, k, m)


def limit_shapes(w: Workload) -> list[tuple]:
    """Every shape `physical_limit` needs measured: each term's, in both orientations."""
    return sorted({s for t in w.terms for s in (t.shape, transposed(t.shape))})


def physical_limit(w: Workload, throughput: dict[tuple, float]) -> dict:
    by_name: dict[str, dict] = {}
    total_s = 0.0
    for t in w.terms:
        s = t.flops / max(throughput.get(t.shape, 0.0), throughput.get(transposed(t.shape), 0.0))
        total_s += s
        d = by_name.setdefault(t.name, {"flops": 0.0, "seconds": 0.0})
        d["flops"] += t.flops
        d["seconds"] += s
    peak = max(throughput.values())
    return {"flops": w.flops, "flops_per_token": w.flops / w.real_tokens,
            "real_tokens": w.real_tokens, "trained_tokens": w.trained_tokens,
            "limit_seconds": total_s, "limit_tokens_per_s": w.real_tokens / total_s,
            "peak_gflops": peak / 1e9,
            "limit_mfu": w.flops / total_s / peak,  # the limit itself, as MFU
            "terms": {k: {"gflops": v["flops"] / 1e9, "seconds": v["seconds"],
                          "gflop_per_s": v["flops"] / v["seconds"] / 1e9}
                      for k, v in by_name.items()},
            "throughput_gflops": {"x".join(map(str, s)): f / 1e9
                                  for s, f in sorted(throughput.items())}}


def workload_for(spec: Spec, trained_only_last_layer: bool = True) -> Workload:
    """The bench job's workload: its model config and the exact tokens of its data file."""
    from bench.data import encode, load_tokenizer

    model = json.loads((Path(spec.model_dir) / "config.json").read_text())
    tok = load_tokenizer(spec.model_dir)
    lengths, trained = [], []
    for line in Path(spec.data_file).read_text().splitlines():
        if line.strip():
            enc = encode(tok, json.loads(line))
            lengths.append(len(enc["input_ids"]))
            # a label at position i is predicted from position i-1: one logit per trained token
            trained.append(sum(1 for x in enc["labels"] if x != -100))
    micro = spec.train.steps * spec.train.gradient_accumulation_steps
    return lora_step_workload(model, lengths, trained, spec.train.lora_r, micro,
                              trained_only_last_layer=trained_only_last_layer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.split("\n")[0])
    ap.add_argument("spec")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    spec = Spec.load(Path(args.spec))
    w = workload_for(spec)
    ref = reference_shape(w)
    t0 = time.time()
    before = machine_speed(ref, args.threads)
    res = physical_limit(w, measure_throughput(limit_shapes(w), args.threads))
    square = measure_throughput([SQUARE_SHAPE], args.threads)[SQUARE_SHAPE]
    probes = [before, machine_speed(ref, args.threads)]
    res.update(threads=args.threads, measure_s=time.time() - t0,
               square_gemm={"shape": list(SQUARE_SHAPE), "gflops": square / 1e9},
               reference={"shape": list(ref), "gflops": reference_speed(probes),
                          "probes": probes})
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"limit {res['limit_tokens_per_s']:.0f} tok/s, peak {res['peak_gflops']:.1f} GFLOP/s, "
          f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
