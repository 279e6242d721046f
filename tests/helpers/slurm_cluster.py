"""A real Slurm on 127.0.0.1 for tests: one slurmctld and two slurmd emulating nodes n1 and n2.

Why real: a shim ``sbatch``/``srun`` cannot deliver ``--signal``, requeue a job or run one step on two
nodes (docs/distributed.md 4.3).  The ``slurm_cluster`` fixture installs Debian's Slurm and munge when
missing (root and apt-get needed, else the tests skip), then starts its own munged, slurmctld and slurmd
from files in a fresh tmp dir, on free loopback ports and a private munge socket and key, so it neither
uses nor disturbs a Slurm or munged already on the machine.  Invariant: teardown stops, by PID, exactly
the daemons it started, and the job processes (slurmstepd) they left behind.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue", "slurmctld", "slurmd", "munged")
PACKAGES = ("slurm-wlm", "munge")
NODES = ("n1", "n2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"


def _missing() -> list[str]:
    return [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=120", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _has_candidate(package: str) -> bool:
    policy = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, timeout=60).stdout
    return "Candidate:" in policy and "Candidate: (none)" not in policy


def ensure_installed() -> None:
    """Install Slurm and munge (9 packages, about 10 s here) when a binary is missing.

    ``apt-get update`` runs only when the package lists lack a candidate or the install fails (stale lists).
    """
    missing = _missing()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root")
    start = time.monotonic()
    if not all(map(_has_candidate, PACKAGES)):
        _apt("update", timeout=300)
    install = ("install", "-y", "--no-install-recommends", *PACKAGES)
    result = _apt(*install, timeout=900)
    if result.returncode != 0:
        _apt("update", timeout=300)
        result = _apt(*install, timeout=900)
    if result.returncode != 0 or _missing():
        pytest.fail(f"apt-get {' '.join(install)} failed ({result.returncode}; still missing: {_missing()}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    print(f"\n[slurm_cluster] installed {' '.join(PACKAGES)} in {time.monotonic() - start:.1f} s")


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"--- {path.name}: (no file)"
    return f"--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class SlurmCluster:
    """One loopback cluster: ``root`` (its tmp dir: config, state, logs), ``env`` (with ``SLURM_CONF``, for
    clients), ``daemons`` (name -> Popen) and the helpers tests use."""

    root: Path
    env: dict = field(default_factory=dict)
    daemons: dict = field(default_factory=dict)  # name -> Popen, in start order
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "slurm.conf"

    # ---- set-up and teardown ----

    def start(self, ready_timeout: float = 60) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        (self.root / "state").mkdir()
        for node in NODES:
            (self.root / "spool" / node).mkdir(parents=True)
        socket_path = self.root / "munge" / "munge.socket"
        self._start_munged(socket_path)
        self.conf.write_text(self._slurm_conf(socket_path, ctld_port, node_ports))
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle(ready_timeout)

    def stop(self, grace: float = 10) -> None:
        """Cancel the jobs, then stop the daemons (munged last: the others use it while shutting down)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            deadline = time.monotonic() + grace
            try:
                self.run("scancel", "--full", "--user=root", timeout=grace, check=False)
                while time.monotonic() < deadline and \
                        self.run("squeue", "-h", "-o", "%i", timeout=grace, check=False).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # a hung slurmctld: the kills below still stop everything
        slurm = [process for name, process in self.daemons.items() if name != "munged"]
        self._terminate(slurm, grace)
        self._terminate([process for name, process in self.daemons.items() if name == "munged"], grace)
        self._stop_steps(grace)

    @staticmethod
    def _terminate(processes: list[subprocess.Popen], grace: float) -> None:
        """SIGTERM all, then SIGKILL those still running after ``grace`` seconds."""
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _start_munged(self, socket_path: Path) -> None:
        """A munged of our own (key, socket and seed in the tmp dir); slurm.conf points Slurm at it.

        ``--force``: the socket sits under pytest's 0700 tmp dir, which munged rejects as inaccessible to
        other users; every client here is root.
        """
        directory = socket_path.parent
        directory.mkdir()
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
                               f"--seed-file={directory / 'munged.seed'}", f"--pid-file={directory / 'munged.pid'}"])
        self._wait(lambda: socket_path.exists(), 20, "munged to create its socket")

    def _slurm_conf(self, socket_path: Path, ctld_port: int, node_ports: list[int]) -> str:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        root = self.root
        nodes = "\n".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                          f"RealMemory=1000 State=UNKNOWN" for node, port in zip(NODES, node_ports))
        return f"""\
ClusterName=dpdist-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES State=UP OverSubscribe=YES MaxTime=INFINITE
"""

    def _spawn(self, name: str, command: list[str]) -> None:
        """Start a daemon in the foreground (so its PID is ours to stop) with stdout and stderr in NAME.out."""
        with open(self.root / f"{name}.out", "wb") as out:
            self.daemons[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                  env=self.env or None, cwd=self.root, start_new_session=True)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            try:
                listing = self.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=5, check=False).stdout.split()
            except subprocess.TimeoutExpired:
                return False
            states = dict(zip(listing[::2], listing[1::2]))
            return all(states.get(node) == "idle" for node in NODES)
        self._wait(idle, timeout, "both nodes to be idle in sinfo")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [f"{name} (exit {p.returncode})" for name, p in self.daemons.items() if p.poll() is not None]
            if not dead and ready():
                return
            if dead or time.monotonic() > deadline:
                reason = f"exited: {', '.join(dead)}" if dead else f"not within {timeout:.0f} s"
                raise RuntimeError(f"slurm_cluster: waiting for {what}: {reason}\n{self.logs()}")
            time.sleep(0.25)

    def _stop_steps(self, grace: float) -> None:
        """slurmstepd daemonises away from slurmd: find ours by the SLURM_CONF it inherited, give them
        ``grace`` seconds to finish, then SIGKILL them."""
        mark = f"SLURM_CONF={self.conf}".encode()

        def ours() -> list[int]:
            pids = []
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    if (proc / "comm").read_text().strip() == "slurmstepd" and \
                            mark in (proc / "environ").read_bytes().split(b"\0"):
                        pids.append(int(proc.name))
                except OSError:
                    continue
            return pids
        deadline = time.monotonic() + grace
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in ours():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    # ---- helpers for tests ----

    def logs(self, lines: int = 25) -> str:
        """Each daemon's log tail: slurmd's log file (it also holds slurmstepd's lines), else its stderr."""
        paths = [self.root / f"{name}.log" for name in self.daemons]
        return "\n".join(_tail(path if path.exists() else path.with_suffix(".out"), lines) for path in paths)

    def run(self, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def sbatch(self, script: Path, *args: str) -> str:
        """Submit ``script`` (working directory: its folder) and return the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=self.env, cwd=Path(script).parent,
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        """``scontrol show job -o`` as a dict: JobState, Restarts (the requeue count; sacct calls it RestartCnt),
        ExitCode, EligibleTime, ...; {} once the job is purged (MinJobAge after it ends)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0:
            return {}
        line = result.stdout.strip()
        return dict(re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", line))

    def wait_for(self, job_id: str, states, timeout: float) -> dict:
        """Poll until the job's state is one of ``states``; fail early on a final state not among them."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState")
            if state in states:
                return info
            if state in TERMINAL:
                break
            time.sleep(0.5)
        why = f"ended {info['JobState']}" if info.get("JobState") in TERMINAL else f"not within {timeout:.0f} s"
        output = _tail(Path(info["StdOut"])) if "StdOut" in info else ""
        raise AssertionError(f"job {job_id} did not reach {'/'.join(sorted(states))}: {why}; last: {info}\n"
                             f"{output}\n{self.logs()}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """Module-scoped, so the daemons are gone before the rest of the suite runs (start-up costs about 1.5 s)."""
    ensure_installed()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        start = time.monotonic()
        cluster.start()
        print(f"\n[slurm_cluster] daemons up in {time.monotonic() - start:.1f} s ({cluster.root})")
        yield cluster
    finally:
        cluster.stop()
