"""Tokenizer and model: dtype, attention, bitsandbytes 8-bit/4-bit, k-bit preparation, LoRA
(PEFT)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from sft_scale import optional
from sft_scale.config import Config, ConfigError
from sft_scale.model_source import resolve_model_path
from sft_scale.training import layer_kernels, lora_kernel, trained_rows
from sft_scale.training.attention import attention_for_load

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


def load_tokenizer(cfg: Config):
    path = resolve_model_path(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision,
                              "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    tok = open_tokenizer(path, revision=cfg.model.revision,
                         trust_remote_code=cfg.model.trust_remote_code)
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer {path!r} has no EOS token: generation could never stop. "
                          "Use a tokenizer with an eos_token, or set model.tokenizer to one.")
    if cfg.model.add_tokens:
        tok.add_tokens(list(cfg.model.add_tokens))
    if cfg.model.add_special_tokens:
        tok.add_tokens(list(cfg.model.add_special_tokens), special_tokens=True)
    if tok.pad_token is None:
        # Reusing EOS as pad is safe here because labels come from our own mask, never from
        # `input_ids != pad`, so the EOS we append after each answer is still trained.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using EOS (%r) for padding", tok.eos_token)
    return tok


def quantized(cfg: Config) -> bool:
    return cfg.quantization.load_in_8bit or cfg.quantization.load_in_4bit


def compute_dtype(cfg: Config) -> torch.dtype:
    """4-bit layers dequantize to this dtype for each matmul: bnb_4bit_compute_dtype, else the
    model's dtype (fp32 for auto: the checkpoint's dtype is not known before loading)."""
    name = cfg.quantization.bnb_4bit_compute_dtype or cfg.model.dtype
    return DTYPES[name] if name != "auto" else torch.float32


def quant_storage_dtype(cfg: Config, zero_stage: int | None) -> torch.dtype:
    """uint8 packs two 4-bit values per byte. ZeRO-3 flattens and partitions parameters of one
    floating dtype, so under it the packed bytes are stored as the compute dtype instead (the
    same bytes, viewed as bf16/fp32 elements), as PEFT's "DeepSpeed + QLoRA" guide does."""
    name = cfg.quantization.bnb_4bit_quant_storage
    if name == "auto":
        return compute_dtype(cfg) if zero_stage == 3 else torch.uint8
    return torch.uint8 if name == "uint8" else DTYPES[name]


# bitsandbytes (0.50) repacks a Linear4bit's weight, in place, into a CPU inference layout the
# first time the layer runs in eval mode without grad on a CPU with AVX512-BF16
# (`Linear4bit.forward`, `_convert_weight_packed_for_cpu`). The repack needs out_features to be a
# multiple of 32 and in_features a multiple of the quantization block (64), so a layer of another
# width fails there (the test models; seen on an Intel Xeon, where every 4-bit run with validation
# died). In a training run, which switches between eval and training and saves checkpoints as it
# goes, the repacked layout would carry into the training steps and the saved state, and its
# kernel computes differently (logits ~1e-2 apart): a run's numbers would depend on the CPU.
_BNB_CPU_REPACK_BLOCK = 32


def keep_4bit_cpu_layout(model, *, all_layers: bool) -> int:
    """Turn bitsandbytes' CPU inference repack off in every Linear4bit of `model` (all_layers:
    training) or only in those it cannot repack (inference: the others keep the faster layout).
    Returns how many layers it turned off."""
    off = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False) and (
                all_layers or not _bnb_cpu_repackable(m)):
            m.support_avx512bf16_for_cpu = False
            off += 1
    return off


def _bnb_cpu_repackable(layer) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    block = getattr(state, "blocksize", None) or 64
    return layer.out_features % _BNB_CPU_REPACK_BLOCK == 0 and layer.in_features % block == 0


def bnb_config(cfg: Config, zero_stage: int | None = None):
    """The BitsAndBytesConfig for `cfg.quantization`, or None when the base is not quantized."""
    q = cfg.quantization
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.llm_int8_threshold)
    if q.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype(cfg),
            bnb_4bit_quant_storage=quant_storage_dtype(cfg, zero_stage))
    return None


