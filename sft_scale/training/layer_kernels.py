"""RMSNorm and the rotary embedding as one autograd node each, for Llama-like decoder layers.

Why our own: once the GEMMs run at the machine's speed, what is left of a CPU step is largely
memory traffic of the elementwise ops around them. transformers' RMSNorm (Llama's and the
families copied from it) is six tensor ops forward (pow, mean, add, rsqrt, mul, mul), each a full
pass over a [tokens, hidden] tensor, and about twice that backward; `apply_rotary_pos_emb` builds
`rotate_half` by slicing, negating and concatenating (a full copy of q and of k), and its backward
zero-fills and scatters the slices. The nodes here do the same arithmetic in fewer passes, in
place on the tensors they allocate, and save less for backward (RMSNorm: its input and one scale
per row; rotary: only cos and sin, which the model holds anyway). On GPU, fused kernels do this
properly (Liger's, or torch.compile's); this is the eager equivalent where those do not run (CPU
fp32), measured in docs/BENCHMARKS.md (`sft_scale` against `sft_scale[layer_kernels=transformers]`).

How they are put in place, as the field does it for Liger's kernels: each RMSNorm instance gets
the fused forward as its own `forward` (nothing else about the module changes: parameter names,
hooks, saving), and the modeling module's `apply_rotary_pos_emb`, which its attention calls by
name, is wrapped (process-wide, for that model family; a later run in the same process that
chooses `transformers` puts the original back). transformers' own hook for swapping them
(`use_kernel_forward_from_hub`) loads kernels from the Hub, which a training node may not reach.

Nothing relies on a list of architectures: when installed, each RMSNorm class and each rotary
function is run once on random inputs against transformers' own (outputs and input gradients)
and fused only where they agree, so a family whose arithmetic differs (Gemma's `1 + weight`
norm) keeps its own. Per call, whatever the nodes do not cover runs transformers' code: another
dtype than fp32 (transformers upcasts half precision inside the norm), autocast, a partial rotary
dimension, gradients into cos/sin. tests/unit/training/test_layer_kernels.py checks the loss and
every gradient against transformers' layers for each supported family.
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import torch

from sft_scale.errors import ConfigError

log = logging.getLogger(__name__)

FUSED, TRANSFORMERS = "fused", "transformers"
_ORIGINAL = "_sft_scale_original"  # on our rotary wrapper: the function it stands in for
_CHECK_TOL = 1e-5


def resolve_layer_kernels(cfg, zero_stage: int | None) -> tuple[str, str]:
    """(fused | transformers, why) for `training.layer_kernels`."""
    choice = cfg.training.layer_kernels
    if choice == TRANSFORMERS:
        return TRANSFORMERS, "set in the config"
    why_not = None
    if cfg.training.torch_compile:
        why_not = "torch_compile fuses the elementwise ops itself"
    elif zero_stage == 3:
        # the install-time check runs the norms, whose weights ZeRO-3 keeps partitioned
        why_not = "DeepSpeed ZeRO-3 partitions the norms' weights"
    elif cfg.model.dtype != "fp32":
        why_not = (f"model.dtype {cfg.model.dtype}: the fused nodes cover fp32 (transformers "
                   "computes half-precision norms in fp32)")
    if why_not and choice == FUSED:
        raise ConfigError(f"'training.layer_kernels: fused' cannot run here: {why_not}. "
                          "Set training.layer_kernels: auto (or transformers).")
    if why_not:
        return TRANSFORMERS, f"auto: {why_not}"
    return FUSED, ("set in the config" if choice == FUSED else "auto: fp32") + \
        ", where each family's layers are checked equal to transformers' own"


# --------------------------------------------------------------------------- RMSNorm


class _RMSNorm(torch.autograd.Function):
    """y = w * x / sqrt(mean(x^2) + eps) over the last dimension, fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.reshape(-1, x.shape[-1])
        rstd = rows.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [rows, 1]
        y = torch.mul(rows, rstd).mul_(weight)
        ctx.save_for_backward(rows, rstd, weight)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, rstd, weight = ctx.saved_tensors
        dy = dy.reshape(rows.shape)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * rows).mul_(rstd).sum(0)
        # d/dx of x * r(x) with r = mean(x^2)^-1/2: g r - x r^3 mean(g x), g = dy * w
        g = dy * weight
        coef = (g * rows).mean(-1, keepdim=True).mul_(rstd.pow(3))
        dx = g.mul_(rstd).addcmul_(rows, coef, value=-1)
        return dx.view(ctx.x_shape), dw, None


