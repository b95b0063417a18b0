"""`sft-scale`: the front door. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from sft_scale.errors import ConfigError, run_reporting_errors
from sft_scale.tools.gguf_export import OUTTYPES, export_gguf, require_converter


def positive_int(text: str) -> int:
    """argparse type for counts (processes, nodes, GPUs, micro-batch): an int >= 1. A 0 would
    divide by zero in the plan, or silently fall back to the config's value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port_arg(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1-65535, got {value}")
    return value


def _zero_arg(text: str):
    if text == "auto":
        return text
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"expected 0, 1, 2, 3 or auto, got {text!r}")
    return int(text)


def cmd_train(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.preflight.command import Layout, launch_command
    from sft_scale.preflight.resolve import resolve

    cfg = load_config(args.config, args.overrides, args.output_dir)  # fail fast, before launching
    if not 0 <= args.node_rank < args.nodes:
        raise ConfigError(f"--node-rank {args.node_rank}: must be in [0, --nodes {args.nodes})")
    layout = Layout.for_config(cfg, args.zero, args.offload, args.deepspeed_config,
                               nproc_per_node=args.nproc, nodes=args.nodes,
                               node_rank=args.node_rank, master_addr=args.master_addr,
                               master_port=args.master_port)
    cmd = launch_command(args.config, layout, args.overrides, args.output_dir)
    # Resolve (and check) the run for this layout now, so a contradiction or an "auto" that
    # cannot be filled fails here, not on the cluster.
    resolved = resolve(cfg, layout)
    if resolved.deepspeed is not None:
        print("deepspeed (resolved): " + json.dumps(resolved.deepspeed), flush=True)
    print(f"world size {layout.world_size} = {args.nodes} node(s) x {args.nproc} process(es); "
          f"global batch {resolved.global_batch_size}", flush=True)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    # Run accelerate from this interpreter's environment, whatever is first on PATH.
    return subprocess.call([sys.executable, "-m", "accelerate.commands.launch"] + cmd[2:])


def cmd_plan(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.preflight.plan import estimate, format_table

    cfg = load_config(args.config, args.overrides)
    plan = estimate(cfg, args.gpus_per_node * args.nodes, _memory_arg(args.gpu_memory),
                    micro_batch=args.micro_batch)
    print(json.dumps(plan, indent=2) if args.json else format_table(plan))
    # Exit 1 unless the configured micro-batch fits somewhere: scripts can gate a submission on it.
    return 0 if any(r["fits"] for r in plan["rows"]) else 1


def _memory_arg(text: str) -> int:
    from sft_scale.preflight.plan import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None


def cmd_check(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.preflight.check import run_check
    from sft_scale.preflight.command import Layout

    cfg = load_config(args.config, args.overrides, args.output_dir)
    layout = Layout.for_config(cfg, args.zero, args.offload, args.deepspeed_config,
                               nproc_per_node=args.gpus_per_node, nodes=args.nodes,
                               master_addr=args.master_addr)
    report = run_check(args.config, args.overrides, args.output_dir, layout,
                       gpu_memory=_memory_arg(args.gpu_memory) if args.gpu_memory else None)
    if args.json:
        print(json.dumps(report, indent=2))
    failed = [what for what, ok in (("disk", report["disk_ok"]), ("memory", report["memory_ok"]))
              if not ok]
    print(f"check: FAILED ({', '.join(failed)})" if failed else "check: ok", flush=True)
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from sft_scale.demo.run import run_demo

    report = run_demo(args.output_dir, args.overrides)
    return 0 if report["after"] > report["before"] else 1


def cmd_data_preview(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.data.preview import preview

    preview(load_config(args.config, args.overrides), n=args.n)
    return 0


def cmd_data_prepare(args) -> int:
    from sft_scale.config import load_config
    from sft_scale.data.prepared import prepare
    from sft_scale.training.model import load_tokenizer

    cfg = load_config(args.config, args.overrides, args.output_dir)
    path, stats, written = prepare(cfg, load_tokenizer(cfg), force=args.force)
    print(f"prepared data in {path}: {stats.examples} training examples, {stats.tokens} tokens "
          f"({stats.trained_tokens} trained), {stats.eval_examples} eval examples"
          + ("" if written else "; already up to date, nothing tokenized"), flush=True)
    return 0


def cmd_slurm(args) -> int:
    from sft_scale.preflight import slurm

    if args.slurm_command == "submit":
        slurm.submit(args.config, slurm.options_from_args(args), args.overrides, args.output_dir,
                     args.dry_run)
    elif args.slurm_command == "status":
        print(json.dumps(slurm.status(args.output_dir), indent=2))
    elif args.slurm_command == "logs":
        if args.lines < 1:
            raise ConfigError(f"-n/--lines {args.lines}: must be >= 1")
        lines = slurm.log_file(args.output_dir).read_text().splitlines()
        print("\n".join(lines[-args.lines:]))
    elif args.slurm_command == "cancel":
        print(f"cancelled job {slurm.cancel(args.output_dir)}")
    return 0


def cmd_merge(args) -> int:
    from sft_scale.tools.merge import merge

    if args.gguf:
        require_converter()  # before the merge, not after it
    report = merge(args.adapter, args.out, args.base, args.dtype, args.max_shard_size,
                   args.overwrite, dequantize=args.dequantize)
    print(f"merged into {args.out}: max |logit diff| vs base+adapter "
          f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']}), greedy "
          f"generations equal: {report['greedy_generations_equal']}")
    shift = report["shift_vs_training"]
    if shift:
        print(f"shift vs the model training produced ({report['trained_on']} base, merged into "
              f"the {report['merged_into']}; {shift['positions']} probe positions): max |logit "
              f"diff| {shift['max_abs_logit_diff']:.3g}, mean {shift['mean_abs_logit_diff']:.3g}, "
              f"greedy agreement {shift['greedy_agreement']:.1%}")
    if args.gguf:
        _print_gguf(export_gguf(args.out, args.gguf, pre_tokenizer=args.gguf_pre_tokenizer))
    return 0


def cmd_export(args) -> int:
    from sft_scale.tools.export import export, export_to_gguf

    if args.format == "gguf":
        require_converter()
        _print_gguf(export_to_gguf(args.run, args.out, args.gguf_type, args.checkpoint,
                                   args.overwrite, args.gguf_pre_tokenizer))
        return 0
    print(f"exported to {export(args.run, args.out, args.checkpoint, args.overwrite)}")
    return 0


def cmd_gguf(args) -> int:
    from sft_scale.tools.gguf_export import install_converter

    if args.gguf_command == "setup":
        print(f"llama.cpp converter in {install_converter(sdist=args.sdist)}")
    else:
        _print_gguf(export_gguf(args.model, args.type, args.out, args.pre_tokenizer))
    return 0


def _print_gguf(report: dict) -> None:
    print(f"GGUF written: {report['gguf']} ({report['outtype']}); run by llama.cpp against "
          f"{report['model']}: sample texts tokenised equal "
          f"{report['sample_texts_tokenised_equal']}"
          f", max |log-prob diff| {report['max_abs_logprob_diff']:.3g} (tolerance "
          f"{report['tolerance']}), greedy generations equal: {report['greedy_generations_equal']}")


def cmd_eval(args) -> int:
    from sft_scale.config import DatasetSource, load_config
    from sft_scale.demo import DEMO_CONFIG
    from sft_scale.model_source import resolve_model_path
    from sft_scale.tools.generation_eval import eval_before_after, format_table

    resolve_model_path(args.model, key="--model")  # a missing or uncached model, said in seconds
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {args.adapter}: no PEFT adapter there (no "
                          "adapter_config.json); pass a run's OUTPUT_DIR/adapter or "
                          "OUTPUT_DIR/best_adapter folder")
    cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
    # A config of its own for this evaluation; the loaded one stays as read.
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, name_or_path=args.model),
        eval=dataclasses.replace(cfg.eval, max_new_tokens=args.max_new_tokens,
                                 max_examples=args.max_examples))
    result = eval_before_after(cfg, args.adapter,
                               [DatasetSource(path=str(Path(args.data).absolute()))])
    print(format_table(result))
    return 0


PRE_TOKENIZER_HELP = ("llama.cpp's name for the tokenizer's pre-tokenizer (e.g. llama-bpe, "
                      "qwen2, gpt-2), only for a BPE tokenizer that llama.cpp does not recognise")


def gguf_args(p, flag: str, default: str | None, text: str) -> None:
    p.add_argument(flag, choices=OUTTYPES, default=default, help=text)
    p.add_argument("--gguf-pre-tokenizer", default=None, help=PRE_TOKENIZER_HELP)


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
    p.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nodes", type=positive_int, default=1, help="number of nodes")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    p.add_argument("--master-addr", default="127.0.0.1", help="rank-0 node address (multi-node)")
    p.add_argument("--master-port", type=_port_arg, default=29500)
    p.add_argument("--zero", type=_zero_arg, default=None,
                   help="DeepSpeed ZeRO stage 0-3 (ds_configs/zeroN.json) or auto (the stage "
                   "that fits, see `sft-scale plan`); default: the config's")
    p.add_argument("--offload", action="store_true", help="ZeRO-2/3 with CPU offload")
    p.add_argument("--deepspeed-config", default=None, help="your own DeepSpeed JSON")
    p.add_argument("--dry-run", action="store_true", help="print the launch line only")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="per-GPU memory of every ZeRO stage from the model config "
                       "alone; the stage and micro-batch that fit")
    config_args(p)
    p.add_argument("--gpus-per-node", type=positive_int, default=1)
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpu-memory", default="80GiB", help="per GPU, e.g. 80GiB, 24GiB, 40GB")
    p.add_argument("--micro-batch", type=positive_int, default=None,
                   help="default: the config's training.micro_batch_size")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("check", help="validate config, model, tokenizer, data sample, steps, "
                       "disk and the launch line, in seconds, before a cluster job")
    config_args(p)
    p.add_argument("--gpus-per-node", type=positive_int, default=1, help="processes per node")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--zero", type=_zero_arg, default=None, help="default: the config's")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--deepspeed-config", default=None)
    p.add_argument("--master-addr", default="127.0.0.1", help="rank-0 node address (multi-node)")
    p.add_argument("--gpu-memory", default=None,
                   help="with zero auto: decide the stage here for GPUs of this size")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("data", help="inspect the training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("preview", help="tokenized examples with the trained part marked, "
                            "then statistics")
    config_args(p)
    p.add_argument("-n", type=positive_int, default=3, help="examples to show")
    p.set_defaults(func=cmd_data_preview)
    p = data_sub.add_parser("prepare", help="tokenize once into data.prepared_dir (default "
                            "OUTPUT_DIR/prepared_data), for training jobs to load instead of "
                            "tokenizing at start-up")
    config_args(p)
    p.add_argument("--force", action="store_true", help="rewrite it even when up to date")
    p.set_defaults(func=cmd_data_prepare)

    from sft_scale.preflight import slurm as slurm_options  # its dataclass declares the flags

    p = sub.add_parser("slurm", help="submit and follow SLURM jobs")
    slurm_sub = p.add_subparsers(dest="slurm_command", required=True)
    p = slurm_sub.add_parser("submit", help="render the sbatch script, keep it, submit it")
    config_args(p)
    slurm_options.add_arguments(p, types={"zero": _zero_arg})
    p.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    p.set_defaults(func=cmd_slurm)
    for name, text in (("status", "the last job's state and the run's status"),
                       ("logs", "the last job's log"), ("cancel", "cancel the last job")):
        p = slurm_sub.add_parser(name, help=text)
        p.add_argument("--output-dir", required=True)
        if name == "logs":
            p.add_argument("-n", "--lines", type=int, default=50)
        p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base, verified")
    p.add_argument("--adapter", required=True, help="OUTPUT_DIR/adapter (PEFT format)")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="default: the adapter's base_model_name_or_path")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dequantize", action="store_true",
                   help="for a run trained on an 8-bit/4-bit base: merge into the dequantized "
                        "quantized weights (reproduces the trained model) instead of the "
                        "original full-precision ones")
    gguf_args(p, "--gguf", default=None, text="also write OUT/model-TYPE.gguf for llama.cpp / "
              "Ollama, verified")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="clean adapter / consolidated model from a checkpoint")
    p.add_argument("--run", required=True, help="a training output dir")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="default: the newest complete one")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: PEFT adapter (LoRA runs) or model folder; gguf: a model folder (LoRA "
                   "merged, verified) with OUT/model-TYPE.gguf beside it, verified")
    gguf_args(p, "--gguf-type", default="f16", text="GGUF weight type with --format gguf")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("gguf",
                       help="llama.cpp's GGUF converter: install it, convert a model folder")
    gguf_sub = p.add_subparsers(dest="gguf_command", required=True)
    p = gguf_sub.add_parser("setup", help="download llama-cpp-python's pinned source package once "
                            "and keep its converter (make install runs this)")
    p.add_argument("--sdist", default=None, help="a llama_cpp_python-VERSION.tar.gz already here")
    p.set_defaults(func=cmd_gguf)
    p = gguf_sub.add_parser("convert", help="a Hugging Face model folder (merged or full "
                            "fine-tune) to GGUF, verified against it")
    p.add_argument("--model", required=True, help="folder with config.json and safetensors")
    p.add_argument("--type", choices=OUTTYPES, default="f16")
    p.add_argument("--out", default=None, help="default: MODEL/model-TYPE.gguf")
    p.add_argument("--pre-tokenizer", default=None, help=PRE_TOKENIZER_HELP)
    p.set_defaults(func=cmd_gguf)

    p = sub.add_parser("eval", help="generation metrics of a base, and of base+adapter")
    p.add_argument("--model", required=True, help="base model: folder, hub id or builtin:NAME")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder (the 'after' column)")
    p.add_argument("--data", required=True, help="held-out records (any supported format)")
    p.add_argument("--config", default=None, help="for data/template settings (optional)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--max-examples", type=positive_int, default=200)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="tiny offline demo: evaluate, fine-tune, evaluate again")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
