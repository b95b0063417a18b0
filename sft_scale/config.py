"""One YAML file -> one typed, validated config object.

Every error names the file, the line (when the key came from YAML), the dotted key, what was
expected and the nearest valid key, because a typo in a config should cost seconds, not a
cluster job.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sft_scale.errors import ConfigError  # noqa: F401  (re-exported: its historic home)


class ReadOnlyAfterLoad:
    """Config sections are read-only once loaded: what a run decides from them (auto values, the
    DeepSpeed JSON, packing) lives on sft_scale.preflight.resolve.Resolved, so the config a run
    saves is the one its user wrote. `dataclasses.replace` makes an edited copy where needed."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_read_only"):
            raise AttributeError(
                f"{type(self).__name__}.{name}: the config is read-only after loading; derive "
                "values in sft_scale.preflight.resolve or use dataclasses.replace for a copy")
        super().__setattr__(name, value)


def _make_read_only(section: Any) -> None:
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _make_read_only(value)
        elif isinstance(value, list):
            for item in value:
                if dataclasses.is_dataclass(item):
                    _make_read_only(item)
    object.__setattr__(section, "_read_only", True)


# Each field is documented once, by the string under it (an attribute docstring, as torchtitan's
# configs.py and litgpt's args.py write them): it sits next to the field without touching its
# line, editors show it, and sft_scale/config_reference.py reads it (with ast) to render README's
# config reference, which tests/unit/test_config_reference.py keeps in step.
@dataclass
class ModelConfig(ReadOnlyAfterLoad):
    name_or_path: str = "builtin:tiny-llama"
    """A local folder or a hub id; `builtin:tiny-llama` is the embedded demo model."""
    tokenizer: str | None = None
    """The tokenizer's folder or hub id; null: the model's own (`name_or_path`)."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens added to the tokenizer (e.g. tool-call tags). The embedding grows to fit; with LoRA
    only the new rows are trained and saved (peft `trainable_token_indices`), see README "Adding
    tokens"."""
    add_special_tokens: list[str] = field(default_factory=list)
    """Like `add_tokens`, as special tokens: never split, dropped by
    `decode(skip_special_tokens=True)`."""
    revision: str | None = None
    """The hub revision (branch, tag or commit) of the model and tokenizer; null: the default
    branch. Pin it for reproducible runs, and always with `trust_remote_code`."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """The dtype the weights load and train in; auto: the checkpoint's own."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto: flash_attention_2 when flash_attn is installed, CUDA is available and dtype is
    bf16/fp16; else sdpa (with packing: our per-example SDPA, sft_scale/training/attention.py)."""
    trust_remote_code: bool = False
    """Run the Python files shipped in the model's repository (in every training, merge and export
    process). Off: transformers refuses such a model. Only for code you have read."""


@dataclass
class QuantizationConfig(ReadOnlyAfterLoad):
    load_in_8bit: bool = False
    """bitsandbytes LLM.int8 frozen base weights. LoRA only; exclusive with `load_in_4bit`."""
    llm_int8_threshold: float = 6.0
    """LLM.int8's outlier threshold: activations above it are computed in 16-bit."""
    load_in_4bit: bool = False
    """bitsandbytes 4-bit frozen base weights (QLoRA, least memory). LoRA only; exclusive with
    `load_in_8bit`."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """nf4: QLoRA's normal-float 4-bit; fp4: plain 4-bit float."""
    bnb_4bit_use_double_quant: bool = True
    """Quantize the per-block scales too (~0.37 fewer bits per parameter, QLoRA's default)."""
    bnb_4bit_compute_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """The dtype 4-bit layers dequantize to and compute in; null follows `model.dtype`."""
    bnb_4bit_quant_storage: Literal["auto", "uint8", "fp32", "bf16", "fp16"] = "auto"
    """The dtype the packed 4-bit bytes are stored as. auto: uint8, except under ZeRO-3 the compute
    dtype, so that ZeRO-3 can partition them with the other weights (PEFT's "DeepSpeed + QLoRA"
    route; sft_scale/training/model.py: quant_storage_dtype)."""


