"""Will it fit? Per-GPU memory of a training run for each ZeRO stage, from the model config alone.

Parameter counts come from the real architecture built on the meta device (no weights are read).
Model states follow DeepSpeed's accounting for mixed-precision Adam (its estimators agree, see
tests/unit/preflight/test_plan.py); activations count the tensors autograd saves in a Llama-style
decoder layer. Causal LMs only: the logits term assumes a vocabulary-sized output head.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sft_scale.errors import ConfigError
from sft_scale.model_source import read_model_config

GiB = 1024 ** 3
GPU_OVERHEAD = GiB  # CUDA context, NCCL and ZeRO bucket buffers, allocator fragmentation
HEADROOM = 0.9  # a plan that needs the last 10% of a GPU fails on the first long batch
MAX_MICRO = 1024
# DeepSpeed's default sub_group_size: ZeRO-3 makes fp32 gradients one sub-group at a time.
ZERO3_SUB_GROUP = 10 ** 9
VARIANTS = ((0, False), (1, False), (2, False), (2, True), (3, False), (3, True))
# Communication tiers, least first: ZeRO-0/1/2 move the same volume as DDP (an all-reduce is a
# reduce-scatter plus an all-gather); offload adds host transfers; ZeRO-3 gathers parameters
# again in forward and backward (1.5x); ZeRO-3+offload does both.
COMM_TIER = {(0, False): 0, (1, False): 0, (2, False): 0, (2, True): 1, (3, False): 2,
             (3, True): 3}
_SHAPES: dict[str, ModelShape] = {}

# What the chunked loss (training/loss.py) needs from a model, here where planning reads it
# without importing the training stack (torch, peft).
# fp32 logits per chunk: rows x vocab x 4 bytes stays near 256 MB whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 26

# Config attributes of models whose forward post-processes the LM head's output (soft-capping,
# scaling): the chunked/liger paths apply the bare head and would compute another loss.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                         "output_multiplier_scale", "mup_width_multiplier")


def chunked_unsupported(model_config) -> str | None:
    """Why the chunked/liger loss would be wrong for this model (None: it is right)."""
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(model_config, attr, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"the model post-processes its logits ({attr}={value})"
    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    return None


@dataclass
class ModelShape:
    total_params: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    gated_mlp: bool
    dtype: str  # the checkpoint's dtype (what model.dtype: auto loads)
    output_head: str  # PEFT's all-linear leaves this Linear out
    largest_module_params: int  # ZeRO-3 gathers one module's own parameters at a time
    linear_shapes: dict[str, tuple[int, int, bool]]  # name -> (in, out, has bias)
    module_params: dict[str, int]  # name -> parameters under it (for lora.modules_to_save)
    chunked_loss_ok: bool = True  # False when the model post-processes its logits

    @property
    def linear_params(self) -> dict[str, int]:
        return {n: i * o + (o if b else 0) for n, (i, o, b) in self.linear_shapes.items()}


def _model_config(src):
    # torch and transformers load in the functions that build the model only: slurm.py imports
    # this module, and the CLI imports slurm.py to build its parser (start-up time of every
    # command, on login nodes).
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(src, PretrainedConfig):
        return src
    if isinstance(src, (str, Path)):
        return AutoConfig.from_pretrained(str(src))
    return read_model_config(src, required=True)  # an sft_scale Config


def model_shape(src) -> ModelShape:
    """`src`: an sft_scale Config, a model folder, a config.json path or a transformers config."""
    mc = _model_config(src)
    key = mc.to_json_string()
    if key not in _SHAPES:
        _SHAPES[key] = _build_shape(mc)
    return _SHAPES[key]


def _build_shape(mc) -> ModelShape:
    import torch  # see _model_config
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(mc)
    model.tie_weights()  # under init_empty_weights transformers leaves tied heads untied
    head = model.get_output_embeddings()
    linears, counts, head_name, largest = {}, {}, "", 0
    for name, m in model.named_modules():
        counts[name] = sum(p.numel() for p in m.parameters())
        largest = max(largest, sum(p.numel() for p in m.parameters(recurse=False)))
        if m is head:
            head_name = name
        if isinstance(m, torch.nn.Linear):
            linears[name] = (m.in_features, m.out_features, m.bias is not None)
    heads = mc.num_attention_heads
    dtype = str(getattr(mc, "dtype", None) or getattr(mc, "torch_dtype", None) or "float32")
    return ModelShape(
        total_params=counts[""], hidden_size=mc.hidden_size, num_layers=mc.num_hidden_layers,
        num_heads=heads, num_kv_heads=getattr(mc, "num_key_value_heads", None) or heads,
        head_dim=getattr(mc, "head_dim", None) or mc.hidden_size // heads,
        intermediate_size=getattr(mc, "intermediate_size", None) or 4 * mc.hidden_size,
        vocab_size=mc.vocab_size, tied_embeddings=bool(getattr(mc, "tie_word_embeddings", False)),
        gated_mlp=any("gate" in n.rsplit(".", 1)[-1] for n in linears),
        dtype=dtype.replace("torch.", ""), output_head=head_name, largest_module_params=largest,
        linear_shapes=linears, module_params=counts,
        chunked_loss_ok=chunked_unsupported(mc) is None)


def matches_module(name: str, key: str) -> bool:
    """PEFT's rule for a target_modules list entry: the full name, or its dotted suffix."""
    return name == key or name.endswith("." + key)


