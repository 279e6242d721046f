"""The torchrun command line of a run: on one machine, on several nodes, or inside a Slurm job.

- one machine: ``torchrun --standalone`` (a local rendezvous on a free port);
- several nodes (``launch.nnodes > 1``): a c10d rendezvous at ``launch.rdzv_endpoint``; every node
  runs the same command;
- inside a Slurm allocation (``SLURM_JOB_ID`` set, more than one node): nodes from ``SLURM_NNODES``,
  the rendezvous on ``MASTER_ADDR`` (else the allocation's first host) and ``MASTER_PORT`` (else
  29500), the job id as rendezvous id; ``srun`` starts one such command per node.

Every launch forwards SIGUSR2 as well as torchrun's default signals to the workers (Slurm's warning
before the time limit), which checkpoint at the next step boundary and stop; ``launch.max_restarts``
lets torchrun restart failed workers, which resume from the latest checkpoint.  Launch torchrun with
``LAUNCH_ENV`` in its environment.
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError, RunConfig

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
DEFAULT_PORT = 29500
# torchrun's agent shares its rendezvous store with the workers' process group by default; workers it
# restarts then read the previous attempt's gloo addresses and fail to connect (pytorch/pytorch#135712,
# seen here with --max-restarts).  A store of their own per attempt avoids that.
LAUNCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def slurm_first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``n[1-4]`` -> ``n1``), as ``scontrol`` expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is None or out.returncode != 0 or not out.stdout.split():
        raise ConfigError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol; set MASTER_ADDR to the "
                          "first node's address")
    return out.stdout.split()[0]


def rendezvous(cfg: RunConfig, env: dict) -> tuple[int, str | None, str | None]:
    """(number of nodes, c10d endpoint HOST:PORT, rendezvous id) for this environment; one node
    has neither endpoint nor id (a standalone rendezvous)."""
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NNODES", "1")) > 1:
        host = env.get("MASTER_ADDR") or slurm_first_host(env.get("SLURM_JOB_NODELIST", ""))
        return int(env["SLURM_NNODES"]), f"{host}:{env.get('MASTER_PORT', DEFAULT_PORT)}", env["SLURM_JOB_ID"]
    if cfg.launch.nnodes > 1:
        return cfg.launch.nnodes, cfg.launch.rdzv_endpoint, cfg.launch.rdzv_id
    return 1, None, None


def check_endpoint_port(endpoint: str) -> None:
    """Refuse a rendezvous port that is already taken on this machine (where the rendezvous will be
    hosted when the endpoint names it): torchrun's own error comes late and says little."""
    host, _, port = endpoint.rpartition(":")
    try:
        local = host in ("localhost", socket.gethostname()) or ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return  # not resolvable here: another node's address, checked where it runs
    if not local:
        return
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store does: TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1" if host == "localhost" else socket.gethostbyname(host), int(port)))
        except OSError:
            raise ConfigError(f"rendezvous port {port} on {host} is already in use; choose a free one "
                              "(launch.rdzv_endpoint, or MASTER_PORT inside Slurm)") from None


def torchrun_command(cfg: RunConfig, run_dir: Path, resume: str, env: dict) -> list[str]:
    nnodes, endpoint, rdzv_id = rendezvous(cfg, env)
    if endpoint is None:
        rdzv = ["--standalone"]
    else:
        check_endpoint_port(endpoint)
        rdzv = [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}"]
    world = cfg.parallel.world_size
    if world % nnodes:
        raise ConfigError(f"{world} processes (parallel.data x parallel.tensor) do not split evenly over {nnodes} "
                          "nodes; change the layout or the node count")
    return [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={world // nnodes}",
            f"--max-restarts={cfg.launch.max_restarts}", f"--signals-to-handle={SIGNALS}",
            f"--shutdown-timeout={cfg.launch.shutdown_timeout}",
            "-m", "dpdist.train.worker", str(run_dir), "--resume", resume]