@dataclass
class LoraConfig(ReadOnlyAfterLoad):
    enabled: bool = True
    """Train a LoRA adapter on the frozen base; false means full fine-tuning."""
    r: int = 8
    """The adapter's rank (>= 1)."""
    alpha: int = 16
    """The adapter's scale is alpha / r; > 0, e.g. 2 * r."""
    dropout: float = 0.05
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """The modules that get an adapter: "all-linear" (every linear layer but the output head) or a
    list of module names."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (a classification head already is).
    For new tokens use `model.add_tokens`, which trains only their rows."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, all of them, or those of the adapted modules (peft's `bias`)."""
    kernel: Literal["auto", "peft"] = "auto"
    """How adapted Linear layers compute: auto fuses the frozen layer and its adapter into one
    autograd node where that is exact (unquantized fp32 model, not ZeRO-3, no trained biases) and
    uses PEFT's own LoRA forward elsewhere; peft always uses PEFT's."""


FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "classification")
Format = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text",
                 "classification"]


@dataclass
class DatasetSource(ReadOnlyAfterLoad):
    path: str = ""
    """A .jsonl/.json/.csv/.parquet/.txt file, a `datasets.save_to_disk` folder, or a hub dataset
    id; relative paths are resolved against the config file's folder."""
    format: Format = "auto"
    """This source's format (see README "Data"); auto: `data.format`, else detected from the
    fields."""
    split: str = "train"
    """The split to read from a hub dataset or a saved DatasetDict."""
    name: str | None = None
    """The hub dataset's config name."""
    weight: float | None = None
    """Sample this many times the source's size: 2.0 repeats it twice, 0.5 takes half."""
    count: int | None = None
    """Take exactly this many records (repeating if needed); wins over `weight`."""
    sample_by: Literal["line", "paragraph", "document"] = "line"
    """.txt files: one record per line, per blank-line-separated paragraph, or per file."""
    columns: dict[str, str] = field(default_factory=dict)
    """This source's field names where they differ from ours, {ours: theirs}; ours are messages,
    conversations, system, tools, instruction, input, output, history, prompt, completion, text,
    label. E.g. {messages: dialog, system: sys}."""
    role_key: str | None = None
    """The role field of a turn; null: role, or from for sharegpt."""
    content_key: str | None = None
    """The text field of a turn; null: content, or value for sharegpt."""
    roles: dict[str, str] = field(default_factory=dict)
    """This source's role tags, {theirs: ours}, ours being system, user, assistant, tool (a tool
    result) and function_call (an assistant tool call written as JSON text). Added to the defaults
    (human/gpt/observation/function_call and the OpenAI role names)."""


@dataclass
class DataConfig(ReadOnlyAfterLoad):
    train_files: list[str] = field(default_factory=list)
    """Training files (relative: to the config file's folder); shorthand for
    `datasets: [{path: ...}]`. This or `datasets` must name at least one."""
    eval_files: list[str] = field(default_factory=list)
    """Evaluation files (relative: to the config file's folder); shorthand for
    `eval_datasets: [{path: ...}]`."""
    datasets: list[DatasetSource] = field(default_factory=list)
    """Training sources to mix, each with its own format, weight and field names."""
    eval_datasets: list[DatasetSource] = field(default_factory=list)
    """Evaluation sources, the same keys as `datasets`."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training mix for evaluation when no eval files or datasets
    are given; in [0, 1)."""
    format: Format = "auto"
    """The records' format for every source (a source's `format` wins); auto: detected from the
    fields, see README "Data"."""
    prompt_field: str | None = None
    """prompt_completion: the prompt's field when not `prompt`."""
    answer_field: str | None = None
    """prompt_completion: the answer's field when not `completion` (or `answer`, `response`)."""
    system_prompt: str | None = None
    """Prepended as a system turn to chats that have none."""
    chat_template: str = "auto"
    """auto: the tokenizer's own template, else chatml (with a warning, saved with the model);
    tokenizer: the tokenizer's own or refuse; a name (chatml, llama3); or Jinja text."""
    train_on_inputs: bool = False
    """Train every token, prompts too; false trains the answers only."""
    max_seq_len: int = 512
    """Tokens per example, >= 8 and at most the model's max_position_embeddings (refused before
    any weights load)."""
    truncation: Literal["truncate", "drop", "proportional"] = "truncate"
    """Longer examples: truncate cuts the end; drop drops the example; proportional cuts the prompt
    (everything before the first trained token, its end kept) and the rest (its start kept) in
    proportion to their lengths, so a long prompt no longer leaves nothing to train."""
    train_tool_calls: bool = True
    """Train the assistant's tool calls (they are model output); tool results are never trained."""
    packing: bool | Literal["auto"] = "auto"
    """Padding-free: each micro-batch is one row of concatenated examples, attention never crossing
    examples; the same examples per step, no pad slots. auto: on for causal_lm when attention runs
    per example and the model passes example boundaries to it, else off (see README "Data")."""
    group_by_length: bool = True
    """Without packing: batch examples of similar length to cut padding."""
    num_proc: int = 1
    """Processes that format and tokenize the data (`datasets.map`)."""
    prepared_dir: str | None = None
    """Tokenized data written by `sft-scale data prepare` (relative: to the config file's folder;
    on a cluster, on the shared filesystem). null: OUTPUT_DIR/prepared_data when that exists,
    else the job tokenizes at start-up."""
    num_workers: int = 0
    """DataLoader workers that collate the next steps' micro-batches while one trains (0:
    inline)."""
    pin_memory: bool = True
    """Pinned host batches for faster host->GPU copies; ignored on CPU."""