def lora_targets(shape: ModelShape, target_modules) -> list[str]:
    """The Linear layers PEFT wraps: all-linear is every Linear but the output head; a string is a
    regex over full names; a list matches name suffixes."""
    names = list(shape.linear_shapes)
    if target_modules == "all-linear":
        found = [n for n in names if n != shape.output_head]
    elif isinstance(target_modules, str):
        found = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        found = [n for n in names if any(matches_module(n, t) for t in target_modules)]
    if not found:
        raise ConfigError(f"lora.target_modules={target_modules!r} matches no Linear layer; "
                          f"this model has {sorted({n.rsplit('.', 1)[-1] for n in names})} "
                          "(or use 'all-linear')")
    return found


def lora_params(shape: ModelShape, lora) -> int:
    """r*(in+out) per targeted Linear, plus a full trainable copy of each modules_to_save."""
    n = sum(lora.r * (shape.linear_shapes[t][0] + shape.linear_shapes[t][1])
            for t in lora_targets(shape, lora.target_modules))
    return n + sum(c for name, c in shape.module_params.items()
                   if any(matches_module(name, k) for k in lora.modules_to_save))


def dtype_bytes(cfg, shape: ModelShape) -> int:
    d = cfg.model.dtype if cfg.model.dtype != "auto" else shape.dtype
    return 2 if d in ("bf16", "fp16", "bfloat16", "float16") else 4


# bitsandbytes 4-bit: one absmax per 64 weights; double quantization stores those as uint8 with
# one fp32 absmax per 256 of them, a 256-entry fp32 code book and an fp32 offset per layer;
# every layer keeps its 16-entry fp32 NF4/FP4 code book.
BNB4_BLOCK, BNB4_BLOCK2 = 64, 256


