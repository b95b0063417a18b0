"""`sft-scale`: the front door. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from sft_scale.config import ConfigError
from sft_scale.data.sources import DataError

def cmd_train(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.launch import Layout, launch_command
    from sft_scale.preflight import resolve_deepspeed

    cfg = load_config(args.config, args.overrides, args.output_dir)  # fail fast, before launching
    zero = args.zero if args.zero is not None else cfg.distributed.zero
    offload = args.offload or cfg.distributed.offload
    layout = Layout(nproc_per_node=args.nproc, nodes=args.nodes, node_rank=args.node_rank,
                    master_addr=args.master_addr, master_port=args.master_port, zero=zero,
                    offload=offload, deepspeed_config=args.deepspeed_config
                    or cfg.distributed.deepspeed_config)
    cmd = launch_command(args.config, layout, args.overrides, args.output_dir)
    # Resolve (and check) the DeepSpeed config for this world size now, so a contradiction or
    # an "auto" that cannot be filled fails here, not on the cluster.
    if layout.ds_file():
        cfg.distributed.deepspeed_config = layout.ds_file()
        ds = resolve_deepspeed(cfg, world_size=layout.world_size)
        print("deepspeed (resolved): " + json.dumps(ds), flush=True)
    print(f"world size {layout.world_size} = {args.nodes} node(s) x {args.nproc} process(es); "
          f"global batch {cfg.global_batch_size(layout.world_size)}", flush=True)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # Run accelerate from this interpreter's environment, whatever is first on PATH.
    return subprocess.call([sys.executable, "-m", "accelerate.commands.launch"] + cmd[2:])


def cmd_demo(args) -> int:
    from sft_scale.demo import run_demo

    report = run_demo(args.output_dir, args.overrides)
    return 0 if report["after"] > report["before"] else 1


def cmd_data_preview(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.data.preview import preview

    preview(load_config(args.config, args.overrides), n=args.n)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sft-scale", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def config_args(p, required=True):
        p.add_argument("--config", required=required, help="YAML config")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config value (repeatable)")
        p.add_argument("--output-dir", default=None, help="override output.dir")

    p = sub.add_parser("train", help="compose and run the accelerate launch line")
    config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank-0 node address (multi-node)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                   help="DeepSpeed ZeRO stage (ds_configs/zeroN.json); default: the config's")
    p.add_argument("--offload", action="store_true", help="ZeRO-2/3 with CPU offload")
    p.add_argument("--deepspeed-config", default=None, help="your own DeepSpeed JSON")
    p.add_argument("--dry-run", action="store_true", help="print the launch line only")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="inspect the training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("preview", help="tokenized examples with the trained part marked, "
                            "then statistics")
    config_args(p)
    p.add_argument("-n", type=int, default=3, help="examples to show")
    p.set_defaults(func=cmd_data_preview)

    p = sub.add_parser("demo", help="tiny offline demo: evaluate, fine-tune, evaluate again")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
