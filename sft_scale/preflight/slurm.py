"""`sft-scale slurm`: render the sbatch script from slurm/ templates, submit it, follow the job.

The job runs one task per node (srun); each runs `accelerate launch` for its node with the machine
rank from SLURM_NODEID and the first host of the allocation as rendezvous point (see launch.py for
why multi-node runs use the torchrun path). What the job does on each signal (slurm/node.sh.j2 and
slurm/base.sbatch.j2 say how):

- USR1, `signal_seconds` before the time limit: the run finishes its step, checkpoints and exits
  75; the batch script requeues the job (up to `max_requeues`), which resumes on its own
  (checkpoint.resume: auto).
- TERM (scancel, preemption, the time limit itself): the run checkpoints the same way before the
  KILL that follows; the batch script does not requeue (a cancelled job must stay cancelled;
  Slurm requeues a preempted job itself under PreemptMode=REQUEUE, which --requeue allows).
- A crash: the job fails, never requeued. Each attempt reads only its own record in the run's
  manifest (job id and restart count), so a "preempted" left by an earlier attempt cannot make a
  crash look like a preemption.

Every value substituted into the scripts is validated against SLURM's syntax or shell-quoted:
nothing from the command line or the config runs as shell, except the --setup lines, which are
shell by design and run as written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from sft_scale.config import load_config
from sft_scale.errors import ClusterError, ConfigError
from sft_scale.preflight.command import Layout, launch_command
from sft_scale.preflight.plan import dtype_bytes, lora_params, model_shape, parse_size

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
REPO_ROOT = Path(__file__).resolve().parents[2]
# The rendezvous port: 20000 + job id mod 12768, so 20000-32767. Linux hands out ephemeral ports
# (every outgoing connection on the node) from 32768-60999; a port there can already be taken.
PORT_BASE, PORT_SPAN = 20000, 12768
# The signal window: twice the time to write the checkpoint at the stated bandwidth, plus the
# step in flight, and never less than Slurm's usual 120 s.
STEP_MARGIN_S = 60
MIN_SIGNAL_S = 120


def _help(text: str, **cli) -> dict:
    return {"help": text, **cli}


@dataclass
class SlurmOptions:
    """The options of `sft-scale slurm submit`: one flag per field (--nodes for `nodes`), the
    metadata's help is the flag's help."""

    nodes: int = field(default=1, metadata=_help("nodes to run on"))
    gpus_per_node: int = field(default=0, metadata=_help("GPUs per node; 0 for CPU-only nodes"))
    nproc_per_node: int | None = field(default=None, metadata=_help(
        "training processes per node (default: GPUs per node, or 1)"))
    cpus_per_proc: int = field(default=8, metadata=_help(
        "CPU cores per training process (per GPU): the task asks for this times the processes "
        "per node, and each process gets that many threads (OMP_NUM_THREADS)"))
    cpus_per_task: int | None = field(default=None, metadata=_help(
        "CPU cores of each node's task, instead of --cpus-per-proc x processes per node"))
    mem: str | None = field(default=None, metadata=_help(
        "memory per node, e.g. 512G (default: 0, all of it, with --exclusive; else the "
        "cluster's default)"))
    exclusive: bool | None = field(default=None, metadata=_help(
        "whole nodes (default: on for several nodes, off for one)"))
    partition: str | None = field(default=None, metadata=_help("SLURM partition(s), e.g. gpu"))
    account: str | None = field(default=None, metadata=_help("account to charge"))
    qos: str | None = field(default=None, metadata=_help("quality of service"))
    constraint: str | None = field(default=None, metadata=_help("node features, e.g. h100"))
    time: str | None = field(default=None, metadata=_help(
        "time limit in SLURM's syntax: MM, HH:MM:SS, D-HH[:MM[:SS]]"))
    job_name: str = field(default="sft-scale", metadata=_help("job name (letters, digits, ._+-)"))
    extra_sbatch: list[str] = field(default_factory=list, metadata=_help(
        "an extra #SBATCH option, e.g. --extra-sbatch=--reservation=r1 (repeatable)",
        metavar="OPTION"))
    setup: list[str] = field(default_factory=list, metadata=_help(
        "a shell line run in the job before training, as written (it is shell), e.g. 'module "
        "load cuda', 'source venv/bin/activate', 'export NCCL_SOCKET_IFNAME=ib0' (repeatable)",
        metavar="LINE"))
    python: str = field(default="python", metadata=_help(
        "the job's Python: a name looked up on the job's PATH after the --setup lines, or a "
        "path; the job checks that it imports sft_scale before training"))
    zero: int | str | None = field(default=None, metadata=_help(
        "DeepSpeed ZeRO stage 0-3 or auto (default: the config's)"))
    offload: bool = field(default=False, metadata=_help("ZeRO-2/3 with CPU offload"))
    deepspeed_config: str | None = field(default=None, metadata=_help("your own DeepSpeed JSON"))
    signal_seconds: int | None = field(default=None, metadata=_help(
        "USR1 this long before the time limit: checkpoint and requeue (default: from the "
        "checkpoint's size and --write-bandwidth, at least 120)"))
    write_bandwidth: str = field(default="1GB", metadata=_help(
        "what the job can write to the output dir per second, all nodes together; sizes the "
        "signal window", metavar="SIZE"))
    max_requeues: int = field(default=3, metadata=_help(
        "requeues after USR1 preemptions before the job gives up (exit 75)"))
    prepare_data: bool | None = field(default=None, metadata=_help(
        "tokenize the data once before training (`sft-scale data prepare`, one task on the "
        "first node) so that no rank tokenizes while the others wait at a barrier (default: on "
        "for several nodes, off for one)"))

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def task_cpus(self) -> int:
        return self.cpus_per_task or self.procs * self.cpus_per_proc


def add_arguments(parser: argparse.ArgumentParser, types: dict | None = None) -> None:
    """One flag per SlurmOptions field; `types` maps a field to its argparse type."""
    for f in fields(SlurmOptions):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        default = f.default_factory() if f.default is MISSING else f.default
        if f.type.startswith("list"):
            parser.add_argument(flag, action="append", default=default, **meta)
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true", **meta)
        elif f.type.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                **meta)
        else:
            kind = (types or {}).get(f.name) or (int if f.type.startswith("int") else str)
            parser.add_argument(flag, type=kind, default=default, **meta)


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(**{f.name: getattr(args, f.name) for f in fields(SlurmOptions)})


# ---- validation: every value that reaches a script line -------------------------------------

_NAME = r"[A-Za-z0-9_.+-]+"
_SYNTAX = {
    "job_name": (re.compile(_NAME), "letters, digits and . _ + -"),
    "partition": (re.compile(rf"{_NAME}(,{_NAME})*"), "partition names, comma-separated"),
    "account": (re.compile(_NAME), "letters, digits and . _ + -"),
    "qos": (re.compile(_NAME), "letters, digits and . _ + -"),
    "constraint": (re.compile(r"[A-Za-z0-9_.+\-&|,*\[\]():!]+"),
                   "feature names joined by & | , with [ ] ( ) * counts"),
    "mem": (re.compile(r"\d+[KMGT]?B?", re.IGNORECASE), "a number with an optional K/M/G/T unit"),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def time_limit_seconds(text: str) -> int | None:
    """SLURM's time syntax (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> seconds;
    None for UNLIMITED/INFINITE."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"--time {text!r}: not a SLURM time; write minutes (90), HH:MM:SS "
                          "(04:00:00) or D-HH:MM:SS (1-12:00:00)")
    days, a, b, c = m.groups()
    if days is not None:
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)


