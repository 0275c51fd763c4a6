"""The callables submitit runs in every task of a job: DINO training and evaluation modules.

Each task of a job (one per GPU; ``srun`` starts them, or submitit's local executor):

1. drops rendezvous variables inherited from the submitting shell (``sbatch`` exports its whole
   environment), applies the job's own ``--env`` and exports the job's distributed environment with
   submitit's ``TorchDistributedEnvironment``: MASTER_ADDR is the first host of the node list,
   MASTER_PORT derives from the job id (the same in every task, different for every array member,
   below the kernel's ephemeral port range; a one-task job takes a free port),
   RANK / WORLD_SIZE / LOCAL_RANK from the task ids. ``ssl_container.distributed`` reads them as it
   reads torchrun's;
2. keeps the preemption signal (USR2) for the task's main process: Slurm signals every process of a
   job step, and DataLoader workers, forked or spawned, would otherwise die of it or run submitit's
   handler themselves;
3. runs the work: ``ssl_container.train.train(cfg)``, which resumes from the newest complete
   checkpoint in ``cfg.run_dir`` by itself, or ``python -m eval.<name> ...``.

Before the time limit or at a preemption Slurm sends USR2 to every task. The trainer records it like
SIGTERM: the ranks agree on the next step boundary, save a checkpoint there and stop; then rank 0 runs
submitit's requeue path, which calls :meth:`TrainJob.checkpoint` (it only returns a fresh submission:
the same config, one requeue more) and ``scontrol requeue``. The requeued job resumes from the step the
warning arrived at. After ``max_requeues`` requeues ``checkpoint`` returns ``None`` and the job ends with
submitit's "Job not requeued" error (the checkpoint is on disk: the same launch command resumes it).
SIGTERM without a warning (scancel, a preemption without grace time) saves and ends the job the same
way, without the requeue.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import submitit

log = logging.getLogger("launch.job")

__all__ = ["TrainJob", "EvalJob", "EvalJobError", "export_distributed_env", "keep_signal_off_children",
           "DIST_VARS"]

# What torchrun / submitit export; sbatch copies the submitter's environment, so stale values from a
# shell that ran torchrun must not leak into the job.
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def preemption_signal() -> int:
    """The signal submitit handles as time-out / preemption (USR2 unless SUBMITIT_PREEMPT_SIGNAL)."""
    name = submitit.JobEnvironment.USR_SIG
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


_receiver_started = False


def keep_signal_off_children(signum: int | None = None) -> None:
    """Block ``signum`` in the main thread (so in every process it forks or spawns, which inherit the
    mask across fork and exec) and let one helper thread of this process receive it instead. Python
    runs the handler in the main thread either way; DataLoader workers keep the signal pending
    forever instead of dying of it or running submitit's handler themselves."""
    global _receiver_started
    signum = preemption_signal() if signum is None else signum
    if _receiver_started or threading.current_thread() is not threading.main_thread():
        return
    ready = threading.Event()

    def receive() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        ready.set()
        while True:
            time.sleep(3600)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    threading.Thread(target=receive, name=f"receive-{signal.Signals(signum).name}", daemon=True).start()
    ready.wait()
    _receiver_started = True


def export_distributed_env(extra_env: dict[str, str] | None = None) -> Any:
    """Export MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK for this task (see the module doc).
    Returns submitit's ``TorchDistributedEnvironment``."""
    for key in DIST_VARS:
        os.environ.pop(key, None)
    os.environ.update({k: str(v) for k, v in (extra_env or {}).items()})  # an explicit MASTER_PORT wins
    if "MASTER_PORT" not in os.environ:
        from ssl_container.distributed import free_port, rendezvous_port  # torch: only in the task

        job = submitit.JobEnvironment()
        # One task agrees with nobody, so a port the kernel hands out free cannot collide.
        os.environ["MASTER_PORT"] = str(free_port() if job.num_tasks == 1 else rendezvous_port(job.job_id))
    # CUDA_VISIBLE_DEVICES stays as Slurm set it: every task sees its node's GPUs and the trainer
    # picks cuda:LOCAL_RANK.
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _task_setup(extra_env: dict[str, str]) -> Any:
    keep_signal_off_children()
    dist_env = export_distributed_env(extra_env)
    # A task that failed while its job was being requeued left an error result behind; the requeued
    # run writes a new one, and the submitter must not read the stale one in between.
    try:
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 (bookkeeping only)
        pass
    threads = extra_env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    return dist_env


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _start_record(kind: str, dist_env: Any, requeues: int) -> dict[str, Any]:
    job = submitit.JobEnvironment()
    return {"event": "start", "kind": kind, "job_id": job.job_id, "requeues": requeues, "time": time.time(),
            "host": socket.gethostname(), "world_size": dist_env.world_size,
            "master": f"{dist_env.master_addr}:{dist_env.master_port}", "log_out": str(job.paths.stdout),
            "log_err": str(job.paths.stderr)}


