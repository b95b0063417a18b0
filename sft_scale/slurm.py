"""`sft-scale slurm`: render the sbatch script from slurm/ templates, submit it, follow the job.

The job runs one task per node (srun); each runs `accelerate launch` for its node with the machine
rank from SLURM_NODEID and the first host of the allocation as rendezvous point (see launch.py for
why multi-node runs use the torchrun path). On USR1 (sent `signal_seconds` before the time limit)
or TERM the run checkpoints and exits; the script requeues the job, up to `max_requeues` times,
and the requeued job resumes from the checkpoint on its own (checkpoint.resume: auto).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sft_scale.builtin import resolve_model_path
from sft_scale.config import load_config
from sft_scale.errors import ClusterError, ConfigError
from sft_scale.launch import Layout, launch_command

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU-only nodes
    nproc_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str | None = None  # e.g. 04:00:00
    cpus_per_task: int | None = None
    mem: str | None = None
    job_name: str = "sft-scale"
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    zero: int | str | None = None  # "auto": decided in the job
    offload: bool = False
    deepspeed_config: str | None = None
    signal_seconds: int = 120
    max_requeues: int = 3

    @property
    def procs(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


def _shell_join(args: list[str]) -> str:
    """Like shlex.join, but leaves ${VAR} references for the shell to expand."""
    return " ".join(a if a.startswith("${") else shlex.quote(a) for a in args)


@dataclass
class Rendered:
    sbatch: str
    node: str
    output_dir: Path
    script_path: Path
    node_path: Path


def render(config: str, opts: SlurmOptions, overrides: list[str] = (),
           output_dir: str | None = None) -> Rendered:
    """The sbatch script and the per-node script, and where they will be kept. Validates the
    config (and resolves its DeepSpeed config for this world size) first."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from sft_scale.preflight import resolve_deepspeed

    config = str(Path(config).absolute())
    cfg = load_config(config, list(overrides), output_dir)
    # A model that cannot be found (a missing folder, a hub id neither cached nor reachable)
    # fails here in seconds, not after the job has waited in the queue.
    resolve_model_path(cfg.model.name_or_path, cfg.model.revision)
    out = Path(cfg.output.dir).resolve()
    layout = Layout(nproc_per_node=opts.procs, nodes=opts.nodes, node_rank="${SLURM_NODEID}",
                    master_addr="${MASTER_ADDR}", master_port="${MASTER_PORT}",
                    zero=opts.zero if opts.zero is not None else cfg.distributed.zero,
                    offload=opts.offload or cfg.distributed.offload,
                    deepspeed_config=opts.deepspeed_config or cfg.distributed.deepspeed_config)
    if layout.ds_file():  # resolve now: a contradiction fails here, not in the queue
        cfg.distributed.deepspeed_config = layout.ds_file()
        resolve_deepspeed(cfg, world_size=layout.world_size)
    cmd = launch_command(config, layout, list(overrides), str(out))
    launch_line = _shell_join([sys.executable, "-m", "accelerate.commands.launch"] + cmd[2:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    script_path = out / "slurm" / f"job-{stamp}.sbatch"
    node_script = out / "slurm" / f"node-{stamp}.sh"
    template = "multi_node.sbatch.j2" if opts.nodes > 1 else "single_node.sbatch.j2"
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), undefined=StrictUndefined,
                      keep_trailing_newline=True)
    threads = max(1, (opts.cpus_per_task or opts.procs) // opts.procs)
    values = dict(vars(opts), template_name=template, script_path=script_path,
                  node_script=node_script, log_dir=out / "slurm", output_dir=out,
                  python=shlex.quote(sys.executable), omp_threads=threads)
    return Rendered(env.get_template(template).render(**values),
                    env.get_template("node.sh.j2").render(launch_line=launch_line), out,
                    script_path, node_script)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise ConfigError(f"'{cmd[0]}' not found: run this on a SLURM login node (or install the "
                          "SLURM client tools)")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    res = _run(["sinfo", "-h", "-o", "%P"])
    names = sorted({p.strip().rstrip("*") for p in res.stdout.split() if p.strip()})
    if partition not in names:
        raise ConfigError(f"unknown SLURM partition {partition!r}; this cluster has: "
                          f"{', '.join(names) or '(none visible)'}. Fix --partition.")


def submit(config: str, opts: SlurmOptions, overrides: list[str] = (),
           output_dir: str | None = None, dry_run: bool = False) -> str | None:
    """Render, keep and submit; returns the job id (None for a dry run, which writes nothing)."""
    r = render(config, opts, overrides, output_dir)
    if dry_run:
        print(r.sbatch)
        print(f"# ---- {r.node_path} (run by srun on every node) ----")
        print(r.node)
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
    if res.returncode != 0:
        return {"JobId": job_id, "JobState": "UNKNOWN (no longer known to slurmctld)"}
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


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