def validate_options(opts: SlurmOptions) -> None:
    """Refuse what SLURM would not accept, and anything that could leave its line in a script."""
    for name in ("nodes", "cpus_per_proc"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"{_flag(name)} {getattr(opts, name)}: must be >= 1")
    for name in ("nproc_per_node", "cpus_per_task", "signal_seconds"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"{_flag(name)} {value}: must be >= 1")
    for name in ("gpus_per_node", "max_requeues"):
        if getattr(opts, name) < 0:
            raise ConfigError(f"{_flag(name)} {getattr(opts, name)}: must be >= 0")
    for name, (pattern, what) in _SYNTAX.items():
        value = getattr(opts, name)
        if value is not None and not pattern.fullmatch(value):
            raise ConfigError(f"{_flag(name)} {value!r}: not valid SLURM syntax; expected {what}")
    for name in ("python", "deepspeed_config", "write_bandwidth", "time"):
        value = getattr(opts, name)
        if value is not None and (not value or _CONTROL.search(value)):
            raise ConfigError(f"{_flag(name)} {value!r}: empty or contains a control character "
                              "(newline, tab, ...)")
    for line in opts.extra_sbatch:
        if _CONTROL.search(line) or not line.startswith("-"):
            raise ConfigError(f"--extra-sbatch {line!r}: expected one sbatch option on one line, "
                              "e.g. --reservation=r1")
    if opts.time is not None:
        time_limit_seconds(opts.time)
    try:
        if parse_size(opts.write_bandwidth) <= 0:
            raise ValueError("must be > 0")
    except ValueError as e:
        raise ConfigError(f"--write-bandwidth {opts.write_bandwidth!r}: {e}; e.g. 2GB (per "
                          "second)") from None