def open_tokenizer(path: str, **kwargs):
    """AutoTokenizer.from_pretrained, with a clear error where a SentencePiece-only tokenizer
    (tokenizer.model, no tokenizer.json) meets a machine without sentencepiece: transformers
    then falls through to its tiktoken reader and says "`tiktoken` is required"."""
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (ValueError, ImportError, OSError) as e:
        folder = Path(path)
        if (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file() \
                and not optional.is_available("sentencepiece"):
            raise ConfigError(f"{folder / 'tokenizer.model'}: a SentencePiece tokenizer, and the "
                              "sentencepiece package is not installed; install it with "
                              "`pip install sentencepiece protobuf` (sft_scale depends on both)"
                              ) from e
        raise


def load_model(cfg: Config, resolved, device_index: int | None = None,
               labels: list[str] | None = None, problem: str | None = None,
               pad_token_id: int | None = None):
    """The model, quantized and wrapped with LoRA as the config says, ready for training: a causal
    LM, or for task: classification a sequence-classification head over `labels`. `resolved`:
    the run's sft_scale.preflight.resolve.Resolved (model path, attention, ZeRO stage)."""
    path, zero_stage = resolved.model_path, resolved.zero_stage
    kwargs = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                  dtype=DTYPES[cfg.model.dtype],
                  attn_implementation=attention_for_load(resolved.fast.attention_kernel),
                  use_safetensors=True)
    quant = bnb_config(cfg, zero_stage)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if zero_stage != 3:  # under ZeRO-3 transformers places (and partitions) the weights
            # bitsandbytes quantizes while placing weights, so each rank loads onto its own device.
            kwargs["device_map"] = {"": device_index if torch.cuda.is_available() else "cpu"}
    if cfg.task == "classification":
        # Binary: one logit with BCE; otherwise one logit per label.
        # (A binary head's single logit scores the second label; id2label must say so, since
        # transformers derives num_labels from it.)
        names = labels[1:] if problem == "binary" else labels
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)},
                      problem_type="multi_label_classification" if problem == "multi_label"
                      else "single_label_classification", pad_token_id=pad_token_id)
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is not None:
        layer = "Linear8bitLt" if cfg.quantization.load_in_8bit else "Linear4bit"
        n = sum(type(m).__name__ == layer for m in model.modules())
        if n == 0:
            raise RuntimeError(f"quantization was asked for but {path} loaded no {layer} layer")
        what = "LLM.int8" if cfg.quantization.load_in_8bit else (
            f"4-bit {quant.bnb_4bit_quant_type}, double quantization "
            f"{quant.bnb_4bit_use_double_quant}, compute {quant.bnb_4bit_compute_dtype}, "
            f"storage {quant.bnb_4bit_quant_storage}")
        log.info("quantization: bitsandbytes %s, %d %s layers", what, n, layer)
        if cfg.quantization.load_in_4bit:
            keep_4bit_cpu_layout(model, all_layers=True)
    model.config.use_cache = False  # the KV cache only costs memory during training
    token_ids = resize_for_added_tokens(model, cfg)

    gc = cfg.training.gradient_checkpointing
    trim = resolved.fast.trim_last_layer
    # A trimmed layer recomputed in backward must see the rows its forward saw.
    gc_kwargs = {"use_reentrant": False}
    if trim:
        gc_kwargs["context_fn"] = trained_rows.recompute_context
    if quant is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    # transformers (here) and PEFT (in get_peft_model) each hook the embeddings so that their
    # output requires grad, which only reentrant checkpointing needs. Ours is non-reentrant, and
    # with frozen embeddings the hook makes autograd compute the first layer's input gradients
    # for nothing (tests/unit/training/test_model.py: the grads agree). Each call removes the
    # hook registered last, so it runs after each of the two.
    unhook = gc and cfg.lora.enabled
    if unhook:
        model.disable_input_require_grads()

    if cfg.lora.enabled:
        model = wrap_lora(model, cfg, token_ids, resolved.fast.lora_kernel)
        if unhook:
            model.get_base_model().disable_input_require_grads()
    base = model.get_base_model() if cfg.lora.enabled else model
    if resolved.fast.layer_kernels != layer_kernels.FUSED:
        if restored := layer_kernels.restore_rotary(base):
            log.info("layer_kernels: transformers' rotary restored in %s (an earlier run in "
                     "this process had fused it)", ", ".join(restored))
    else:  # after PEFT: its modules_to_save copies are fused too
        fused = layer_kernels.install(base)
        log.info("layer_kernels: %d RMSNorm modules fused (%s), rotary fused in %s%s",
                 fused["norms"], ", ".join(fused["norm_classes"]) or "none",
                 ", ".join(fused["rotary"]) or "none",
                 f"; transformers' own kept for {', '.join(fused['kept'])} (not equal)"
                 if fused["kept"] else "")
    if trim:  # after PEFT: the hooks go on the modules PEFT put in place
        names, why = trained_rows.install(base)
        log.info("trim_last_layer: %s", f"at trained positions only: {why}" if names
                 else f"nothing to trim ({why}); every position is computed")
    return model


