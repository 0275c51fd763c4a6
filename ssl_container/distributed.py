"""One resolver for "who am I in this job": Slurm (srun/submitit), torchrun, or a single process.

This is the only module that reads ``SLURM_*`` or ``RANK``-style variables. It also exports the
variables DeepSpeed insists on (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), creates the
process group (NCCL on GPUs, gloo on CPU) and applies SyncBatchNorm from outside the models.
"""
from __future__ import annotations

import ctypes
import datetime
import os
import re
import signal
import socket
import sys
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "resolve_env", "init_distributed", "cleanup", "expand_nodelist", "free_port", "rendezvous_port",
           "barrier", "is_main", "maybe_sync_batchnorm", "all_reduce_min", "stop_with_launcher"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"
    local_world_size: int = 1  # processes on this node (they share its cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The ports a job derives from its id lie below Linux's default ephemeral range (32768-60999). A port
# in that range can be held at any moment by an outgoing connection on the node (another job's store
# client, slurmd, a loader fetching shards), and rank 0's store then dies at start with EADDRINUSE;
# submitit's own choice (20000-60000) mostly falls inside it.
RENDEZVOUS_PORTS = (20000, 32000)


def rendezvous_port(job_id: str) -> int:
    """The port every task of Slurm job ``job_id`` agrees on without talking. The members of one array
    (``<array>_<task>``, which may share a node) get consecutive ports, so they never collide."""
    lo, hi = RENDEZVOUS_PORTS
    base, _, task = str(job_id).partition("_")
    offset = int(task) if task.isdigit() else 0
    return lo + (zlib.crc32(base.encode()) + offset) % (hi - lo)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list (``node[01-03,7],gpu5``) without calling scontrol."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts.extend(f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def resolve_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank and world from torchrun's variables, else Slurm's, else a single process.

    torchrun (and submitit's ``TorchDistributedEnvironment().export()``) set RANK/WORLD_SIZE and
    win; a bare ``srun`` sets only SLURM_*, from which the master address is the first node of the
    job and the port derives from the job id, so every task computes the same rendezvous.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        # Named as submitit names it (an array member is <array>_<task>), so srun and submitit tasks agree.
        job_id = env.get("SLURM_JOB_ID", "0") or "0"
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=nodes[0],
            master_port=rendezvous_port(job_id),
            source="slurm",
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or 0) or 1,
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The Slurm job this process belongs to (None outside Slurm): a requeued job keeps its id."""
    return (os.environ if environ is None else environ).get("SLURM_JOB_ID") or None


_PR_SET_PDEATHSIG = 1


def stop_with_launcher(environ: dict[str, str] | None = None, sig: int = signal.SIGTERM) -> bool:
    """Under torchrun, ask the kernel for ``sig`` when the launcher dies; True if it was set.

    torchrun starts every rank in a session of its own, so a ``kill -9`` of torchrun (or of its
    process group) leaves the ranks running as orphans: they keep training and writing the run folder
    while a restarted run waits on their lock. SIGTERM (the trainer's stop signal) makes them finish
    the step, save and exit instead.
    """
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher died before the request: act on it now
        os.kill(os.getpid(), sig)
    return True


def init_distributed(device: torch.device, env: DistEnv | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Create the default process group (also for one process, so the code path is the same)."""
    env = env or resolve_env()
    if env.source == "torchrun":
        stop_with_launcher()
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_min(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank (so all ranks take the same branch)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def maybe_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm when several GPU ranks train a BatchNorm model: DINO's per-rank batches are
    small, and per-rank statistics let the student cheat through the batch (dino.md). PyTorch's
    SyncBatchNorm has no CPU kernel, so CPU ranks keep per-rank statistics (weights still agree)."""
    if device.type == "cuda" and dist.is_initialized() and dist.get_world_size() > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