def _path_value(what: str, path: str) -> str:
    if _CONTROL.search(path):
        raise ConfigError(f"{what} {path!r}: contains a control character (newline, tab, ...); "
                          "choose a path without one")
    return path


# ---- the signal window ----------------------------------------------------------------------

def checkpoint_bytes(cfg, model_config=None) -> int:
    """What a checkpoint holds, all ranks together: the trained weights, their fp32 master copy
    under 16-bit training, and AdamW's two fp32 moments (frozen base weights are not saved).
    `model_config`: the model's config when already read (sft_scale.preflight.resolve)."""
    shape = model_shape(model_config if model_config is not None else cfg)
    wb = dtype_bytes(cfg, shape)
    if cfg.lora.enabled:
        trainable = lora_params(shape, cfg.lora)
        tb = 4 if cfg.quantization.load_in_8bit else wb  # PEFT keeps adapters on 8-bit in fp32
    else:
        trainable, tb = shape.total_params, wb
    master = 4 if tb == 2 else 0
    return trainable * (tb + master + 8)


def signal_window(cfg, opts: SlurmOptions, model_config=None) -> tuple[int, str]:
    """Seconds before the time limit for USR1, and how they were chosen."""
    if opts.signal_seconds is not None:
        seconds, why = opts.signal_seconds, "set with --signal-seconds"
    else:
        size, rate = checkpoint_bytes(cfg, model_config), parse_size(opts.write_bandwidth)
        write = size / rate
        seconds = max(MIN_SIGNAL_S, math.ceil(2 * write) + STEP_MARGIN_S)
        why = (f"checkpoint ~{size / 1e9:.3g} GB at {opts.write_bandwidth}/s (--write-bandwidth):"
               f" twice its {write:.0f} s write plus {STEP_MARGIN_S} s for the step in flight, "
               f"at least {MIN_SIGNAL_S} s; override with --signal-seconds")
    limit = time_limit_seconds(opts.time) if opts.time else None
    if limit is not None and seconds >= limit:
        raise ConfigError(f"the signal window ({seconds} s: {why}) is not shorter than --time "
                          f"{opts.time}: ask for more time, or a shorter --signal-seconds")
    return seconds, why


# ---- rendering -------------------------------------------------------------------------------

def _sbatch_quote(folder: str, pattern: str) -> str:
    """A file name inside an #SBATCH line: sbatch reads double quotes with backslash escapes, and
    expands % patterns (%j, %x) in file names; %% is a literal %."""
    text = folder.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}/{pattern}"'


# Placeholders the node script's shell fills in; every other argument is quoted.
_SHELL_VARS = {"${SLURM_NODEID}", "${MASTER_ADDR}", "${MASTER_PORT}"}


def _shell_join(args: list[str]) -> str:
    return " ".join(a if a in _SHELL_VARS else shlex.quote(a) for a in args)


