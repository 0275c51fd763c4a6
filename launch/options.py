"""What a job asks of the scheduler, and how that becomes submitit executor parameters.

One :class:`JobOptions` describes the resources (nodes, GPUs per node with one task per GPU, CPUs per
task, memory), where the job may run (partition, account, qos, constraint, exclude), how long (time
limit, the signal delay before it) and how often it may come back (requeues). ``slurm_parameters``
and ``local_parameters`` turn it into the keyword arguments of submitit's ``SlurmExecutor`` and
``LocalExecutor``; nothing here talks to a scheduler.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobOptions", "LaunchError", "parse_time_minutes", "parse_key_values", "slurm_parameters",
           "local_parameters"]


class LaunchError(ValueError):
    """A launch request that cannot work, with what to change in the message."""


@dataclass
class JobOptions:
    nodes: int = 1
    gpus_per_node: int = 0  # one task per GPU; 0: CPU job with tasks_per_node tasks per node
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None  # default: the cluster's (training jobs: data.num_workers + 1)
    mem_gb: float | None = None  # per node; 0 asks Slurm for all of a node's memory
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    time: str | int = "24:00:00"  # minutes, or Slurm's [D-]HH:MM[:SS]
    comment: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: the job requeues itself
    job_name: str | None = None
    max_requeues: int = 10  # requeues after preemption or time-out, counted per submission
    sbatch: dict[str, str] = field(default_factory=dict)  # any other #SBATCH option, e.g. {"gres": "gpu:8"}
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ..., source ...)
    srun_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # exported inside every task before the work starts
    array_parallelism: int = 256  # sweeps: members running at once
    python: str | None = None  # interpreter on the nodes (default: this one; it must be on shared storage)

    @property
    def ntasks_per_node(self) -> int:
        if self.gpus_per_node > 0:
            if self.tasks_per_node not in (None, self.gpus_per_node):
                raise LaunchError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                                  "the launcher runs one task per GPU; drop --tasks-per-node")
            return self.gpus_per_node
        return self.tasks_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def time_min(self) -> int:
        return parse_time_minutes(self.time)

    def validate(self) -> None:
        for name in ("nodes", "signal_delay_s", "array_parallelism"):
            if getattr(self, name) < 1:
                raise LaunchError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues"):
            if getattr(self, name) < 0:
                raise LaunchError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise LaunchError(f"tasks-per-node must be >= 1, got {self.tasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise LaunchError(f"mem-gb must be >= 0, got {self.mem_gb}")
        self.ntasks_per_node  # noqa: B018 (raises on a task/GPU mismatch)
        if self.signal_delay_s >= self.time_min * 60:
            raise LaunchError(f"signal delay {self.signal_delay_s} s is not shorter than the time limit "
                              f"({self.time_min} min): lower --signal-delay-s or raise --time")


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>[\d:]+)$")


def parse_time_minutes(value: str | int | float) -> int:
    """Slurm's time formats -> whole minutes (rounded up): ``90``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minutes = math.ceil(value)
    else:
        text = str(value).strip()
        m = _TIME.match(text)
        parts = m.group("rest").split(":") if m else []
        if not m or len(parts) > 3 or any(p == "" for p in parts):
            raise LaunchError(f"time limit {value!r} is not a Slurm time: use minutes (90), HH:MM:SS or D-HH:MM:SS")
        nums = [int(p) for p in parts]
        if m.group("d") is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            nums += [0] * (3 - len(nums))
            seconds = ((int(m.group("d")) * 24 + nums[0]) * 60 + nums[1]) * 60 + nums[2]
        elif len(nums) == 1:  # minutes
            seconds = nums[0] * 60
        elif len(nums) == 2:  # MM:SS
            seconds = nums[0] * 60 + nums[1]
        else:  # HH:MM:SS
            seconds = (nums[0] * 60 + nums[1]) * 60 + nums[2]
        minutes = math.ceil(seconds / 60)
    if minutes < 1:
        raise LaunchError(f"time limit {value!r} is under a minute")
    return minutes


def parse_key_values(items: list[str] | None, what: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> dict; a bare ``KEY`` means a flag (value ``True`` for sbatch)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise LaunchError(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value if sep else True
    return out


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def slurm_parameters(opts: JobOptions, job_name: str) -> dict[str, Any]:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters``."""
    opts.validate()
    params: dict[str, Any] = {
        "job_name": opts.job_name or job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.ntasks_per_node,
        "time": opts.time_min,
        "signal_delay_s": opts.signal_delay_s,
        "array_parallelism": opts.array_parallelism,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb is not None:
        params["mem"] = _mem(opts.mem_gb)
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(opts, name):
            params[name] = getattr(opts, name)
    if opts.sbatch:
        params["additional_parameters"] = {k.replace("-", "_"): v for k, v in opts.sbatch.items()}
    if opts.setup:
        params["setup"] = list(opts.setup)
    if opts.srun_args:
        params["srun_args"] = list(opts.srun_args)
    return params


def local_parameters(opts: JobOptions) -> dict[str, Any]:
    """Keyword arguments for ``submitit.LocalExecutor.update_parameters`` (this machine, one node)."""
    opts.validate()
    if opts.nodes != 1:
        raise LaunchError(f"--local runs on this machine only: use --nodes 1 (got {opts.nodes})")
    params: dict[str, Any] = {
        "tasks_per_node": opts.ntasks_per_node,
        "gpus_per_node": opts.gpus_per_node,
        "timeout_min": opts.time_min,
        "signal_delay_s": opts.signal_delay_s,
    }
    if opts.setup:
        params["setup"] = list(opts.setup)
    return params
