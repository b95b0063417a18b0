"""Attention: what `model.attn_implementation: auto` means, and SDPA for padding-free packed rows.

Why a packed-row SDPA of our own: with packing, a micro-batch is one row of concatenated examples.
transformers' "sdpa" then detects the packing from the position ids and builds a dense
block-diagonal [L, L] mask for the whole row (L = all tokens of the micro-batch), and SDPA with an
explicit mask leaves its causal fast path: attention costs L^2 instead of the sum of the
examples' own squared lengths. For 8 examples of up to 512 tokens (L ~ 2300) that made attention
as expensive as all linear layers together on CPU, and packing slower than padding. Flash-attention
2 has a varlen kernel for this; SDPA has none, so `packed_sdpa_attention_forward` does what varlen
does with plain SDPA. On CPU it runs causal SDPA on each example's slice of the row (measured on
the bench model: ~10% less peak memory than the padded layout, and no slower). On GPU it
scatters the row into one padded row per example (right-padded to the longest example), runs one
batched causal SDPA (right padding never reaches a real query under a causal mask), and gathers
the real positions back. The linear layers still see only real tokens, and no [L, L] mask is
ever built. The example boundaries come from `cu_seq_lens_q` / `max_length_q`,
which `collate_packed` writes next to the position ids (the same keys flash-attention's varlen
path reads, so with flash_attention_2 the boundaries are not re-derived from position ids either).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sft_scale import optional
from sft_scale.errors import ConfigError

PACKED_SDPA = "sft_scale_packed_sdpa"

# Set while sft_scale runs a forward on a packed batch that carries cu_seq_lens: transformers'
# mask builder is then told not to materialise the [L, L] block-diagonal mask nobody will read.
_PACKED_FORWARD = contextvars.ContextVar("sft_scale_packed_forward", default=False)


def resolve_attn_implementation(cfg, model_config=None) -> str:
    """The attention implementation `cfg.model.attn_implementation` stands for on this machine.

    auto: flash_attention_2 when the flash_attn package is installed, CUDA is available and the
    model runs in bf16/fp16 (flash-attention has no fp32 kernels); otherwise sdpa, or eager for
    models whose attention SDPA cannot compute (Gemma-2's logit soft-capping).
    """
    impl = cfg.model.attn_implementation
    half = cfg.model.dtype in ("bf16", "fp16")
    if impl == "auto":
        if optional.is_available("flash_attn") and torch.cuda.is_available() and half:
            return "flash_attention_2"
        return "sdpa" if _supports_sdpa(model_config) else "eager"
    if impl == "flash_attention_2":
        optional.require("flash_attn", "'model.attn_implementation: flash_attention_2'",
                         "'auto' or 'sdpa'")
        if not torch.cuda.is_available():
            raise ConfigError("'model.attn_implementation: flash_attention_2' needs a CUDA GPU; "
                              "none is visible. Use 'auto' or 'sdpa'.")
        if not half:
            raise ConfigError(f"'model.attn_implementation: flash_attention_2' runs in bf16/fp16 "
                              f"only, but model.dtype is {cfg.model.dtype!r}. Set model.dtype: "
                              "bf16, or use 'auto' or 'sdpa'.")
    return impl


def _supports_sdpa(model_config) -> bool:
    """transformers' own flag on the model class (config only, no weights); True when the
    class cannot be known here (transformers then decides at load)."""
    try:
        cls = AutoModelForCausalLM._model_mapping[type(model_config)]
    except (KeyError, ValueError):
        return True
    return bool(getattr(cls, "_supports_sdpa", True))


def attention_for_load(kernel: str) -> str:
    """What `from_pretrained(attn_implementation=...)` gets for the resolved kernel: our
    packed-row SDPA is registered with transformers first (in this process) when it is the one."""
    if kernel == PACKED_SDPA:
        register_packed_sdpa()
    return kernel


@contextlib.contextmanager
def packed_forward(batch: dict):
    """Around a forward of a collated batch: marks packed batches (with cu_seq_lens)."""
    token = _PACKED_FORWARD.set("cu_seq_lens_q" in batch)
    try:
        yield
    finally:
        _PACKED_FORWARD.reset(token)


def packed_sdpa_mask(*args, **kwargs):
    """transformers' SDPA mask, except for a packed row of ours: no [L, L] mask (None)."""
    if _PACKED_FORWARD.get() and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def packed_sdpa_attention_forward(module, query, key, value, attention_mask,
                                  cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """SDPA; for a packed row with example boundaries (cu_seq_lens_q), per-example causal SDPA.

    query: [1, heads, L, head_dim]; key/value: [1, kv_heads, L, head_dim]. Returns
    ([1, L, heads, head_dim], None) like transformers' sdpa_attention_forward.
    """
    if (cu_seq_lens_q is None or max_length_q is None or attention_mask is not None
            or query.shape[0] != 1 or key.shape[2] != query.shape[2]
            or kwargs.get("is_causal", getattr(module, "is_causal", True)) is False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    if query.device.type == "cpu":
        return _sdpa_each_example(sdpa_attention_forward, module, query, key, value,
                                  cu_seq_lens_q, **kwargs)
    return _sdpa_padded_examples(sdpa_attention_forward, module, query, key, value,
                                 cu_seq_lens_q, max_length_q, **kwargs)


def _sdpa_each_example(sdpa, module, query, key, value, cu_seq_lens_q, **kwargs):
    """CPU: one causal SDPA call per example on slices of the row. Compute and saved activations
    follow the examples' own lengths (no padding to the longest); the loop's per-call overhead
    is small next to CPU attention, and reading the boundaries costs no device sync."""
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    # split, not one slice per example: a slice's backward writes a zero-filled full-row
    # gradient per example (and autograd then adds them all up); split's backward is one cat.
    outs = [sdpa(module, q, k, v, None, is_causal=True, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                               value.split(lengths, dim=2), strict=True)]
    return torch.cat(outs, dim=1), None  # [1, L, heads, head_dim]


def _sdpa_padded_examples(sdpa, module, query, key, value, cu_seq_lens_q, max_length_q,
                          **kwargs):
    """GPU: one batched causal SDPA call over the examples right-padded to the longest, built
    with index ops only (a per-example loop would sync on the boundaries and launch a kernel
    per example and layer)."""
    L, device = query.shape[2], query.device
    cu = cu_seq_lens_q.to(device=device, dtype=torch.long)
    n, width = cu.numel() - 1, int(max_length_q)
    # Each packed position's slot in an [n, width] right-padded layout (no host sync).
    seq = torch.repeat_interleave(torch.arange(n, device=device), cu[1:] - cu[:-1],
                                  output_size=L)
    slot = seq * width + torch.arange(L, device=device) - cu[:-1][seq]

    def unpack(x):  # [1, h, L, d] -> [n, h, width, d], zeros after each example's end
        h, d = x.shape[1], x.shape[3]
        padded = x.new_zeros(h, n * width, d).index_copy(1, slot, x[0])
        return padded.view(h, n, width, d).transpose(0, 1)

    out, _ = sdpa(module, unpack(query), unpack(key), unpack(value), None, is_causal=True,
                  **kwargs)
    # out: [n, width, heads, head_dim] -> the packed row [1, L, heads, head_dim]
    out = out.reshape(n * width, out.shape[2], out.shape[3]).index_select(0, slot)
    return out.unsqueeze(0), None


_registered = False


def register_packed_sdpa() -> None:
    global _registered
    if _registered:
        return
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    _registered = True
