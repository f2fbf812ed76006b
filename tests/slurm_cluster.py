"""A throw-away single-node SLURM cluster for tests: munged, slurmctld and slurmd as child processes.

Everything lives in one temporary folder; every daemon is started here and stopped by PID. Needs
root (the job step reads /etc/slurm/slurm.conf, which is pointed at the temporary config) and
Debian's slurmctld, slurmd, slurm-client and munge packages (installed by .ci/run).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
SYSTEM_CONF = "/etc/slurm/slurm.conf"
# One test cluster per machine at a time: it takes SYSTEM_CONF and SLURM's fixed ports. A second
# test suite (another clone, another virtual environment) waits here for the first one's to stop.
LOCK = "/run/lock/volfilter-test-slurm.lock" if os.path.isdir("/run/lock") else "/tmp/volfilter-test-slurm.lock"


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing; .ci/run installs them with apt)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if os.path.exists(SYSTEM_CONF) and not os.path.islink(SYSTEM_CONF):
        return f"{SYSTEM_CONF} already exists (a real SLURM installation); not touching it"
    return None


def _exe(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def _memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        total_kb = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1])
    return int(total_kb / 1024 * 0.8)


SLURM_CONF = """\
ClusterName=volfilter
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def _machine_lock(wait_s):
    """Hold LOCK (flock: released by the kernel even if this process is killed)."""
    with open(LOCK, "a") as fh:
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    raise RuntimeError(f"SLURM test cluster: another test suite held {LOCK} for {wait_s} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def local_cluster(folder, partition="debug", timeout=60, lock_wait_s=900):
    """Start munged + slurmctld + slurmd; yield the environment for client commands; stop them.

    Waits up to ``lock_wait_s`` for a cluster of another test suite on this machine to stop."""
    with _machine_lock(lock_wait_s), _cluster(folder, partition, timeout) as env:
        yield env


@contextlib.contextmanager
def _cluster(folder, partition, timeout):
    d = os.path.abspath(folder)
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    key = os.path.join(d, "munge.key")
    with open(key, "wb") as fh:
        fh.write(os.urandom(1024))
    os.chmod(key, 0o400)
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as fh:
        fh.write(
            SLURM_CONF.format(
                host=socket.gethostname(), d=d, cpus=os.cpu_count(), mem=_memory_mb(), partition=partition
            )
        )
    env = {**os.environ, "SLURM_CONF": conf}
    procs = []
    made_link = False
    log = None
    try:
        # The job step drops SLURM_CONF, so the system path must lead to this config too.
        os.makedirs(os.path.dirname(SYSTEM_CONF), exist_ok=True)
        if os.path.islink(SYSTEM_CONF):
            os.unlink(SYSTEM_CONF)
        os.symlink(conf, SYSTEM_CONF)
        made_link = True
        log = open(os.path.join(d, "daemons.out"), "ab")
        procs.append(subprocess.Popen([_exe("munged"), "--foreground", "--force", f"--socket={d}/munge.socket",
                                       f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
                                       f"--seed-file={d}/munged.seed"], stdout=log, stderr=log))  # fmt: skip
        _wait(lambda: os.path.exists(f"{d}/munge.socket"), timeout, "munged socket", d)
        procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", conf], env=env, stdout=log, stderr=log))
        procs.append(
            subprocess.Popen([_exe("slurmd"), "-D", "-N", "localhost", "-f", conf], env=env, stdout=log, stderr=log)
        )

        def idle():
            out = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() == "idle"

        _wait(idle, timeout, "an idle SLURM node", d, procs)
        yield env
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if made_link and os.path.islink(SYSTEM_CONF):
            os.unlink(SYSTEM_CONF)
        if log is not None:
            log.close()


def _wait(predicate, timeout, what, folder, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            break
        time.sleep(0.25)
    logs = ""
    for name in ("daemons.out", "slurmctld.log", "slurmd.log", "munged.log"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, errors="replace") as fh:
                logs += f"\n--- {name}\n" + fh.read()[-1500:]
    raise RuntimeError(f"SLURM test cluster: no {what} after {timeout} s{logs}")