@dataclass
class TrainingConfig(ReadOnlyAfterLoad):
    seed: int = 42
    """Seeds everything random: data order, the eval split, new weights, dropout; in [0, 2^32)."""
    micro_batch_size: int = 4
    """Examples per forward pass per process (with packing: concatenated into one row)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the global batch is micro_batch_size x this x processes."""
    max_steps: int = 0
    """Optimizer steps to train; 0: derived from `num_epochs`."""
    num_epochs: float = 1.0
    """Passes over the training data (fractions allowed) when `max_steps` is 0."""
    learning_rate: float = 2e-4
    """The peak learning rate, reached after warmup."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam's first-moment decay, in [0, 1)."""
    adam_beta2: float = 0.999
    """Adam's second-moment decay, in [0, 1)."""
    adam_epsilon: float = 1e-8
    """Adam's epsilon, > 0."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    """The learning rate's shape after warmup (transformers' `get_scheduler`); constant has no
    warmup: transformers ignores warmup_steps/warmup_ratio for it."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0; when 0, `warmup_ratio` decides."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's steps, in [0, 1); used when `warmup_steps` is 0."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    logging_steps: int = 1
    """Log the loss and throughput every this many steps (and at the last)."""
    loss: Literal["auto", "standard", "chunked", "liger"] = "auto"
    """standard: the model's loss on full logits. chunked: our memory-light cross-entropy (LM head
    + CE over trained tokens, chunk by chunk). liger: liger-kernel's fused one (CUDA). auto: liger
    when installed on CUDA, else chunked unless the model post-processes its logits or ZeRO-3
    runs, else standard (sft_scale/training/loss.py)."""
    torch_compile: bool = False
    """torch.compile the repeated decoder blocks (regional, in place)."""
    layer_kernels: Literal["auto", "fused", "transformers"] = "auto"
    """fused: each RMSNorm and rotary embedding as one autograd node, in fewer passes over memory
    (fp32; used where checked equal to transformers' own, sft_scale/training/layer_kernels.py;
    an error with torch_compile, ZeRO-3 or another dtype). transformers: its own ops. auto:
    fused for fp32 models, except with torch_compile or DeepSpeed ZeRO-3."""
    trim_last_layer: bool = True
    """With the chunked or liger loss: compute the last decoder layer's query projection,
    attention output projection and MLP only at the positions that predict a trained token, the
    only ones that loss reads (the same loss and gradients, less work; not with torch_compile).
    false: every position, as transformers computes it (sft_scale/training/trained_rows.py)."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """adamw: torch's. adamw_8bit: bitsandbytes' block-wise 8-bit states (4x less optimizer
    memory). paged_adamw_8bit / paged_adamw_32bit: bitsandbytes' states in CUDA unified memory,
    paged to CPU RAM under memory pressure (CUDA only). With `distributed.offload` only adamw
    (DeepSpeed's CPU Adam runs the step)."""


@dataclass
class OutputConfig(ReadOnlyAfterLoad):
    dir: str = "runs/sft"
    """The run's folder (OUTPUT_DIR): adapter, checkpoints, logs; `--output-dir` overrides it."""
    save_tokenizer: bool = True
    """Save the tokenizer with the adapter or model (always, when tokens were added)."""
    overwrite: bool = False
    """false: refuse to train into a dir that already holds a finished adapter."""
    trace_samples: bool = False
    """Write the example ids each rank trained on (data_trace/rank{N}.jsonl): proves sharding."""


@dataclass
class CheckpointConfig(ReadOnlyAfterLoad):
    every_steps: int = 0
    """Write a checkpoint every this many steps; 0: only at the end (and on preemption)."""
    keep_last: int = 2
    """How many complete checkpoints to keep (>= 1); older ones are deleted."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output.dir; never: start over; or a
    checkpoint folder."""
    resume_world_size_change: Literal["convert", "refuse"] = "convert"
    """A DeepSpeed checkpoint resumed by a different number of processes (same global batch):
    convert it once to DeepSpeed's universal format and load that (the checkpoint itself is
    untouched), or refuse. See sft_scale/training/checkpoint.py: to_universal."""
    allow_data_change: bool = False
    """Resume on training data that differs from the checkpoint's (another file, another
    tokenization); refused while false."""


@dataclass
class DistributedConfig(ReadOnlyAfterLoad):
    zero: int | Literal["auto"] | None = None
    """0-3: ds_configs/zeroN.json; null: DDP; auto: the least-communication stage (and offload)
    whose estimated memory fits the device, decided in the job (see sft_scale/preflight/plan.py)."""
    offload: bool = False
    """Offload optimizer state to CPU memory (ds_configs/zeroN_offload.json); needs zero 2 or 3."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON of your own (relative: to the config file's folder); wins over `zero`."""
    timeout_minutes: float = 30.0
    """How long a collective may wait for the slowest rank before the process group gives up
    (at most 1440). Raise it when rank 0 does long work the others wait for (tokenizing a big
    dataset, writing a big checkpoint to a slow filesystem)."""


@dataclass
class EvalConfig(ReadOnlyAfterLoad):
    every_steps: int = 0
    """Evaluate every this many steps; 0: at the end only (when there is eval data)."""
    micro_batch_size: int = 8
    """Examples per evaluation forward pass per process."""
    metric: Literal["eval_loss", "accuracy", "f1"] = "eval_loss"
    """Which eval metric picks the best adapter (saved to OUTPUT_DIR/best_adapter): eval_loss
    (lower is better) or, for classification, accuracy / f1 (higher is better)."""
    max_new_tokens: int = 16
    """Generation-based evaluation (the demo; `sft-scale eval` takes --max-new-tokens instead):
    tokens generated per answer."""
    max_examples: int = 200
    """Generation-based evaluation (the demo; `sft-scale eval` takes --max-examples instead):
    at most this many eval records."""


@dataclass
class ClassificationConfig(ReadOnlyAfterLoad):
    labels: list[str] = field(default_factory=list)
    """Label names in head order; empty: the sorted distinct labels of the training data."""
    problem_type: Literal["auto", "single_label", "multi_label"] = "auto"
    """auto: multi_label when labels are lists, else single_label (binary when 2 labels)."""


@dataclass
class LoggingConfig(ReadOnlyAfterLoad):
    tensorboard: bool = True
    """Event files in OUTPUT_DIR/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases when installed; the project from WANDB_PROJECT."""
    plot: bool = True
    """Write OUTPUT_DIR/loss.png (train and eval loss) at the end."""


@dataclass
class Config(ReadOnlyAfterLoad):
    task: Literal["causal_lm", "classification"] = "causal_lm"
    """causal_lm: generate answers (SFT). classification: a sequence-classification head."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and its tokenizer."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """A quantized frozen base (8-bit or 4-bit QLoRA), for LoRA."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The LoRA adapter, or full fine-tuning."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data, templates, lengths, batching."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch, schedule, optimizer and loss."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where and what the run writes."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resuming."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """DDP or DeepSpeed ZeRO. DeepSpeed is chosen by the launcher (`accelerate launch
    --use_deepspeed ...`, which `sft-scale train` composes); this records the intent so the launch
    helpers and checks can read it."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training and the best adapter."""
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    """Labels of `task: classification`."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics writers."""
    source: str | None = field(default=None, metadata={"internal": True})
    """Where the config came from (set by loading, not a key); paths in it are resolved against
    this file's folder."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def global_batch_size(self, world_size: int) -> int:
        t = self.training
        return t.micro_batch_size * t.gradient_accumulation_steps * world_size


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                output_dir: str | None = None) -> Config:
    """Read YAML, apply `--set a.b=value` overrides and `--output-dir`, validate, resolve paths.
    Every problem of the file is reported at once, each with its file:line and key."""
    raw: dict = {}
    # Where each key was set: its line in the file, or the command-line flag that set it.
    lines: dict[str, int | str] = {}
    problems: list[Problem] = []
    src = str(path) if path is not None else "<defaults>"
    if path is not None:
        raw, lines, problems = _read_yaml_file(Path(path), src)
    for item in overrides or []:
        lines[_apply_override(raw, item)] = f"--set {item}"
    if output_dir is not None:
        raw.setdefault("output", {})
        if not isinstance(raw["output"], dict):
            raise ConfigError(f"{src}: 'output' must be a mapping")
        raw["output"]["dir"] = output_dir
        lines["output.dir"] = f"--output-dir {output_dir!r}"
    cfg = _build(Config, raw, "", problems)
    cfg.source = str(Path(path).resolve()) if path is not None else None
    _resolve_paths(cfg)
    bad = {p.key for p in problems}
    # A key whose value was refused is left at its default; checking that default would only
    # add a second, confusing message for the same key.
    problems += [p for p in check_values(cfg) if p.key not in bad]
    raise_problems(problems, src, lines)
    _make_read_only(cfg)
    return cfg


def config_from_dict(d: dict, source: str = "<saved config>") -> Config:
    """A Config from its `to_dict()` form (e.g. a run's manifest), validated the same way."""
    problems: list[Problem] = []
    cfg = _build(Config, {k: v for k, v in d.items() if k != "resolved"}, "", problems)
    bad = {p.key for p in problems}
    raise_problems(problems + [p for p in check_values(cfg) if p.key not in bad], source, None)
    _make_read_only(cfg)
    return cfg


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


# ------------------------------------------------------------------ reading YAML safely

# Anchors and aliases are fine in a config (`<<: *defaults`), but each alias use copies its
# anchor's whole subtree wherever the config is walked; nested aliases multiply (a 352-byte file
# with 9 levels is 9^9 values) and a self-reference never ends. A real config expands to a few
# hundred values, so these bounds only stop files that are not configs.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64
# libyaml when PyYAML was built with it: the pure-Python scanner is quadratic in nesting depth
# (3 KB of '[' take seconds) and its composer recurses per level; libyaml caps depth at 1000.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml_file(p: Path, src: str) -> tuple[dict, dict[str, int], list[Problem]]:
    if not p.is_file():
        raise ConfigError(f"{src}: config file not found. Pass an existing YAML file, e.g. "
                          "--config examples/demo.yaml")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{src}: cannot read the config file ({e.strerror}); check its "
                          "permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{src}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); save the config as UTF-8") from None
    raw, lines, problems = parse_yaml(text, src)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections "
                          f"({', '.join(_section_names())}), got {type(raw).__name__}")
    return raw, lines, problems


