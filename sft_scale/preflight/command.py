"""Compose the `accelerate launch` line for a layout (processes, nodes, ZeRO stage).

One node: Accelerate's own DeepSpeed launch (`--use_deepspeed --deepspeed_config_file`).
Several nodes: Accelerate's torchrun path with a static rendezvous on every node, and DeepSpeed
enabled inside the script from `distributed.deepspeed_config` (our Accelerator builds the
DeepSpeed plugin itself). This avoids DeepSpeed's multi-node launchers: pdsh needs passwordless
ssh between nodes, and both it and 'standalone' bind the rendezvous port on every node, which fails
(EADDRINUSE) when two 'nodes' share a host, as in our tests and on some schedulers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sft_scale.config import ConfigError

# The shipped DeepSpeed JSON files (ds_configs/zeroN[_offload].json). Here, not in deepspeed.py:
# composing a launch line (the CLI, on login nodes) must not import torch.
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


@dataclass
class Layout:
    nproc_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    zero: int | str | None = None  # "auto": the job picks the stage for the memory it finds
    offload: bool = False
    deepspeed_config: str | None = None  # a JSON file; overrides zero/offload
    extra_sets: list[str] = field(default_factory=list)

    @classmethod
    def for_config(cls, cfg, zero=None, offload: bool = False, deepspeed_config: str | None = None,
                   **placement) -> Layout:
        """The layout of a run of `cfg`: command-line choices (`zero`, `offload`,
        `deepspeed_config`; None/False: not given) over the config's `distributed` section."""
        return cls(zero=zero if zero is not None else cfg.distributed.zero,
                   offload=offload or cfg.distributed.offload,
                   deepspeed_config=deepspeed_config or cfg.distributed.deepspeed_config,
                   **placement)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes

    def ds_file(self) -> str | None:
        if self.zero == "auto" and not self.deepspeed_config:
            # decided inside the job, where the devices are (sft_scale.preflight.resolve)
            return None
        return self.deepspeed_config or ds_file_for(self.zero, self.offload)


def ds_file_for(zero: int | None, offload: bool) -> str | None:
    if zero is None:
        if offload:
            raise ConfigError("--offload needs DeepSpeed: choose --zero 2 or --zero 3 (offload "
                              "moves ZeRO-partitioned optimizer state to CPU memory)")
        return None
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero {zero}: expected 0, 1, 2 or 3")
    if offload and zero not in (2, 3):
        raise ConfigError(f"--offload with ZeRO-{zero}: offload files exist for ZeRO-2 and "
                          "ZeRO-3; use --zero 2 --offload or --zero 3 --offload")
    return str(DS_CONFIG_DIR / f"zero{zero}{'_offload' if offload else ''}.json")


def launch_command(config: str, layout: Layout, overrides: list[str] = (),
                   output_dir: str | None = None) -> list[str]:
    ds = layout.ds_file()
    cmd = ["accelerate", "launch", "--num_processes", str(layout.world_size)]
    sets = list(overrides)
    if layout.nodes > 1:
        cmd += ["--multi_gpu", "--num_machines", str(layout.nodes), "--machine_rank",
                str(layout.node_rank), "--main_process_ip", layout.master_addr,
                "--main_process_port", str(layout.master_port), "--rdzv_backend", "static"]
        if ds:
            sets.append(f"distributed.deepspeed_config={ds}")
    elif ds:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", ds,
                "--main_process_port", str(layout.master_port)]
    elif layout.world_size > 1:
        # Accelerate's name for its torchrun path; on CPU our Accelerator then picks MULTI_CPU.
        cmd += ["--multi_gpu", "--main_process_port", str(layout.master_port)]
    if layout.zero == "auto" and not layout.deepspeed_config:
        sets.append("distributed.zero=auto")
    cmd += [str(TRAIN_SCRIPT), "--config", config]
    for s in sets + list(layout.extra_sets):
        cmd += ["--set", s]
    if output_dir:
        cmd += ["--output-dir", output_dir]
    return cmd
