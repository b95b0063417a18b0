"""The methods compared, as data. Each runs in its own fresh process (bench/worker.py, or the
real `python -m sft_scale.train` CLI for sft_scale), so peak memory is per method.

role: ceiling (the bare step), baseline (ratios are against it), peer (TRL), ours (sft_scale),
switch (one sft_scale fast-path switch flipped from its default), diagnostic (a rung of the
ladder that explains a gap; not a contender).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Method:
    name: str
    kind: str  # bare | hf | trl | sft
    role: str
    about: str
    options: dict = field(default_factory=dict)
    default: bool = True  # part of the default run
    synthetic: bool = False  # trains random rows, not the examples (no example count)
    available: bool = True
    why_not: str = ""
    slow: bool = False  # left out of --quick (e.g. torch.compile: minutes of compiling on CPU)
    group: str = ""  # methods of one group share a worker process (their reps interleave)


BASELINE = "transformers_trainer"
CEILING = "bare_step"

FIXED = [
    Method("bare_step", "bare", "ceiling",
           "the model's bare training step: the same PEFT-wrapped model on full batches of the "
           "same tokens (micro-batch x mean example length, random ids, no padding, no mask, "
           "each row causal), forward + backward + AdamW step, no data pipeline",
           {"rows": "full"}, synthetic=True),
    Method("bare_packed_row", "bare", "diagnostic",
           "the bare step with each micro-batch's tokens as one causal row (1 x micro-batch "
           "tokens): packing without example boundaries, so attention spans examples",
           {"rows": "packed"}, synthetic=True),
    Method("bare_padded", "bare", "diagnostic",
           "the bare step on the real examples batched like a plain Trainer (random order, "
           "padded to the longest row, attention mask): the cost of padding alone",
           {"rows": "padded"}),
    Method("bare_bf16", "bare", "diagnostic",
           "dtype probe: the bare step on a short packed row in fp32, then under bf16 autocast "
           "(what TRL's default bf16=True does on CPU)", {"rows": "probe"}, synthetic=True),
    Method(BASELINE, "hf", "baseline",
           "plain transformers Trainer, DataCollatorForSeq2Seq padding, the model wrapped with "
           "PEFT LoRA by hand; TrainingArguments defaults otherwise"),
    Method("trl_defaults", "trl", "peer",
           "TRL SFTTrainer with SFTConfig defaults (gradient checkpointing on, padding, fused "
           "LM head, token metrics) except precision pinned to fp32 like every method"),
    Method("trl_no_gc", "trl", "diagnostic",
           "trl_defaults with gradient_checkpointing=False: the cost of TRL's default "
           "checkpointing", {"gradient_checkpointing": False}),
    Method("trl_packing", "trl", "peer",
           "TRL packing=True (strategy bfd, which also turns on padding-free): bins of "
           "max_length tokens, per_device_train_batch_size=1, max_length chosen so the data "
           "packs into exactly steps x accumulation bins", {"packing": True}),
    Method("trl_packing_no_gc", "trl", "diagnostic",
           "trl_packing with gradient_checkpointing=False: what packing costs TRL beyond its "
           "default checkpointing (per-example attention masks from position ids, its collator)",
           {"packing": True, "gradient_checkpointing": False}),
    Method("trl_padding_free", "trl", "peer",
           "TRL padding_free=True (each micro-batch flattened into one row; needs "
           "max_length=None without packing)", {"padding_free": True, "max_length": None}),
    Method("trl_defaults_bf16", "trl", "diagnostic",
           "TRL's true defaults, bf16=True included. On a CPU-only machine SFTConfig's default "
           "refuses to start ('Your setup doesn't support bf16/gpu. You need to assign use_cpu') "
           "so this sets use_cpu=True, and bf16 autocast then runs emulated: many times slower "
           "(bare_bf16 measures by how much); not in the default run",
           {"bf16": None, "use_cpu": True}, default=False),
    Method("sft_scale", "sft", "ours",
           "`python -m sft_scale.train` with its defaults (the bench config sets only the "
           "shared model/data/LoRA/hyperparameters)"),
    # Quantized bases (fp32 LoRA is `sft_scale`): what 8-bit / 4-bit cost in speed and save in
    # memory. Not in the default run: `--methods sft_scale,sft_scale_8bit,sft_scale_4bit`.
    Method("sft_scale_8bit", "sft", "quantized",
           "sft_scale with the base in bitsandbytes LLM.int8 (quantization.load_in_8bit)",
           {"set": ["quantization.load_in_8bit=true"]}, default=False),
    Method("sft_scale_4bit", "sft", "quantized",
           "sft_scale with the base in bitsandbytes 4-bit NF4 + double quantization, fp32 "
           "compute (quantization.load_in_4bit, QLoRA)",
           {"set": ["quantization.load_in_4bit=true"]}, default=False),
]

# sft_scale fast-path switches: each value that differs from the config's default becomes a
# variant. Keys that the installed sft_scale does not know are reported as not available.
SFT_SWITCHES: list[tuple[str, list]] = [
    ("data.packing", [True, False]),
    ("data.group_by_length", [True, False]),
    ("training.gradient_checkpointing", [True, False]),
    ("model.attn_implementation", ["sdpa", "eager"]),
    ("training.loss", ["standard", "chunked", "liger"]),
    ("lora.kernel", ["auto", "peft"]),
    ("training.torch_compile", [True]),
    ("training.trim_last_layer", [True, False]),
    ("training.layer_kernels", ["auto", "transformers"]),
    ("data.num_workers", [2]),
    ("data.pin_memory", [True, False]),
]
SLOW_SWITCHES = {"training.torch_compile"}
# Switches whose point is memory get a fresh process: the others share one, and glibc keeps the
# heap an earlier run grew (freed, not returned), which the next run's peak RSS would carry.
OWN_PROCESS = {"data.packing", "training.gradient_checkpointing"}


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _resolver():
    """sft_scale's own resolution of its speed switches on this machine (what `auto` becomes),
    or None when this sft_scale has none."""
    try:
        from sft_scale.model_source import read_model_config
        from sft_scale.preflight.resolve import resolve_fast_paths
    except Exception:  # noqa: BLE001 - older/newer sft_scale: every variant simply runs
        return None
    cache = {}

    def resolve(cfg):
        key = cfg.model.name_or_path
        if key not in cache:
            cache[key] = read_model_config(cfg)
        return resolve_fast_paths(cfg, None, cache[key]).as_dict()
    return resolve


def sft_variants(base_config: str, resolve: bool = False) -> list[Method]:
    """One Method per switch value that differs from sft_scale's default; unknown keys or
    rejected values come back with available=False and the config's error message.

    resolve=True (the model folder must exist): sft_scale's own resolver decides what each
    variant means on this machine; a variant that resolves exactly like the default (e.g.
    `auto` attention is sdpa on CPU, pin_memory is ignored without CUDA) is reported as such and
    not run, and one it refuses (liger without CUDA) as not available."""
    from sft_scale.config import ConfigError, load_config

    base = load_config(base_config)
    resolver = _resolver() if resolve else None
    base_resolved = None
    if resolver is not None:
        try:
            base_resolved = resolver(base)
        except Exception:  # noqa: BLE001
            resolver = None
    out = []
    for key, values in SFT_SWITCHES:
        section, name = key.split(".")
        sec = getattr(base, section)
        if not hasattr(sec, name):
            out.append(Method(f"sft_scale[{key}]", "sft", "switch", f"switch {key}",
                              available=False,
                              why_not=f"not available: sft_scale has no config key {key}"))
            continue
        default = getattr(sec, name)
        for v in values:
            if v == default:
                continue
            label = f"sft_scale[{key.split('.')[-1]}={_yaml(v)}]"
            setting = f"{key}={_yaml(v)}"
            try:
                cfg = load_config(base_config, [setting])
                resolved = resolver(cfg) if resolver is not None else None
            except ConfigError as e:
                out.append(Method(label, "sft", "switch", f"--set {setting}", {"set": [setting]},
                                  available=False, why_not=f"not available here: {e}"))
                continue
            except Exception:  # noqa: BLE001 - cannot tell: run it
                resolved = None
            def core(r):
                return {k: v for k, v in r.items() if not k.endswith("_reason")}
            if resolved is not None and name in resolved and core(resolved) == core(base_resolved):
                same = ", ".join(f"{k}={v}" for k, v in core(resolved).items())
                out.append(Method(label, "sft", "switch", f"--set {setting}", {"set": [setting]},
                                  available=False, why_not="same as sft_scale's default on this "
                                  f"machine (sft_scale resolves both to {same}); not run"))
                continue
            out.append(Method(label, "sft", "switch",
                              f"--set {setting} (default: {_yaml(default)})", {"set": [setting]},
                              slow=key in SLOW_SWITCHES,
                              group="" if key in OWN_PROCESS else "sft_scale switches"))
    return out


def by_name(methods: list[Method]) -> dict[str, Method]:
    return {m.name: m for m in methods}
