"""`sft-scale`: the front door. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from sft_scale.config import ConfigError
from sft_scale.data.sources import DataError

TRAIN_SCRIPT = Path(__file__).parent / "train.py"


def launch_command(config: str, overrides: list[str], output_dir: str | None, nproc: int = 1,
                   deepspeed_config: str | None = None) -> list[str]:
    """The `accelerate launch ...` line that runs the recipe with this layout."""
    cmd = ["accelerate", "launch", "--num_processes", str(nproc)]
    if deepspeed_config:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", deepspeed_config]
    elif nproc > 1:
        # Accelerate's name for its torchrun path; on CPU our Accelerator then picks MULTI_CPU.
        cmd += ["--multi_gpu"]
    cmd += [str(TRAIN_SCRIPT), "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    if output_dir:
        cmd += ["--output-dir", output_dir]
    return cmd


def cmd_train(args) -> int:
    from sft_scale.config import load_config

    cfg = load_config(args.config, args.overrides, args.output_dir)  # fail fast, before launching
    cmd = launch_command(args.config, args.overrides, args.output_dir, args.nproc,
                         cfg.distributed.deepspeed_config)
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
    p.add_argument("--nproc", type=int, default=1, help="processes on this node")
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
