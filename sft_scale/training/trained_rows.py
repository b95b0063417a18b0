"""The last decoder layer computed only at the rows the loss reads.

With the chunked (or Liger) loss, the final hidden states are read only at the positions that
predict a trained token (`loss.summed_loss`). In the last decoder layer, everything that is
computed position by position after the keys and values (the query projection, the attention
output projection and the MLP) feeds nothing but the hidden state at its own position, so at the
other rows (the prompt, in SFT usually half the tokens or more) it is work whose result nobody
reads, forward and backward. The keys and values stay computed at every row: the trained
positions attend to them.

How, without touching the model's code: a forward pre-hook on each of those modules gathers the
trained rows of its input, and a forward hook scatters the module's output back into a zero
tensor of the full shape. The hidden states at untrained rows of the last layer then hold
something other than transformers' value, finite, and never read (the attention at untrained rows
sees zero queries, whose softmax is uniform; its output there goes into the gathered-away rows of
o_proj). The hooks act only inside `only_rows` (the loss's forward); everywhere else (generation,
a standard-loss eval) the layer computes every row as transformers does.

What it saves is that share of one layer out of all of them: on the bench model (7 layers, 57%
of the tokens untrained) about 7% of the step's GEMM work; on a 32-layer model with the same data
about 1.5%, more where prompts are long. tests/unit/training/test_trained_rows.py checks the
loss and every LoRA gradient against the untrimmed model for each supported family, packed and
padded, with and without gradient checkpointing.

Which modules: the last layer of the decoder's `layers`, its `self_attn.q_proj`,
`self_attn.o_proj` (where they exist as separate modules; a fused qkv projection keeps every
row) and a dense `mlp` (a class named *MLP; mixture-of-experts blocks route over all tokens and
keep every row).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

# (flat row indices into the [batch x sequence] positions, the number of those positions), set
# while the loss runs its forward; None elsewhere.
_ROWS: contextvars.ContextVar = contextvars.ContextVar("sft_scale_trained_rows", default=None)
_HOOKED = "_sft_scale_trained_rows_hooks"


def predicting_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat indices (into labels.reshape(-1)) of the positions whose next token is trained."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[..., :-1] = labels[..., 1:] != ignore_index
    return keep.reshape(-1).nonzero().squeeze(1)


@contextlib.contextmanager
def only_rows(rows: torch.Tensor | None, positions: int):
    """Within: the hooked modules compute only at `rows` of `positions` ([batch x sequence])."""
    token = _ROWS.set(None if rows is None else (rows, positions))
    try:
        yield
    finally:
        _ROWS.reset(token)


def recompute_context():
    """`context_fn` for torch.utils.checkpoint (non-reentrant): a checkpointed layer recomputed
    in backward sees the rows its forward saw (the loss's forward has returned by then)."""
    saved = _ROWS.get()

    @contextlib.contextmanager
    def restore():
        token = _ROWS.set(saved)
        try:
            yield
        finally:
            _ROWS.reset(token)

    return contextlib.nullcontext(), restore()


def trimmable_modules(causal_lm) -> tuple[dict[str, nn.Module], str]:
    """({name: module} of the last decoder layer to compute at trained rows only, why)."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return {}, f"{type(causal_lm).__name__} has no decoder `layers` list"
    last = len(layers) - 1
    layer = layers[last]
    found = {}
    attn = getattr(layer, "self_attn", None)
    for name in ("q_proj", "o_proj"):
        if isinstance(getattr(attn, name, None), nn.Module):
            found[f"layers.{last}.self_attn.{name}"] = getattr(attn, name)
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, nn.Module) and type(mlp).__name__.endswith("MLP"):
        found[f"layers.{last}.mlp"] = mlp
    if not found:
        return {}, f"{type(layer).__name__} has no separate q_proj/o_proj or dense MLP"
    return found, "the last layer's " + ", ".join(n.split(".", 2)[2] for n in found)


def install(causal_lm) -> tuple[list[str], str]:
    """Hook the last layer's position-wise modules (once per module); (their names, why)."""
    modules, why = trimmable_modules(causal_lm)
    for module in modules.values():
        if not hasattr(module, _HOOKED):
            setattr(module, _HOOKED, (module.register_forward_pre_hook(_gather),
                                      module.register_forward_hook(_scatter)))
    return list(modules), why


def _active(x) -> tuple[torch.Tensor, int] | None:
    state = _ROWS.get()
    if state is None or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    rows, positions = state
    # Anything else than the [batch, sequence, features] hidden states of this forward (a
    # caller reshaping on its own) computes every row.
    return state if x.shape[:-1].numel() == positions else None


def _gather(module, args):
    state = _active(args[0] if args else None)
    if state is None:
        return None
    x, rows = args[0], state[0]
    module._sft_scale_rows_shape = x.shape
    return (x.reshape(-1, x.shape[-1]).index_select(0, rows).unsqueeze(0), *args[1:])


def _scatter(module, args, out):
    shape = module.__dict__.pop("_sft_scale_rows_shape", None)
    if shape is None or not isinstance(out, torch.Tensor):
        return None
    rows = _ROWS.get()[0]
    full = out.new_zeros(shape[:-1].numel(), out.shape[-1]).index_copy(0, rows, out[0])
    return full.view(*shape[:-1], out.shape[-1])