def parse_yaml(text: str, src: str) -> tuple[Any, dict[str, int], list[Problem]]:
    """(value, line of each dotted key, duplicate-key problems). Raises ConfigError for text
    that is not YAML, an alias that refers to itself, or aliases that expand beyond any config.
    Aliases are checked on the node graph before anything walks the loaded value."""
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from None
    except RecursionError:  # without libyaml, the composer recurses once per nesting level
        raise ConfigError(f"{src}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; no config "
                          "is that deep") from None
    lines: dict[str, int] = {}
    problems: dict[tuple[int, int], Problem] = {}
    if node is not None:
        size = _expanded_size(node, {}, set(), src)
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"{src}: the YAML expands to more than {MAX_YAML_VALUES:,} values "
                              "(aliases '*name' copy their anchor '&name' at "
                              "every use, and nested ones multiply); write the values out or use "
                              "fewer nested aliases")
        _walk_nodes(node, "", lines, problems)
    try:
        value = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from None
    return value, lines, list(problems.values())


def _expanded_size(node, memo: dict[int, int], ancestors: set[int], src: str) -> int:
    """How many values the node graph has once every alias is expanded, computed once per node
    (so a bomb costs its size in bytes, not its expansion); refuses self-references and depth."""
    if id(node) in memo:
        return memo[id(node)]
    line = node.start_mark.line + 1
    if id(node) in ancestors:
        raise ConfigError(f"{src}:{line}: an alias refers to the anchor that contains it (a "
                          "recursive structure), which no config value can be; write the value "
                          "out instead")
    if len(ancestors) >= MAX_YAML_DEPTH:
        raise ConfigError(f"{src}:{line}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; "
                          "no config is that deep")
    children = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    ancestors.add(id(node))
    # Capped so that the sum of a bomb's sizes stays a small int.
    size = min(1 + sum(_expanded_size(c, memo, ancestors, src) for c in children),
               MAX_YAML_VALUES + 1)
    ancestors.discard(id(node))
    memo[id(node)] = size
    return size