def _fused_rms_norm_forward(module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if (hidden_states.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled(hidden_states.device.type)):
        return _RMSNorm.apply(hidden_states, weight, _eps(module))
    return type(module).forward(module, hidden_states)


def _eps(module):
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _is_rms_norm(module) -> bool:
    return (type(module).__name__.endswith("RMSNorm")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1 and isinstance(_eps(module), float))


def _norm_agrees(module) -> bool:
    """The fused forward against the class's own on random fp32 rows: output and input grad."""
    gen = torch.Generator().manual_seed(0)
    n = module.weight.shape[0]
    weight = module.weight.detach().float()
    eps = _eps(module)
    probe = types.SimpleNamespace(weight=torch.randn(n, generator=gen) * 0.2 + weight.cpu(),
                                  variance_epsilon=eps, eps=eps)
    x = torch.randn(3, 5, n, generator=gen)
    grad = torch.randn(3, 5, n, generator=gen)
    try:
        theirs = _value_and_grad(lambda t: type(module).forward(probe, t), x, grad)
        ours = _value_and_grad(
            lambda t: _RMSNorm.apply(t, probe.weight, eps), x, grad)
    except Exception as e:  # a forward our probe cannot call: keep the class's own
        log.debug("layer_kernels: %s not checkable: %s", type(module).__name__, e)
        return False
    return _close(theirs, ours)


# --------------------------------------------------------------------------- rotary


class _Rotary(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) (x1, x2: x's halves)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        # the transpose of x -> rotate_half(x) * sin is y -> rotate_half(y * sin) negated
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        dx = grad * cos
        dx[..., :h].addcmul_(grad[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(grad[..., :h], sin[..., :h], value=-1)
        return dx, None, None


def _rotary_covers(q, k, cos, sin) -> bool:
    d = q.shape[-1]
    return (q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32
            and d % 2 == 0 and k.shape[-1] == d and cos.shape[-1] == d == sin.shape[-1]
            and not (cos.requires_grad or sin.requires_grad)
            and not torch.is_autocast_enabled(q.device.type))


def _fused_rotary(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or set(kwargs) - {"unsqueeze_dim"}:
            return original(q, k, cos, sin, *args, **kwargs)
        dim = kwargs.get("unsqueeze_dim", 1)
        c, s = cos.unsqueeze(dim), sin.unsqueeze(dim)
        if not _rotary_covers(q, k, c, s):
            return original(q, k, cos, sin, **kwargs)
        return _Rotary.apply(q, c, s), _Rotary.apply(k, c, s)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    return apply_rotary_pos_emb


def _rotary_agrees(original, head_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(1, 7, head_dim // 2, generator=gen) * 6.0
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = torch.randn(1, 4, 7, head_dim, generator=gen)
    k = torch.randn(1, 2, 7, head_dim, generator=gen)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fused = _fused_rotary(original)
    try:
        theirs = _value_and_grad2(lambda a, b: original(a, b, cos, sin), q, k, gq, gk)
        ours = _value_and_grad2(lambda a, b: fused(a, b, cos, sin), q, k, gq, gk)
    except Exception as e:  # another signature (multimodal rotary): keep transformers' own
        log.debug("layer_kernels: rotary not checkable: %s", e)
        return False
    return _close(theirs, ours)


# --------------------------------------------------------------------------- install


def install(model) -> dict[str, int | list[str]]:
    """Fuse the RMSNorm modules and rotary functions of `model` (a transformers model, PEFT's
    base model) that agree with transformers' own. Returns what was fused, for the log:
    {"norms": count, "norm_classes": [...], "rotary": [modeling modules], "kept": [...]}."""
    agrees: dict[type, bool] = {}
    fused_norms, kept = 0, []
    for module in model.modules():
        if not _is_rms_norm(module):
            continue
        cls = type(module)
        if cls not in agrees:
            agrees[cls] = _norm_agrees(module)
            if not agrees[cls]:
                kept.append(cls.__name__)
        if not agrees[cls]:
            continue
        if "forward" in vars(module):  # already ours, or another wrapper's: leave it
            fused_norms += _is_fused(module)
            continue
        # a bound method, not a closure: a deep copy of the module (PEFT's modules_to_save)
        # then calls its own weight
        module.forward = types.MethodType(_fused_rms_norm_forward, module)
        fused_norms += 1
    rotary = []
    head_dim = _head_dim(getattr(model, "config", None))
    for name, mod, fn in _rotary_functions(model):
        if head_dim is None:
            continue
        if hasattr(fn, _ORIGINAL):
            rotary.append(name)
            continue
        if _rotary_agrees(fn, head_dim):
            mod.apply_rotary_pos_emb = _fused_rotary(fn)
            rotary.append(name)
        else:
            kept.append(f"{name}.apply_rotary_pos_emb")
    return {"norms": fused_norms, "norm_classes": sorted(c.__name__ for c, ok in agrees.items()
                                                         if ok),
            "rotary": rotary, "kept": kept}


def restore_rotary(model) -> list[str]:
    """Put transformers' own `apply_rotary_pos_emb` back in the modeling modules of `model`
    where an earlier run in this process (tests, a benchmark's runs) fused it: the wrap is
    process-wide, and a run that chose `transformers` must compute transformers' ops. Returns
    the modules restored."""
    restored = []
    for name, mod, fn in _rotary_functions(model):
        if hasattr(fn, _ORIGINAL):
            mod.apply_rotary_pos_emb = getattr(fn, _ORIGINAL)
            restored.append(name)
    return restored


def _rotary_functions(model):
    """(module name, module, apply_rotary_pos_emb) for each modeling module of model's classes."""
    for name in sorted({type(m).__module__ for m in model.modules()}):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if callable(fn):
            yield name, mod, fn


def _is_fused(module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is _fused_rms_norm_forward


def _head_dim(config) -> int | None:
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if config is None:
        return None
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    return hidden // heads if heads and hidden else None


# --------------------------------------------------------------------------- checks


def _value_and_grad(fn, x, grad):
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        (dx,) = torch.autograd.grad(y, [x], grad)
    return y.detach(), dx


def _value_and_grad2(fn, q, k, gq, gk):
    q, k = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    with torch.enable_grad():
        a, b = fn(q, k)
        dq, dk = torch.autograd.grad([a, b], [q, k], [gq, gk])
    return a.detach(), b.detach(), dq, dk


def _close(theirs, ours) -> bool:
    return all(t.shape == o.shape and torch.allclose(t, o, rtol=_CHECK_TOL, atol=_CHECK_TOL)
               for t, o in zip(theirs, ours, strict=True))
