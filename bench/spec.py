"""What every method shares: the model shape, the data, the hyperparameters and the step count.

One `Spec` is written to `spec.json` in the work folder and read by every worker, so no method can
drift from the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class ModelSpec:
    # A Llama of ~21M parameters with the builtin tokenizer's vocabulary (set at build time).
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 7
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False


@dataclass
class DataSpec:
    seed: int = 0
    max_seq_len: int = 256
    # Alpaca-like token lengths: log-normal instruction, optional input, heavy-tailed output.
    instruction_median: float = 10.0
    instruction_sigma: float = 0.5
    input_probability: float = 0.4
    input_median: float = 16.0
    input_sigma: float = 0.8
    output_median: float = 30.0
    output_sigma: float = 0.9


@dataclass
class TrainSpec:
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    steps: int = 4  # optimizer steps, the same for every method
    warmup_steps_excluded: int = 1  # the first steps are not timed (allocation, lazy init)
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def n_examples(self) -> int:
        # One epoch over exactly steps x global batch examples: every method trains each example
        # once.
        return self.steps * self.global_batch


@dataclass
class Spec:
    name: str = "default"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # Filled in by the orchestrator once the model folder and data exist:
    model_dir: str = ""
    data_file: str = ""
    sft_config: str = ""  # the bench's sft_scale YAML (bench/sft.py)
    pad_token_id: int = 0
    parameters: int = 0
    trainable_parameters: int = 0
    real_tokens: int = 0  # all tokens of all examples (BOS + prompt + completion + EOS)
    packed_row_len: int = 0  # mean real tokens per micro-batch (bare_packed_row's row length)
    mean_example_len: int = 0  # mean tokens per example (bare_step's row length)
    # The dtype probe (bare_bf16): a short row, since bf16 is emulated on CPUs without AVX-512.
    probe_tokens: int = 32

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Spec:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> Spec:
        sub = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec}
        kw = {}
        for f in fields(cls):
            if f.name in raw:
                kw[f.name] = sub[f.name](**raw[f.name]) if f.name in sub else raw[f.name]
        return cls(**kw)


def default_spec(steps: int | None = None) -> Spec:
    s = Spec()
    if steps:
        s.train.steps = steps
    return s


def quick_spec(steps: int | None = None) -> Spec:
    """A tiny model and short sequences: a smoke test of the whole harness, not a measurement."""
    s = Spec(name="quick",
             model=ModelSpec(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256),
             data=DataSpec(max_seq_len=64, instruction_median=6, input_median=8,
                           output_median=10),
             train=TrainSpec(micro_batch_size=4, steps=steps or 2))
    s.probe_tokens = 16
    return s