def added_token_ids(tokenizer, cfg: Config) -> list[int]:
    """Ids of the tokens that model.add_tokens / add_special_tokens name (new or already there:
    a model's untrained reserved tokens need their rows trained just the same)."""
    return sorted(set(tokenizer.convert_tokens_to_ids(
        list(cfg.model.add_tokens) + list(cfg.model.add_special_tokens))))


def resize_for_added_tokens(model, cfg: Config, mean_resizing: bool = True) -> list[int]:
    """Grow the embedding (and an untied LM head) to the tokenizer with the added tokens; the ids
    whose rows must be trained. New rows are drawn around the mean of the old ones (transformers'
    mean_resizing), so a new token starts out as an average token, not as noise."""
    if not (cfg.model.add_tokens or cfg.model.add_special_tokens):
        return []
    tokenizer = load_tokenizer(cfg)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
        log.info("tokens: embedding resized from %d to %d rows for model.add_tokens / "
                 "add_special_tokens", rows, len(tokenizer))
    # Every new row is trained and saved, so a reload reproduces it whatever its initial value.
    return sorted(set(added_token_ids(tokenizer, cfg)) | set(range(rows, len(tokenizer))))


def trainable_tokens(model, token_ids: list[int]):
    """peft's trainable_token_indices for the added tokens' rows: the input embedding, and the
    LM head too when it is not tied to it (the model must learn to emit the new tokens)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    if head is None or head.weight is emb.weight:
        return list(token_ids)
    return {names[emb]: list(token_ids), names[head]: list(token_ids)}


def wrap_lora(model, cfg: Config, token_ids: list[int] | None = None,
              kernel: str = lora_kernel.PEFT):
    """LoRA as configured. With added tokens only their embedding (and LM head) rows are trained
    and saved (peft trainable_token_indices) rather than whole matrices (modules_to_save on
    embed_tokens/lm_head): for Llama-3-8B that is 2 x 4096 values per token, not 2 x 525M.
    `kernel`: the run's resolved `lora.kernel` (fused: see sft_scale.training.lora_kernel)."""
    lc = cfg.lora
    tokens = trainable_tokens(model, token_ids) if token_ids else None
    if tokens is not None:
        emb = model.get_input_embeddings().weight
        n_mats = 1 if isinstance(tokens, list) else 2
        per = emb.shape[1] * emb.element_size()
        log.info("tokens: training %d added token rows in %d matri%s (peft "
                 "trainable_token_indices): +%d parameters, +%.2f MiB in the adapter (whole "
                 "matrices via modules_to_save would add %.1f MiB)", len(token_ids), n_mats,
                 "x" if n_mats == 1 else "ces", len(token_ids) * emb.shape[1] * n_mats,
                 len(token_ids) * per * n_mats / 2**20, emb.shape[0] * per * n_mats / 2**20)
    peft_cfg = LoraConfig(
        # SEQ_CLS makes PEFT train and save the new classification head with the adapter.
        task_type="SEQ_CLS" if cfg.task == "classification" else "CAUSAL_LM",
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        target_modules=lc.target_modules, modules_to_save=lc.modules_to_save or None,
        bias=lc.bias, trainable_token_indices=tokens)
    if kernel == lora_kernel.FUSED:
        lora_kernel.register(peft_cfg)
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__})
        raise ConfigError(f"lora.target_modules={lc.target_modules!r} does not fit this model "
                          f"({e}). Linear layers it has: {names}; or use 'all-linear'.") from None


def compile_model(model) -> int:
    """torch.compile in place, block by block (regional compilation): each repeated block (the
    decoder layers) is compiled with `Module.compile()`, the rest stays eager. This is what
    Accelerate's dynamo plugin does with `use_regional_compilation` under DeepSpeed; we do it for
    every backend, before `accelerator.prepare`, because in place the module tree, parameter
    names and state dicts stay unchanged (PEFT saving, checkpoints and resume need no unwrapping),
    and compile time is one block's rather than the whole model's. Returns the blocks compiled."""
    def blocks(module) -> int:
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 \
                and all(type(m) is type(module[0]) for m in module):
            for m in module:
                m.compile(dynamic=True)  # SFT shapes vary every step
            return len(module)
        return sum(blocks(c) for c in module.children())

    n = blocks(model)
    if n == 0:
        model.compile(dynamic=True)
        log.info("torch.compile: no repeated blocks found; compiled the whole model")
    else:
        log.info("torch.compile: %d repeated blocks compiled (regional compilation)", n)
    return n


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
