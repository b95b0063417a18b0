"""A real two-node SLURM cluster on this one host, for the tests (Debian's slurm-wlm + munge).

Both "nodes" (n1, n2) are slurmd daemons on 127.0.0.1 with their own ports, spool folders and
pid files. Needs root (munged runs as user munge, the daemons as root). Start/stop from Python
or the shell: `python tests/slurm_cluster.py start DIR` / `stop DIR`.

Where cgroup v1 controllers are mounted and writable (as on these machines), the cluster tracks
and binds processes the way production clusters do: proctrack/cgroup (signals other than KILL
reach only each step's task, not the processes it started) and task/cgroup + task/affinity
binding tasks to cores (a step gets one CPU per task unless srun asks for more). Elsewhere it
falls back to proctrack/linuxproc and no binding (signals reach every process), and says so in
`LocalSlurm.cgroup`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = """\
ClusterName=sftlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
{tracking}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


CGROUP_TRACKING = """\
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup,task/affinity
TaskPluginParam=Cores"""
PLAIN_TRACKING = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none"""
CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=yes
ConstrainRAMSpace=no
ConstrainDevices=no
"""


def cgroup_v1_usable() -> bool:
    """The controllers Slurm's cgroup/v1 plugin needs, mounted and writable."""
    root = Path("/sys/fs/cgroup")
    return all((root / c).is_dir() and os.access(root / c, os.W_OK)
               for c in ("cpuset", "freezer", "memory", "devices"))


def available() -> str | None:
    """None if a cluster can be started here, else why not."""
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} missing; "
                "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "starting slurmd/munged needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, base: Path):
        self.base = Path(base)
        self.env = dict(os.environ, SLURM_CONF=str(self.base / "slurm.conf"))
        self.cgroup = cgroup_v1_usable()

    def run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=60)

    def start(self) -> LocalSlurm:
        self._munge()
        self._hosts()
        for sub in ("state", "spool"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        if self.cgroup:
            (self.base / "cgroup.conf").write_text(CGROUP_CONF)
        (self.base / "slurm.conf").write_text(CONF.format(
            host=host, d=self.base, ctld_port=_free_port(), p1=_free_port(), p2=_free_port(),
            tracking=CGROUP_TRACKING if self.cgroup else PLAIN_TRACKING))
        self.run("slurmctld", "-c")  # -c: start from a clean state
        self.run("slurmd", "-N", "n1")
        self.run("slurmd", "-N", "n2")
        self.wait_idle()
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            res = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            if states and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return
            if any(s.startswith("down") or s.startswith("drain") for s in states.values()):
                self.run("scontrol", "update", "nodename=n1,n2", "state=resume", check=False)
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not come up: {res.stdout} {res.stderr}\n"
                           + (self.base / "slurmctld.log").read_text()[-3000:])

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        for pidfile in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid"):
            p = self.base / pidfile
            if p.exists():
                try:
                    os.kill(int(p.read_text().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass

    @staticmethod
    def _munge() -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    @staticmethod
    def _hosts() -> None:
        hosts = Path("/etc/hosts")
        if not any(line.split()[1:3] == ["n1", "n2"] for line in hosts.read_text().splitlines()
                   if line.strip()):
            with open(hosts, "a") as f:
                f.write("127.0.0.1 n1 n2\n")


if __name__ == "__main__":
    cluster = LocalSlurm(Path(sys.argv[2]))
    cluster.start() if sys.argv[1] == "start" else cluster.stop()