def bnb4_linear_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit Linear weight of `n` parameters: 0.5 byte per parameter
    packed, plus its quantization constants (functional.quantize_4bit's QuantState)."""
    blocks = -(-n // BNB4_BLOCK)
    constants = 16 * 4
    if double_quant:
        constants += blocks + 4 * -(-blocks // BNB4_BLOCK2) + 256 * 4 + 4
    else:
        constants += 4 * blocks
    return -(-n // 2) + constants


def _base_weight_bytes(cfg, shape: ModelShape, wb: int) -> int:
    q4 = cfg.quantization.load_in_4bit
    if not (cfg.quantization.load_in_8bit or q4):
        return shape.total_params * wb
    if q4:  # the output head stays unquantized, the rest is upcast to fp32 as for 8-bit
        q = {n: i * o for n, (i, o, _) in shape.linear_shapes.items() if n != shape.output_head}
        packed = sum(bnb4_linear_bytes(n, cfg.quantization.bnb_4bit_use_double_quant)
                     for n in q.values())
        return packed + 4 * (shape.total_params - sum(q.values()))
    # int8 Linear weights plus one fp32 scale per output row; bitsandbytes keeps the output head
    # unquantized. prepare_model_for_kbit_training upcasts every non-int8 parameter to fp32, but
    # the DeepSpeed engine (every variant planned here) then casts all floating-point parameters
    # to its bf16/fp16 compute dtype: they cost `wb` bytes, not 4.
    q = {n: s for n, s in shape.linear_shapes.items() if n != shape.output_head}
    int8 = sum(i * o for i, o, _ in q.values())
    return int8 + 4 * sum(o for _, o, _ in q.values()) + wb * (shape.total_params - int8)


def model_states(cfg, shape: ModelShape, stage: int, offload: bool, world: int) -> dict:
    """Per-GPU bytes of weights, fp32 master copy, gradients and AdamW states."""
    wb = dtype_bytes(cfg, shape)
    if cfg.lora.enabled:
        # Adapters on an 8-bit base are fp32 after PEFT, and DeepSpeed casts them to `wb` too.
        trainable, frozen, tb = lora_params(shape, cfg.lora), _base_weight_bytes(cfg, shape, wb), wb
    else:
        trainable, frozen, tb = shape.total_params, 0, wb
    mixed = tb == 2  # 16-bit training keeps fp32 master weights and fp32 gradients for the step
    weights = frozen + trainable * tb
    master = 4 * trainable if mixed else 0
    grads16, grads32 = trainable * tb, (4 * trainable if mixed else 0)
    # AdamW: exp_avg and exp_avg_sq in fp32, or in bitsandbytes' block-wise 8-bit
    optim = (2 if cfg.training.optimizer.endswith("adamw_8bit") else 8) * trainable
    if stage >= 1:  # ZeRO-1: each rank owns 1/world of the optimizer step
        master, grads32, optim = master / world, grads32 / world, optim / world
    if stage >= 2:
        grads16 /= world
    if stage == 3:
        # Parameters partitioned too, plus the gathered working set: one module's params and grads.
        weights = weights / world + 2 * shape.largest_module_params * wb
        grads32 = min(grads32, 4 * ZERO3_SUB_GROUP)
    cpu = 0.0
    if offload:  # the optimizer step (and its gradients) runs on the CPU
        cpu = master + grads32 + optim + grads16
        master = grads32 = optim = grads16 = 0
        if stage == 3:  # ...and parameters wait in CPU memory between uses
            partition = weights - 2 * shape.largest_module_params * wb
            cpu, weights = cpu + partition, weights - partition
    return {"weights": int(weights), "master": int(master), "grads": int(grads16 + grads32),
            "optimizer": int(optim), "cpu_offloaded": int(cpu), "trainable_params": trainable}


def loss_kind(cfg, shape: ModelShape, stage: int | None) -> str:
    """standard or chunked: how the loss's memory behaves for training.loss under this stage.
    Liger's fused loss holds one chunk of logits at a time too, so it plans as chunked."""
    choice = cfg.training.loss
    if cfg.task != "causal_lm" or choice == "standard" or stage == 3 \
            or (choice == "auto" and not shape.chunked_loss_ok):
        return "standard"  # auto under ZeRO-3 is standard (sft_scale/training/loss.py says why)
    return "chunked"


def activation_bytes(cfg, shape: ModelShape, micro: int, loss: str = "standard") -> dict:
    """Saved activations of all layers and the loss's logits for one micro-batch."""
    s = cfg.data.max_seq_len
    tokens = micro * s
    ab = dtype_bytes(cfg, shape)  # activations are in the compute dtype
    h, hd = shape.hidden_size, shape.head_dim
    q, kv = shape.num_heads * hd, shape.num_kv_heads * hd
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate_size  # gate, up, act(gate), product
    # RMSNorm keeps its fp32 upcast of the input, its output, and (when its weight trains) the
    # normalised input; autograd saves nothing for a frozen weight.
    norm = 4 * h + ab * h * (1 if cfg.lora.enabled else 2)
    # Per token, per layer: query, attention output, key, value, MLP intermediates, two norms.
    # SDPA/flash kernels keep no attention matrix; eager keeps the fp32 softmax and its cast.
    per_token = ab * (2 * q + 2 * kv + mlp) + 2 * norm
    if cfg.model.attn_implementation == "eager":
        per_token += shape.num_heads * s * (4 + ab)
    if cfg.lora.enabled:
        targets = lora_targets(shape, cfg.lora.target_modules)
        extra = sum(cfg.lora.r * ab + (shape.linear_shapes[t][0] * (ab + 1)
                                       if cfg.lora.dropout > 0 else 0) for t in targets)
        per_token += extra / shape.num_layers  # lora_A's output; dropout copy of x and its mask
    layer = tokens * per_token
    if loss == "standard":
        # The loss upcasts logits to fp32; log-softmax keeps its output, and backward makes two
        # more vocabulary-sized fp32 tensors (the gradients of the loss and of the log-softmax).
        logits = tokens * shape.vocab_size * 12
    else:
        # One chunk of fp32 logits, log-softmax and gradient at a time (training/loss.py), plus
        # the selected hidden states and their fp32 gradient, kept for backward (an upper bound:
        # only trained positions are selected).
        rows = min(tokens, max(1, CHUNK_ELEMENTS // shape.vocab_size))
        logits = rows * shape.vocab_size * 12 + tokens * h * (4 + ab)
    if cfg.training.gradient_checkpointing:
        # Each layer keeps only its input. Backward recomputes one layer at a time, after the
        # logits' buffers are gone, so that layer only adds where it is the larger of the two.
        layers = shape.num_layers * tokens * h * ab + max(0, layer - logits)
    else:
        layers = shape.num_layers * layer
    return {"activations": int(layers + tokens * norm), "logits": int(logits)}


def _row(cfg, shape, stage, offload, world, micro, overhead) -> dict:
    r = {"stage": stage, "offload": offload, "name": f"ZeRO-{stage}" + ("+offload" * offload)}
    if stage == 3 and cfg.quantization.load_in_8bit:
        return dict(r, supported=False, total=None, reason="not supported: 8-bit (LLM.int8) "
                    "weights cannot be partitioned by ZeRO-3")
    r.update(supported=True, **model_states(cfg, shape, stage, offload, world))
    r.update(activation_bytes(cfg, shape, micro, loss_kind(cfg, shape, stage)), overhead=overhead)
    r["total"] = sum(r[k] for k in ("weights", "master", "grads", "optimizer", "activations",
                                    "logits", "overhead"))
    return r


def _largest_micro(fits) -> int | None:
    """The largest m in 1..MAX_MICRO with fits(m), for a `fits` that is monotonic in m."""
    if not fits(1):
        return None
    lo = 1
    while lo * 2 <= MAX_MICRO and fits(lo * 2):
        lo *= 2
    hi = min(lo * 2, MAX_MICRO + 1)  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(cfg, world_size: int, gpu_memory_bytes: int, micro_batch: int | None = None,
             overhead_bytes: int = GPU_OVERHEAD, headroom: float = HEADROOM,
             model_config=None) -> dict:
    """Per-GPU bytes for every ZeRO variant, which fit in `headroom` of the GPU, the largest
    micro-batch each allows, and the recommendation. JSON-serialisable. `model_config`: the
    model's config when the caller has read it already (sft_scale.preflight.resolve)."""
    shape = model_shape(model_config if model_config is not None else cfg)
    micro = micro_batch or cfg.training.micro_batch_size
    budget = int(gpu_memory_bytes * headroom)
    rows = []
    for stage, offload in VARIANTS:
        r = _row(cfg, shape, stage, offload, world_size, micro, overhead_bytes)
        if r["supported"]:
            r["fits"] = r["total"] <= budget
            r["max_micro_batch"] = _largest_micro(lambda m, stage=stage, offload=offload: _row(
                cfg, shape, stage, offload, world_size, m, overhead_bytes)["total"] <= budget)
        else:
            r.update(fits=False, max_micro_batch=None)
        rows.append(r)
    trainable = rows[0]["trainable_params"]
    plan = {"model": cfg.model.name_or_path, "total_params": shape.total_params,
            "trainable_params": trainable, "lora": cfg.lora.enabled,
            "load_in_8bit": cfg.quantization.load_in_8bit, "dtype": cfg.model.dtype,
            "seq_len": cfg.data.max_seq_len, "micro_batch": micro,
            "gradient_checkpointing": cfg.training.gradient_checkpointing,
            "world_size": world_size, "gpu_memory": gpu_memory_bytes, "budget": budget,
            "headroom": headroom, "overhead": overhead_bytes, "rows": rows,
            "shape": {k: v for k, v in asdict(shape).items()
                      if k not in ("linear_shapes", "module_params")}}
    plan["quantization"] = quant_mode(cfg)
    plan["recommendation"], plan["explanation"] = recommend(plan)
    if plan["recommendation"] is None or plan["recommendation"]["offload"]:
        hint = _quantized_alternative(cfg, world_size, gpu_memory_bytes, micro_batch,
                                      overhead_bytes, headroom, model_config)
        if hint:
            plan["quantization_hint"] = hint
            plan["explanation"] += ". " + hint["text"]
    return plan


def quant_mode(cfg) -> str | None:
    q = cfg.quantization
    return "4-bit" if q.load_in_4bit else "8-bit" if q.load_in_8bit else None


def _quantized_alternative(cfg, world_size, gpu_memory_bytes, micro_batch, overhead_bytes,
                           headroom, model_config) -> dict | None:
    """For LoRA on an unquantized base that does not fit (or only with offload): the first of
    8-bit and 4-bit whose plan fits without offload, as the setting to add."""
    if not cfg.lora.enabled or quant_mode(cfg):
        return None
    for key, name in (("load_in_8bit", "8-bit"), ("load_in_4bit", "4-bit")):
        alt = dataclasses.replace(cfg, quantization=dataclasses.replace(cfg.quantization,
                                                                        **{key: True}))
        rec = estimate(alt, world_size, gpu_memory_bytes, micro_batch, overhead_bytes,
                       headroom, model_config)["recommendation"]
        if rec and not rec["offload"]:
            return {"quantization": name, "set": f"quantization.{key}=true", **rec,
                    "text": f"With a {name} base it fits: --set quantization.{key}=true -> "
                            f"{rec['name']}, micro-batch up to {rec['micro_batch']}"}
    return None


def recommend(plan: dict) -> tuple[dict | None, str]:
    """In the least-communication tier (COMM_TIER) where a variant fits the configured
    micro-batch, the one with the most headroom (ZeRO-2 over ZeRO-1 over ZeRO-0 at equal traffic;
    the lower stage on a tie); else, in the first tier where one fits a smaller micro-batch, the
    one that fits the largest; else None. With a sentence saying why."""
    rows = [r for r in plan["rows"] if r["supported"]]
    fit = _best_of_first_tier([r for r in rows if r["fits"]], lambda r: r["total"])
    r = fit or _best_of_first_tier([r for r in rows if r["max_micro_batch"]],
                                   lambda r: -r["max_micro_batch"])
    if r is None:
        least = min((r["total"] - r["activations"] - r["logits"] for r in rows), default=0)
        return None, (f"nothing fits {_gib(plan['budget'])} per GPU even at micro-batch 1 "
                      f"(model states alone need at least {_gib(least)}): use more GPUs, LoRA, "
                      "gradient checkpointing or a shorter data.max_seq_len")
    pick = {"stage": r["stage"], "offload": r["offload"], "name": r["name"],
            "micro_batch": r["max_micro_batch"]}
    if fit:
        return pick, (f"{r['name']} fits micro-batch {plan['micro_batch']} ({_gib(r['total'])} "
                      f"of {_gib(plan['budget'])}); the largest that fits is "
                      f"{r['max_micro_batch']}")
    return pick, (f"micro-batch {plan['micro_batch']} fits nowhere; {r['name']} fits "
                  f"{r['max_micro_batch']}: lower training.micro_batch_size and raise "
                  "gradient_accumulation_steps to keep the global batch")


def _best_of_first_tier(rows: list[dict], key) -> dict | None:
    if not rows:
        return None
    tier = min(COMM_TIER[(r["stage"], r["offload"])] for r in rows)
    return min((r for r in rows if COMM_TIER[(r["stage"], r["offload"])] == tier), key=key)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def format_table(plan: dict) -> str:
    cols = ("weights", "master", "grads", "optimizer", "activations", "logits", "overhead",
            "total")
    mode = "LoRA" + (f" on {plan['quantization']}" if plan.get("quantization") else "") \
        if plan["lora"] else "full fine-tuning"
    lines = [f"{plan['model']}: {plan['total_params'] / 1e9:.2f}B params, "
             f"{plan['trainable_params'] / 1e6:,.1f}M trainable ({mode}), {plan['dtype']}, "
             f"seq {plan['seq_len']}, micro-batch {plan['micro_batch']}"
             + (", gradient checkpointing" if plan["gradient_checkpointing"] else ""),
             f"{plan['world_size']} GPU(s) x {_gib(plan['gpu_memory'])}; a variant fits when its "
             f"total is under {_gib(plan['budget'])} ({plan['headroom']:.0%}). GiB per GPU:",
             f"{'variant':<15}" + "".join(f"{c:>12}" for c in cols)
             + f"{'fits':>6}{'max micro':>11}"]
    for r in plan["rows"]:
        if not r["supported"]:
            lines.append(f"{r['name']:<15}  {r['reason']}")
            continue
        lines.append(f"{r['name']:<15}" + "".join(f"{r[c] / GiB:>12.2f}" for c in cols)
                     + f"{'yes' if r['fits'] else 'no':>6}{r['max_micro_batch'] or '-':>11}")
    rec = plan["recommendation"]
    head = f"recommendation: {rec['name']}, micro-batch up to {rec['micro_batch']}. " if rec \
        else "recommendation: none. "
    return "\n".join(lines + [head + plan["explanation"]])


def parse_size(text: str) -> int:
    """'80GiB', '80G' (GiB, as nvidia-smi reports), '80GB' (10^9), '81920MiB' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"not a memory size: {text!r}; write e.g. 80GiB")
    power = " KMGT".index((m.group(2) or " ").upper())
    base = 1000 if m.group(3).upper() == "B" else 1024
    return int(float(m.group(1)) * base ** power)