def _walk_nodes(node, prefix: str, out: dict[str, int], problems: dict) -> None:
    """Record each dotted key's line, expanding aliases as the loaded value will be walked
    (bounded by _expanded_size first), and find keys given twice in one mapping (YAML would
    silently keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                _walk_nodes(v, prefix, out if isinstance(v, yaml.MappingNode) else {}, problems)
                continue
            key = f"{prefix}{k.value}"
            kline = k.start_mark.line + 1
            if k.value in seen:
                problems[(seen[k.value], kline)] = Problem(key, (
                    f"'{key}' is given twice, at lines {seen[k.value]} and {kline}; YAML would "
                    "silently keep only the last. Keep one of them (merge the two if it is a "
                    "section)"))
            seen[k.value] = kline
            out[key] = kline
            _walk_nodes(v, key + ".", out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = f"{prefix.rstrip('.')}[{i}]"
            out[key] = v.start_mark.line + 1
            _walk_nodes(v, key + ".", out, problems)


def _apply_override(raw: dict, item: str) -> str:
    """Set `raw`'s dotted key from `--set KEY=VALUE`; returns the key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. --set training.max_steps=6")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be SECTION.FIELD, e.g. training.max_steps")
    parsed, _, dups = parse_yaml(value, f"--set {item!r}") if value.strip() \
        else ("", {}, [])
    if dups:
        raise ConfigError(f"--set {item!r}: {dups[0].message}")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = parsed
    return ".".join(parts)


