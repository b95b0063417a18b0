"""LoRA on a frozen Linear layer as one autograd node: `x W^T + b + s (dropout(x) A^T) B^T`.

Why our own forward: PEFT's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`
as separate autograd nodes, so every adapted layer also writes the adapter's full-width output,
scales it, adds it (three passes over a tokens x d_out tensor) and, in backward, scales the
gradient and sums the two input gradients (two more passes over tokens x d_in). Here the adapter's
output is accumulated straight into the frozen GEMM's result (`addmm_` with alpha = scaling) and
its input gradient straight into the frozen input gradient: the same six small GEMMs and one
large one each way, none of the full-width passes. On the bench model (fp32, CPU;
docs/BENCHMARKS.md, `sft_scale` against `sft_scale[kernel=peft]` in the same rounds) that is 1-5%
more tokens/s (medians of six interleaved runs; single rounds -7% to +16%) and 70-110 MB less
peak RSS (measured in separate processes; the full-width temporaries are never made).

PEFT stays in charge of everything else: the layer class is PEFT's own `lora.Linear` with only
`forward` overridden, registered through PEFT's custom-module API, so parameter names, saving,
merging and loading are unchanged, and any call this node does not cover runs PEFT's forward:
adapters disabled or merged, mixed-adapter batches, several active adapters, DoRA and other
variants, a trainable base weight or bias, an adapter bias, mixed dtypes or autocast. Which runs
use it is decided once, in `resolve_lora_kernel`.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.nn import functional as F

FUSED, PEFT = "fused", "peft"


def resolve_lora_kernel(cfg, zero_stage: int | None) -> tuple[str, str]:
    """(fused | peft, why) for `lora.kernel`; fused only where every adapted layer qualifies."""
    if not cfg.lora.enabled:
        return PEFT, "no LoRA (full fine-tuning)"
    if cfg.lora.kernel == PEFT:
        return PEFT, "set in the config"
    if cfg.quantization.load_in_8bit or cfg.quantization.load_in_4bit:
        return PEFT, "auto: bitsandbytes layers keep PEFT's own LoRA layers"
    if zero_stage == 3:
        return PEFT, ("auto under DeepSpeed ZeRO-3 (weights are gathered only inside each "
                      "module's own forward)")
    if cfg.model.dtype != "fp32":
        return PEFT, (f"auto: model.dtype {cfg.model.dtype} runs under autocast with fp32 "
                      "adapters; the fused node covers same-dtype layers")
    if cfg.lora.bias != "none":
        return PEFT, f"auto: lora.bias {cfg.lora.bias} trains biases the fused node does not"
    return FUSED, "auto: frozen Linear and adapter in one autograd node"


def register(peft_config: LoraConfig) -> None:
    """Make PEFT build `FusedLoraLinear` for the Linear layers `peft_config` adapts. Only for
    unquantized models: PEFT's custom-module lookup is by isinstance, and bitsandbytes' layers
    are Linear subclasses."""
    peft_config._register_custom_module({nn.Linear: FusedLoraLinear})


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear with a fused forward/backward for the single-adapter training case."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        x_lora = None if isinstance(dropout, nn.Identity) else dropout(x)
        return _LoraLinear.apply(x, x_lora, base.weight, base.bias,
                                 self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 self.scaling[adapter])

    def _fusable_adapter(self, x, args, kwargs) -> str | None:
        """The one active plain-LoRA adapter, when this call is one the fused node computes
        exactly as PEFT would; else None."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        if len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        base, a, b = self.get_base_layer(), self.lora_A[adapter], self.lora_B[adapter]
        if type(base) is not nn.Linear or base.weight.requires_grad or b.bias is not None:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        if not x.dtype == base.weight.dtype == a.weight.dtype == b.weight.dtype:
            return None
        return adapter


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x_lora A^T) B^T, with x_lora = x when there is no dropout (None).

    The adapter's small GEMMs are laid out so that the long tokens dimension is the reduction
    over row-major operands, or the output's rows: `(t^T dy)^T` for B's gradient and
    `B^T dy^T` for the gradient at A's output. The same products written `dy^T t` and `dy B` run
    2-4x slower on CPU (bench model, one thread, 800 tokens: 2.5 against 0.7 ms and 2.8 against
    1.1 ms for a 1376-wide layer; tests/unit/training/test_lora_kernel.py checks the results).
    Folding the adapter into the weight (x (W + s B A)^T) was measured too and is not used: at
    the bench's 800 tokens per micro-batch it was no faster, and slower for down_proj.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        y = F.linear(x, weight, bias)
        xl = (x if x_lora is None else x_lora).reshape(-1, x.shape[-1])
        t = xl @ lora_a.t()  # [tokens, r]
        y.view(-1, y.shape[-1]).addmm_(t, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(xl, t, weight, lora_a, lora_b)
        ctx.scaling, ctx.shared, ctx.x_shape = scaling, x_lora is None, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        xl, t, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_a, need_b = (ctx.needs_input_grad[i] for i in (0, 1, 4, 5))
        dy = dy.reshape(-1, dy.shape[-1])
        # [r, tokens]: the scaled gradient at A's output, transposed (see the docstring)
        u_t = (lora_b.t() @ dy.t()).mul_(ctx.scaling)
        dx = dx_lora = d_a = d_b = None
        if need_x:
            dx = dy @ weight
            if ctx.shared:
                dx.addmm_(u_t.t(), lora_a)
            dx = dx.view(ctx.x_shape)
        if need_xl:  # dropout: the adapter's input gradient flows back through it
            dx_lora = (u_t.t() @ lora_a).view(ctx.x_shape)
        if need_a:
            d_a = u_t @ xl
        if need_b:
            d_b = (t.t() @ dy).mul_(ctx.scaling).t()
        return dx, dx_lora, None, None, d_a, d_b, None