def _local_model(name: str) -> bool:
    return name.startswith("builtin:") or Path(name).expanduser().is_dir()


@dataclass
class Rendered:
    sbatch: str
    node: str
    output_dir: Path
    script_path: Path
    node_path: Path
    signal_seconds: int
    signal_reason: str


def render(config: str, opts: SlurmOptions, overrides: list[str] = (),
           output_dir: str | None = None, pre_step: list[str] | None = None) -> Rendered:
    """The sbatch script and the per-node script, and where they will be kept. Validates the
    options and the config (and resolves its DeepSpeed config for this world size) first.
    `pre_step`: arguments for the job's Python, run once on the first node before training
    (e.g. a data preparation command); quoted like everything else."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    validate_options(opts)
    config = _path_value("--config", str(Path(config).absolute()))
    cfg = load_config(config, list(overrides), output_dir)
    out = Path(_path_value("output dir (output.dir / --output-dir)",
                           str(Path(cfg.output.dir).resolve())))
    layout = Layout.for_config(cfg, opts.zero, opts.offload, opts.deepspeed_config,
                               nproc_per_node=opts.procs, nodes=opts.nodes,
                               node_rank="${SLURM_NODEID}", master_addr="${MASTER_ADDR}",
                               master_port="${MASTER_PORT}")
    # Resolved now: a model that cannot be found (a missing folder, a hub id neither cached nor
    # reachable) or a contradiction fails here in seconds, not after the job waited in the queue.
    # Imported only now: it brings torch, transformers and peft (~10 s), which the refusals of
    # the options and the config above do not need.
    from sft_scale.preflight.resolve import resolve
    resolved = resolve(cfg, layout)
    seconds, why = signal_window(cfg, opts, resolved.model_config)
    prepare = opts.prepare_data if opts.prepare_data is not None else opts.nodes > 1
    if prepare and pre_step is None:
        # Written to data.prepared_dir (default OUT/prepared_data), which every rank then loads.
        pre_step = ["-m", "sft_scale.cli", "data", "prepare", "--config", config,
                    "--output-dir", str(out)] + [x for o in overrides for x in ("--set", o)]
    cmd = launch_command(config, layout, list(overrides), str(out))
    launch_line = '"$SFT_SCALE_PYTHON" -m accelerate.commands.launch ' + _shell_join(cmd[2:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script_path = out / "slurm" / f"job-{stamp}.sbatch"
    node_script = out / "slurm" / f"node-{stamp}.sh"
    template = "multi_node.sbatch.j2" if opts.nodes > 1 else "single_node.sbatch.j2"
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), undefined=StrictUndefined,
                      keep_trailing_newline=True)
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    exclusive = opts.exclusive if opts.exclusive is not None else opts.nodes > 1
    values = dict(
        vars(opts), template_name=template, script_path=script_path, node_script=node_script,
        sbatch_log=_sbatch_quote(str(out / "slurm"), "%x-%j.log"), output_dir=out,
        manifest=out / "manifest.json", repo=REPO_ROOT, procs=opts.procs,
        cpus_per_task=opts.task_cpus, omp_threads=max(1, opts.task_cpus // opts.procs),
        exclusive=exclusive, mem=opts.mem if opts.mem is not None else ("0" if exclusive else None),
        hf_offline=_local_model(cfg.model.name_or_path), port_base=PORT_BASE,
        port_span=PORT_SPAN, signal_seconds=seconds, signal_reason=why,
        pre_step=_shell_join(pre_step) if pre_step else None)
    return Rendered(env.get_template(template).render(**values),
                    env.get_template("node.sh.j2").render(launch_line=launch_line, **values),
                    out, script_path, node_script, seconds, why)


# ---- the cluster -----------------------------------------------------------------------------

def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise ClusterError(f"'{cmd[0]}' not found: run this on a SLURM login node (or install "
                           "the SLURM client tools)")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{shlex.join(cmd)}: no answer from SLURM in 60 s; is slurmctld "
                           "reachable from here?") from None


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    res = _run(["sinfo", "-h", "-o", "%P"])
    if res.returncode != 0:
        raise ClusterError(f"sinfo failed: {res.stderr.strip() or res.stdout.strip()}")
    names = sorted({p.strip().rstrip("*") for p in res.stdout.split() if p.strip()})
    for part in partition.split(","):
        if part not in names:
            raise ConfigError(f"unknown SLURM partition {part!r}; this cluster has: "
                              f"{', '.join(names) or '(none visible)'}. Fix --partition.")


def submit(config: str, opts: SlurmOptions, overrides: list[str] = (),
           output_dir: str | None = None, dry_run: bool = False,
           pre_step: list[str] | None = None) -> str | None:
    """Render, keep and submit; returns the job id (None for a dry run, which writes nothing).
    `pre_step`: see render."""
    r = render(config, opts, overrides, output_dir, pre_step)
    window = f"signal window: USR1 {r.signal_seconds} s before the time limit ({r.signal_reason})"
    if dry_run:
        print(r.sbatch)
        print(f"# ---- {r.node_path} (run by srun on every node) ----")
        print(r.node)
        print("# " + window)
        return None
    check_partition(opts.partition)
    out, script_path, node_path = r.output_dir, r.script_path, r.node_path
    created = [p for p in (out, out / "slurm") if not p.exists()]
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    script_path.write_text(r.sbatch)
    node_path.write_text(r.node)
    res = _run(["sbatch", "--parsable", str(script_path)])
    if res.returncode != 0:
        # Leave nothing behind from a submission that did not happen.
        script_path.unlink(missing_ok=True)
        node_path.unlink(missing_ok=True)
        for p in reversed(created):
            shutil.rmtree(p, ignore_errors=True)
        raise ClusterError(f"sbatch refused the job: {res.stderr.strip() or res.stdout.strip()}")
    job_id = res.stdout.strip().split(";")[0]
    with open(out / "slurm" / "jobs.jsonl", "a") as f:
        f.write(json.dumps({"job_id": job_id, "script": str(script_path),
                            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    print(window)
    print(f"submitted job {job_id}; script {script_path}; logs {out / 'slurm'}/{opts.job_name}-"
          f"{job_id}.log")
    return job_id


def last_job(output_dir: str) -> dict:
    p = Path(output_dir) / "slurm" / "jobs.jsonl"
    if not p.exists():
        raise ConfigError(f"{p}: no job was submitted for this output dir")
    return json.loads(p.read_text().splitlines()[-1])


def job_info(job_id: str) -> dict:
    res = _run(["scontrol", "show", "job", "-o", job_id])
    if res.returncode == 0:
        return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    # scontrol says "Invalid job id specified" for a job the controller has forgotten (MinJobAge
    # after it ended); anything else means we learned nothing about the job.
    if "invalid job id" in (res.stderr + res.stdout).lower():
        return {"JobId": job_id, "JobState": "UNKNOWN (ended; no longer known to slurmctld)"}
    raise ClusterError(f"scontrol show job {job_id} failed: "
                       f"{res.stderr.strip() or res.stdout.strip()} (is slurmctld reachable?)")


def status(output_dir: str) -> dict:
    job = last_job(output_dir)
    info = job_info(job["job_id"])
    manifest = Path(output_dir) / "manifest.json"
    run = json.loads(manifest.read_text()).get("status") if manifest.exists() else "not started"
    return {"job_id": job["job_id"], "state": info.get("JobState"),
            "restarts": info.get("Restarts"), "nodes": info.get("NodeList"), "run": run}


def log_file(output_dir: str) -> Path:
    job = last_job(output_dir)
    logs = sorted((Path(output_dir) / "slurm").glob(f"*-{job['job_id']}.log"))
    if not logs:
        raise ConfigError(f"no log for job {job['job_id']} yet in {Path(output_dir) / 'slurm'}")
    return logs[-1]


def cancel(output_dir: str) -> str:
    job = last_job(output_dir)
    res = _run(["scancel", job["job_id"]])
    if res.returncode != 0:
        raise ClusterError(f"scancel {job['job_id']}: {res.stderr.strip()}")
    return job["job_id"]