@dataclass(frozen=True)
class Problem:
    """One failing key: its dotted name (to find its line) and what is wrong and how to fix it."""

    key: str
    message: str


def raise_problems(problems: list[Problem], src: str,
                   lines: dict[str, int | str] | None) -> None:
    """One ConfigError listing every problem, in file order, each with its file:line or flag
    (`lines` None: the values came from neither a file nor flags, e.g. a saved manifest)."""
    if not problems:
        return

    def order(p: Problem) -> int:
        line = (lines or {}).get(p.key)
        return line if isinstance(line, int) else 1 << 30

    ordered = sorted(problems, key=order)
    msgs = [f"{_where(src, lines, p.key)}: {p.message}" for p in ordered]
    if len(msgs) == 1:
        raise ConfigError(msgs[0])
    raise ConfigError(f"{len(msgs)} problems in {src}:\n  " + "\n  ".join(msgs))


def _where(src: str, lines: dict[str, int | str] | None, key: str) -> str:
    if lines is None:
        return src
    line = lines.get(key)
    if line is None:
        # A key inside a value set by a flag (--set data.datasets=[{...}]) points at the flag.
        flag = next((v for k, v in lines.items() if isinstance(v, str)
                     and (key.startswith(k + ".") or key.startswith(k + "["))), None)
        if flag:
            return flag
        # A default that conflicts with another key: name the file, not a line.
        return src if src != "<defaults>" else "the defaults"
    return line if isinstance(line, str) else f"{src}:{line}"