class TrainJob(submitit.helpers.Checkpointable):
    """DINO pretraining of one resolved :class:`~ssl_container.config.TrainConfig` as a submitit job."""

    def __init__(self, cfg: Any, *, env: dict[str, str] | None = None, requeues: int = 0,
                 max_requeues: int = 10) -> None:
        self.cfg = cfg
        self.env = dict(env or {})
        self.requeues = requeues
        self.max_requeues = max_requeues

    def __call__(self) -> dict[str, Any]:
        dist_env = _task_setup(self.env)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run_dir = Path(self.cfg.run_dir)
        if dist_env.rank == 0:
            append_jsonl(run_dir / "launch.jsonl", _start_record("train", dist_env, self.requeues))
        log.info("task %d/%d of job %s (requeue %d of at most %d), run folder %s", dist_env.rank,
                 dist_env.world_size, submitit.JobEnvironment().job_id, self.requeues, self.max_requeues, run_dir)
        from ssl_container.train import StoppedBySignal, train  # after the environment is in place

        # The trainer takes over SIGTERM, which submitit would ignore ("bypass"): at scancel or a
        # preemption without warning every rank finishes its step and saves. And the requeue warning
        # (USR2): the ranks first agree on a step, save it, and only then does rank 0 run submitit's
        # requeue, so the requeued job goes on from that very step instead of redoing the steps since
        # the last periodic checkpoint.
        warning = preemption_signal()
        requeue = signal.getsignal(warning)
        try:
            return train(self.cfg, take_signals=(signal.SIGTERM, warning))
        except StoppedBySignal as stop:
            if stop.signum != warning or not callable(requeue):
                raise
            log.warning("%s: requeueing", stop)
            requeue(warning, None)  # rank 0: checkpoint() + scontrol requeue + exit; other ranks: returns
            # Not an error result: the requeued job is already on its way (submitit's own exit, as on rank 0).
            sys.exit(-1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Runs inside the USR2 handler of rank 0 only: no collective, no checkpoint I/O. The fresh
        submission resumes from the newest complete checkpoint on disk."""
        if self.requeues >= self.max_requeues:
            log.error("not requeueing: this job was already requeued %d times (max_requeues=%d); resubmit the same "
                      "launch command to continue from the newest checkpoint", self.requeues, self.max_requeues)
            return None
        log.warning("preempted or timed out: requeueing (%d of at most %d); the requeued job resumes from the newest "
                    "complete checkpoint in %s", self.requeues + 1, self.max_requeues, self.cfg.run_dir)
        return submitit.helpers.DelayedSubmission(
            type(self)(self.cfg, env=self.env, requeues=self.requeues + 1, max_requeues=self.max_requeues))

    def __repr__(self) -> str:
        return f"TrainJob(run_dir={self.cfg.run_dir!r}, requeues={self.requeues})"


class EvalJobError(RuntimeError):
    """An evaluation module exited with an error; the message ends with its last stderr lines."""


class EvalJob(submitit.helpers.Checkpointable):
    """``python -m <module> <args>`` in every task, with the job's distributed environment exported
    (the eval modules read it like torchrun's). A requeue reruns the module (feature caches make
    that cheap)."""

    def __init__(self, module: str, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 requeues: int = 0, max_requeues: int = 10, record_dir: str | None = None) -> None:
        self.module = module
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self.requeues = requeues
        self.max_requeues = max_requeues
        self.record_dir = record_dir

    def __call__(self) -> dict[str, Any]:
        dist_env = _task_setup(self.env)
        if dist_env.rank == 0 and self.record_dir:
            append_jsonl(Path(self.record_dir) / "launch.jsonl",
                          {**_start_record("eval", dist_env, self.requeues), "module": self.module, "args": self.args})
        cmd = [sys.executable, "-u", "-m", self.module, *self.args]
        print(f"running {' '.join(cmd)}", flush=True)
        tail: collections.deque[str] = collections.deque(maxlen=40)
        t0 = time.time()
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
            assert proc.stderr is not None
            for line in proc.stderr:  # tee: the job's log keeps everything, the error keeps the end
                sys.stderr.write(line)
                tail.append(line)
            rc = proc.wait()
        sys.stderr.flush()
        if rc != 0:
            raise EvalJobError(f"python -m {self.module} exited with status {rc} on rank {dist_env.rank}; "
                               f"the end of its stderr:\n{''.join(tail)}")
        return {"module": self.module, "args": self.args, "returncode": rc, "seconds": time.time() - t0,
                "rank": dist_env.rank}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        if self.requeues >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(
            type(self)(self.module, self.args, env=self.env, requeues=self.requeues + 1,
                       max_requeues=self.max_requeues, record_dir=self.record_dir))

    def __repr__(self) -> str:
        return f"EvalJob({self.module!r}, {self.args!r}, requeues={self.requeues})"