def _build(cls, raw: Any, prefix: str, problems: list[Problem]):
    """The dataclass `cls` from `raw`; a key that is unknown or of the wrong type is added to
    `problems` and left at its default, so one pass finds every bad key of the file."""
    if not isinstance(raw, dict):
        problems.append(Problem(prefix.rstrip("."), (
            f"'{prefix.rstrip('.')}' must be a mapping of keys, got {type(raw).__name__} "
            f"{raw!r}")))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
            problems.append(Problem(dotted, f"unknown key '{dotted}'{hint} Valid keys here: "
                                            f"{', '.join(fields)}"))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted + ".", problems)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if not isinstance(value, list):
                problems.append(Problem(dotted, f"'{dotted}' expects a list of mappings, got "
                                                f"{type(value).__name__} {value!r}"))
                continue
            kwargs[key] = [_build(typing.get_args(tp)[0], v, f"{dotted}[{i}].", problems)
                           for i, v in enumerate(value)]
        else:
            try:
                kwargs[key] = _coerce(value, tp, dotted)
            except ConfigError as e:
                problems.append(Problem(dotted, str(e)))
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _NotFinite(ConfigError):
    """inf/nan where a number is expected: clearer than 'expects float' for a float value."""


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation; allow the lossless int->float widening only.
    Floats must be finite: no setting means anything at inf or nan (an lr of inf trains a NaN
    adapter, epochs of inf never end)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"'{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except _NotFinite:
                raise
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        raise ConfigError(f"'{key}' expects {_type_name(tp)}, got {value!r}"
                          + (f"; did you mean {near[0]!r}?" if near else ""))
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            # YAML 1.1 reads "2e-4" as a string; accept it, it is what everyone writes.
            number = float(value)
        except (ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):
            raise _NotFinite(f"'{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _resolve_paths(cfg: Config) -> None:
    """Data paths are relative to the config file, so a config works from any working dir."""
    base = Path(cfg.source).parent if cfg.source else Path.cwd()

    def res(p: str) -> str:
        if "://" in p or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    cfg.data.train_files = [res(p) for p in cfg.data.train_files]
    cfg.data.eval_files = [res(p) for p in cfg.data.eval_files]
    for src in cfg.data.datasets + cfg.data.eval_datasets:
        # A relative path that exists next to the config is a file; anything else may be a hub id.
        if (base / src.path).exists():
            src.path = str((base / src.path).resolve())
    if cfg.distributed.deepspeed_config:
        cfg.distributed.deepspeed_config = res(cfg.distributed.deepspeed_config)
    if cfg.data.prepared_dir:
        cfg.data.prepared_dir = res(cfg.data.prepared_dir)


SEED_LIMIT = 2 ** 32  # numpy's seed range, which accelerate's set_seed also seeds
MAX_EPOCHS = 1e6  # beyond this, epochs x examples overflows the step count's arithmetic


def check_values(cfg: Config) -> list[Problem]:
    """Value checks that types alone cannot express, every one of them (not just the first);
    each message says what was expected and how to fix it. Types are checked from the
    annotations when loading, and floats must be finite, so a new field gets those for free;
    add its range check here."""
    t, lora = cfg.training, cfg.lora
    checks = [
        (0 <= t.seed < SEED_LIMIT, "training.seed", "must be in [0, 2^32)"),
        (t.micro_batch_size >= 1, "training.micro_batch_size", "must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps",
         "must be >= 1"),
        (t.max_steps >= 0, "training.max_steps", "must be >= 0 (0 derives it from num_epochs)"),
        (t.max_steps > 0 or t.num_epochs > 0, "training.num_epochs",
         "must be > 0 when training.max_steps is 0"),
        (t.num_epochs <= MAX_EPOCHS, "training.num_epochs",
         f"must be at most {MAX_EPOCHS:g}; for a long run set training.max_steps"),
        (t.learning_rate > 0, "training.learning_rate", "must be > 0"),
        (t.weight_decay >= 0, "training.weight_decay", "must be >= 0"),
        (0.0 <= t.adam_beta1 < 1.0, "training.adam_beta1", "must be in [0, 1), e.g. 0.9"),
        (0.0 <= t.adam_beta2 < 1.0, "training.adam_beta2", "must be in [0, 1), e.g. 0.999"),
        (t.adam_epsilon > 0, "training.adam_epsilon", "must be > 0, e.g. 1e-8"),
        (0.0 <= t.warmup_ratio < 1.0, "training.warmup_ratio", "must be in [0, 1)"),
        (t.warmup_steps >= 0, "training.warmup_steps", "must be >= 0"),
        (t.max_steps == 0 or t.warmup_steps <= WARMUP_REFUSE_FACTOR * t.max_steps,
         "training.warmup_steps",
         f"({t.warmup_steps}) is far beyond training.max_steps ({t.max_steps}): the learning "
         "rate would stay near 0. Lower it, or use warmup_ratio"),
        (t.max_grad_norm >= 0, "training.max_grad_norm", "must be >= 0 (0 disables clipping)"),
        (t.logging_steps >= 1, "training.logging_steps", "must be >= 1"),
        (bool(cfg.model.name_or_path.strip()), "model.name_or_path",
         "must name a model folder, a hub id or builtin:tiny-llama"),
        (bool(cfg.output.dir.strip()), "output.dir",
         "must name a folder; an empty one would write the run into the current directory"),
        (cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0"),
        (cfg.eval.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
        (cfg.eval.max_examples >= 1, "eval.max_examples", "must be >= 1"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        (cfg.data.max_seq_len >= 8, "data.max_seq_len", "must be >= 8"),
        (lora.r >= 1, "lora.r", "must be >= 1"),
        (lora.alpha > 0, "lora.alpha",
         "must be > 0 (the adapter's scale is alpha / r), e.g. 2 * r"),
        (0.0 <= lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)"),
        (lora.target_modules != [] and lora.target_modules != "", "lora.target_modules",
         "must name at least one module, or be 'all-linear'"),
        (bool(cfg.data.train_files or cfg.data.datasets), "data.train_files",
         "(or data.datasets) must name at least one training file, e.g. [train.jsonl]"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)"),
        (cfg.data.num_proc >= 1, "data.num_proc", "must be >= 1"),
        (0 < cfg.distributed.timeout_minutes <= 1440, "distributed.timeout_minutes",
         "must be > 0 and at most 1440 (a day)"),
    ]
    problems = [Problem(key, f"'{key}' {msg}") for ok, key, msg in checks if not ok]

    def refuse(key: str, msg: str) -> None:
        problems.append(Problem(key, msg))

    q = cfg.quantization
    if q.load_in_8bit and q.load_in_4bit:
        refuse("quantization.load_in_4bit", "'quantization.load_in_8bit' and "
               "'quantization.load_in_4bit' are both true; a base is quantized one way. Keep "
               "one: load_in_4bit (QLoRA, least memory) or load_in_8bit (LLM.int8).")
    if q.load_in_8bit and not cfg.lora.enabled:
        refuse("quantization.load_in_8bit", "'quantization.load_in_8bit' with 'lora.enabled: "
               "false' would fine-tune frozen int8 weights. Enable LoRA, or drop 8-bit for full "
               "fine-tuning.")
    if q.load_in_4bit and not cfg.lora.enabled:
        refuse("quantization.load_in_4bit", "'quantization.load_in_4bit' with 'lora.enabled: "
               "false' would fine-tune frozen 4-bit weights. Enable LoRA (QLoRA), or drop 4-bit "
               "for full fine-tuning.")
    if cfg.task == "classification" and cfg.data.packing is True:
        refuse("data.packing", "'data.packing' is for causal_lm: a classification head reads "
               "one example per row. Set data.packing: false.")
    if cfg.task == "causal_lm" and cfg.eval.metric in ("accuracy", "f1"):
        refuse("eval.metric", f"'eval.metric: {cfg.eval.metric}' needs task: classification; "
               "use eval_loss for causal_lm")
    if cfg.distributed.zero is not None and cfg.distributed.zero not in (0, 1, 2, 3, "auto"):
        refuse("distributed.zero", "'distributed.zero' must be 0, 1, 2, 3 or auto")
    if cfg.distributed.offload and cfg.distributed.zero == "auto":
        refuse("distributed.offload", "'distributed.offload' is chosen by 'distributed.zero: "
               "auto' (offload only when nothing fits without it); drop offload, or set "
               "distributed.zero: 2 or 3 to force offload")
    if cfg.distributed.offload and cfg.distributed.zero not in (2, 3) \
            and not cfg.distributed.deepspeed_config:
        refuse("distributed.offload", "'distributed.offload: true' needs DeepSpeed ZeRO-2 or "
               "ZeRO-3 (set distributed.zero: 2 or 3); offload moves ZeRO-partitioned optimizer "
               "state to CPU memory")
    return problems


def validate(cfg: Config, src: str = "<config>") -> None:
    """Raise one ConfigError naming every value problem of `cfg` (see check_values)."""
    raise_problems(check_values(cfg), src, None)


# A warmup longer than the run may be meant (a 2-step smoke test of a real recipe): it gets a
# loud warning. This many times the run is a typo (500 for 50), refused.
WARMUP_REFUSE_FACTOR = 10


def check_warmup(cfg: Config, total_steps: int) -> str | None:
    """Once the total steps are known (from the data when training.max_steps is 0): refuse a
    warmup far beyond the run, before anything is written; a warning to print for one that is
    merely longer than the run."""
    w = cfg.training.warmup_steps
    if w > WARMUP_REFUSE_FACTOR * total_steps:
        raise ConfigError(
            f"'training.warmup_steps' ({w}) is far beyond the run's {total_steps} steps: the "
            "learning rate would stay near 0. Lower it, or use training.warmup_ratio")
    if w > total_steps:
        return (f"training.warmup_steps ({w}) is beyond the run's {total_steps} steps: the "
                f"learning rate never reaches training.learning_rate (it peaks at "
                f"{total_steps / w:.0%} of it). Lower it, or use training.warmup_ratio")
    return None


def dump_yaml(cfg: Config, extra: dict | None = None) -> str:
    d = cfg.to_dict()
    if extra:
        d["resolved"] = extra
    return yaml.safe_dump(d, sort_keys=False)
