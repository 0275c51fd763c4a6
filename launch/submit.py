"""Submit DINO training, sweeps and evaluation jobs to Slurm (or run them here) through submitit.

    ssl-container launch --config configs/container_light_imagenet.yaml --nodes 2 --gpus-per-node 8 \\
        --cpus-per-task 10 --mem-gb 0 --partition gpu --time 24:00:00 run_dir=/shared/runs/cl100
    python -m launch.submit ...                      (the same)

A training job's run folder (``run_dir``, on storage every node sees) holds everything::

    RUN/config.yaml          the resolved config (written at submission, again by the trainer)
    RUN/launch.jsonl         one line per submission and per start of a job (requeues included)
    RUN/submitit/<job id>/   submitit's pickles and logs: <job id>_<task>_log.out / .err per task
    RUN/checkpoints/ RUN/metrics.jsonl ...    the trainer's (see ssl_container/train.py)

``--local`` runs the same callable with submitit's local executor (this machine, one node) and
waits; ``--dry-run`` prints the sbatch script and submits nothing. A sweep (``--sweep`` / ``--grid``
/ ``--sweep-file``) becomes one Slurm job array, one run folder per member. ``--eval NAME`` runs
``python -m eval.NAME ARGS`` (the arguments after ``--``) as the job, against ``--checkpoint``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from launch.options import JobOptions, LaunchError, local_parameters, parse_key_values, slurm_parameters
from ssl_container.config import split_top_level

__all__ = ["Submission", "JobFailedError", "submit_train", "submit_sweep", "submit_eval", "wait", "sweep_members",
           "build_parser", "main"]

MODES = ("slurm", "local", "dry-run")
# srun: if one task dies the others are killed at once, instead of waiting in a collective until the
# process-group timeout (or the time limit).
DEFAULT_SRUN_ARGS = ["--kill-on-bad-exit=1"]


class JobFailedError(RuntimeError):
    """A submitted job failed; the message carries the job's own error text (traceback or stderr)."""


@dataclass
class Submission:
    """What a launch did: the submitit jobs (none for a dry run), run folders and where logs go."""

    kind: str  # train | sweep | eval
    mode: str  # slurm | local | dry-run
    folder: Path  # submitit's folder pattern (with %j)
    run_dirs: list[Path] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    script: str | None = None  # dry run: the sbatch script
    members: list[dict[str, Any]] = field(default_factory=list)  # sweeps: index, overrides, run_dir
    world_size: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]

    def describe(self) -> str:
        lines = list(self.notes)
        if self.mode == "dry-run":
            lines.append("dry run: nothing submitted. The sbatch script:")
            lines.append(self.script or "")
            return "\n".join(lines)
        where = "Slurm job" if self.mode == "slurm" else "local job (this machine)"
        if self.kind == "sweep":
            array_id = self.job_ids[0].split("_")[0] if self.jobs else "?"
            lines.append(f"submitted {where} array {array_id}: {len(self.jobs)} members x {self.world_size} task(s)")
            for job, member in zip(self.jobs, self.members):
                lines.append(f"  {job.job_id:<12} {member['run_dir']}  {' '.join(member['overrides'])}")
        else:
            lines.append(f"submitted {where} {self.job_ids[0]} ({self.kind}, {self.world_size} task(s))")
            if self.run_dirs:
                lines.append(f"  run folder : {self.run_dirs[0]}")
        job = self.jobs[0]
        out, err = Path(job.paths.stdout), Path(job.paths.stderr)
        lines.append(f"  logs       : {out.parent}/  ({out.name}, {err.name}; one pair per task)")
        lines.append(f"  follow     : tail -F {out} {err}")
        if self.mode == "slurm":
            jid = self.job_ids[0].split("_")[0]
            lines.append(f"  status     : squeue -j {jid}    sacct -j {jid} -o JobID,State,Elapsed,ExitCode,NodeList")
            lines.append(f"  cancel     : scancel {jid}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# executors


def _executor(folder: Path, opts: JobOptions, mode: str, job_name: str) -> Any:
    import submitit

    if mode == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_requeues, python=opts.python)
        ex.update_parameters(**local_parameters(opts))
        return ex
    try:
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues, python=opts.python)
    except RuntimeError as err:  # no srun on this machine
        raise LaunchError(f"{err} Use --local to run on this machine, or --dry-run to see the sbatch script.") from None
    ex.update_parameters(**_slurm_params(opts, job_name))
    return ex


def _slurm_params(opts: JobOptions, job_name: str) -> dict[str, Any]:
    params = slurm_parameters(opts, job_name)
    params["srun_args"] = [*DEFAULT_SRUN_ARGS, *params.get("srun_args", [])]
    return params


def _dry_run_script(folder: Path, opts: JobOptions, job_name: str, array_size: int | None = None) -> str:
    """The sbatch script submitit would submit (built without srun or a cluster)."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = opts.python or shlex.quote(sys.executable)
    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    params = _slurm_params(opts, job_name)
    if array_size is not None:
        params["map_count"] = array_size
    return _make_sbatch_string(command=command, folder=folder, **params)


# ------------------------------------------------------------------------------------------------
# training


def _resolve(config: str | Path | None, overrides: Sequence[str]) -> Any:
    from ssl_container.config import ConfigError, load_config

    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    # The job's working directory is the submission directory, but an absolute path is what a
    # reader of the logs, a requeued job and a later resume all agree on.
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    return cfg


def _train_options(opts: JobOptions, cfg: Any) -> JobOptions:
    if opts.cpus_per_task is None:  # the trainer's process + its DataLoader workers
        opts = dataclasses.replace(opts, cpus_per_task=cfg.data.num_workers + 1)
    return opts


def _run_folder_notes(cfg: Any, world_size: int, refuse: bool, dry_run: bool = False) -> list[str]:
    """What an existing run folder means for this submission: the trainer's own resume plan (the
    checkpoint it continues from, the config changes, a carried position, or why it would refuse).
    With ``refuse``, a plan the trainer would refuse stops the submission here, before a job waits in
    the queue only to fail at its start; a dry run says so the same way (exit 2), as its verdict."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "checkpoints").is_dir():
        return []
    from ssl_container.trainer.resume import preview  # reads checkpoints: loads torch

    plan = preview(cfg, world_size)
    if plan.refused is not None and (refuse or dry_run):
        raise LaunchError(f"{plan.refused} (the trainer would refuse this resume at its start; nothing was submitted"
                          + ("" if dry_run else "; --force submits anyway") + ")")
    return plan.describe()


def _check_no_live_job(run_dir: Path, mode: str) -> None:
    """Two jobs writing one run folder would interleave checkpoints: refuse while the last one lives."""
    record = run_dir / "launch.jsonl"
    if mode != "slurm" or not record.is_file() or shutil.which("squeue") is None:
        return
    submitted = []
    for line in record.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "submitted" and rec.get("mode") == "slurm":
            submitted.append(rec)
    if not submitted:
        return
    job_id = str(submitted[-1]["job_id"])
    try:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                               timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return
    if state:
        raise LaunchError(f"job {job_id} ({state[0]}) is still using {run_dir}; two jobs on one run folder would "
                          f"overwrite each other's checkpoints. Wait for it or `scancel {job_id}` first "
                          "(or pass --force).")


def _record_submission(run_dir: Path, job: Any, mode: str, kind: str, extra: dict[str, Any] | None = None) -> None:
    from launch.job import append_jsonl

    append_jsonl(run_dir / "launch.jsonl", {"event": "submitted", "mode": mode, "kind": kind, "job_id": str(job.job_id),
                                            "time": time.time(), "log_out": str(job.paths.stdout),
                                            "log_err": str(job.paths.stderr), "argv": sys.argv, **(extra or {})})


def submit_train(config: str | Path | None = None, overrides: Sequence[str] = (), options: JobOptions | None = None,
                 *, mode: str = "slurm", folder: str | Path | None = None, force: bool = False) -> Submission:
    """Submit one DINO training run (or resume it: the trainer continues from the newest checkpoint
    in ``run_dir``). ``mode``: ``slurm``, ``local`` or ``dry-run``."""
    from launch.job import TrainJob
    from ssl_container.config import save_config

    if mode not in MODES:
        raise LaunchError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    cfg = _resolve(config, overrides)
    opts = _train_options(options or JobOptions(), cfg)
    run_dir = Path(cfg.run_dir)
    job_folder = Path(folder).resolve() if folder else run_dir / "submitit" / "%j"
    job_name = f"dino-{run_dir.name}"
    sub = Submission("train", mode, job_folder, [run_dir], world_size=opts.world_size,
                     notes=_run_folder_notes(cfg, opts.world_size, refuse=mode != "dry-run" and not force,
                                                            dry_run=mode == "dry-run" and not force))
    if mode == "dry-run":
        sub.notes.append(f"each of the {opts.world_size} task(s) would run: ssl_container.train.train(cfg), "
                         f"run_dir={run_dir}" + (f", environment {opts.env}" if opts.env else ""))
        sub.script = _dry_run_script(job_folder, opts, job_name)
        return sub
    if not force:
        _check_no_live_job(run_dir, mode)
    executor = _executor(job_folder, opts, mode, job_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    job = executor.submit(TrainJob(cfg, env=opts.env, max_requeues=opts.max_requeues))
    _record_submission(run_dir, job, mode, "train", {"nodes": opts.nodes, "tasks": opts.world_size})
    sub.jobs.append(job)
    return sub


# ------------------------------------------------------------------------------------------------
# sweeps


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _member_from_spec(spec: Any) -> list[str]:
    if isinstance(spec, str):
        return shlex.split(spec)
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    if isinstance(spec, dict):
        return [f"{k}={_format_value(v)}" for k, v in spec.items()]
    raise LaunchError(f"sweep member {spec!r}: give 'key=value ...', a list of key=value or a mapping")


def sweep_members(sweep: Sequence[str] = (), grid: Sequence[str] = (), sweep_file: str | Path | None = None) -> list[list[str]]:
    """Override lists, one per array member: the ``--sweep`` entries and the file's, each crossed
    with the cartesian product of the ``--grid`` axes (``key=v1,v2``)."""
    import yaml

    entries = [_member_from_spec(s) for s in sweep]
    if sweep_file:
        doc = yaml.safe_load(Path(sweep_file).read_text())
        if isinstance(doc, dict) and "members" in doc:
            doc = doc["members"]
        if not isinstance(doc, list):
            raise LaunchError(f"sweep file {sweep_file}: expected a list of members (or 'members: [...]')")
        entries += [_member_from_spec(s) for s in doc]
    axes = []
    for axis in grid:
        key, sep, values = axis.partition("=")
        if not sep or not key.strip() or not split_top_level(values):
            raise LaunchError(f"--grid {axis!r}: use key=value1,value2,...")
        axes.append([f"{key.strip()}={v}" for v in split_top_level(values)])
    combos = [list(c) for c in itertools.product(*axes)] if axes else [[]]
    members = [e + c for e in (entries or [[]]) for c in combos]
    return [m for m in members if m] if (entries or axes) else []


def _slug(overrides: Sequence[str]) -> str:
    text = "_".join(o for o in overrides if not o.startswith("run_dir="))
    text = re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).replace("=", "-").strip("-.")
    return text[:60] or "run"


def submit_sweep(config: str | Path | None, overrides: Sequence[str], members: Sequence[Sequence[str]],
                 options: JobOptions | None = None, *, mode: str = "slurm", folder: str | Path | None = None,
                 force: bool = False) -> Submission:
    """One job array: member ``i`` trains with ``overrides + members[i]`` in its own run folder,
    ``<run_dir>/<i>_<overrides>`` unless the member sets ``run_dir``."""
    from launch.job import TrainJob
    from ssl_container.config import save_config

    if mode not in MODES:
        raise LaunchError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if len(members) < 1:
        raise LaunchError("a sweep needs at least one member (--sweep, --grid or --sweep-file)")
    root = Path(_resolve(config, overrides).run_dir)
    cfgs, infos = [], []
    for i, member in enumerate(members):
        explicit = any(o.startswith("run_dir=") for o in member)
        default_dir = [f"run_dir={root / f'{i:02d}_{_slug(member)}'}"]
        cfg = _resolve(config, [*overrides, *([] if explicit else default_dir), *member])
        cfgs.append(cfg)
        infos.append({"index": i, "overrides": list(member), "run_dir": cfg.run_dir})
    dirs = [c.run_dir for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise LaunchError(f"sweep members share run folders: {sorted(d for d in dirs if dirs.count(d) > 1)}")
    opts = _train_options(options or JobOptions(), cfgs[0])
    job_folder = Path(folder).resolve() if folder else root / "submitit" / "%j"
    job_name = f"dino-sweep-{root.name}"
    sub = Submission("sweep", mode, job_folder, [Path(d) for d in dirs], members=infos, world_size=opts.world_size)
    for cfg in cfgs:
        sub.notes += _run_folder_notes(cfg, opts.world_size, refuse=mode != "dry-run" and not force,
                                       dry_run=mode == "dry-run" and not force)
    if mode == "dry-run":
        sub.script = _dry_run_script(job_folder, opts, job_name, array_size=len(cfgs))
        return sub
    if not force:
        for cfg in cfgs:
            _check_no_live_job(Path(cfg.run_dir), mode)
    executor = _executor(job_folder, opts, mode, job_name)
    for cfg in cfgs:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir) / "config.yaml")
    jobs = executor.submit_array([TrainJob(c, env=opts.env, max_requeues=opts.max_requeues) for c in cfgs])
    for job, cfg, info in zip(jobs, cfgs, infos):
        info["job_id"] = str(job.job_id)
        _record_submission(Path(cfg.run_dir), job, mode, "sweep", {"member": info["index"], "overrides": info["overrides"]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"config": str(config) if config else None, "overrides": list(overrides),
                                                 "members": infos}, indent=1))
    sub.jobs.extend(jobs)
    return sub


# ------------------------------------------------------------------------------------------------
# evaluation


def _run_dir_of(checkpoint: Path) -> Path | None:
    """A run folder, its checkpoints folder or a step folder -> the run folder (else None)."""
    for p in (checkpoint, *checkpoint.parents[:2]):
        if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file():
            return p
    return None


def submit_eval(module: str, args: Sequence[str] = (), options: JobOptions | None = None, *,
                checkpoint: str | Path | None = None, mode: str = "slurm", folder: str | Path | None = None) -> Submission:
    """Run ``python -m eval.<module> [--weights CHECKPOINT] ARGS`` as a job (``module`` may also be a
    full dotted module name). The eval modules take ``--weights``: a run folder, a step folder or an
    export; their results go next to it unless ``--out`` says otherwise."""
    from launch.job import EvalJob

    if mode not in MODES:
        raise LaunchError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    full = module if "." in module else f"eval.{module}"
    try:
        found = importlib.util.find_spec(full) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise LaunchError(f"no module {full!r}: the evaluations are eval.knn, eval.linear, eval.detection")
    args = [str(a) for a in args]
    record_dir = None
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        if not ckpt.exists():
            raise LaunchError(f"checkpoint {ckpt} does not exist")
        if "--weights" not in args and not any(a.startswith("--weights=") for a in args):
            args = ["--weights", str(ckpt), *args]
        run_dir = _run_dir_of(ckpt)
        record_dir = str(run_dir) if run_dir else None
    opts = options or JobOptions()
    base = Path(record_dir) if record_dir else Path("runs/eval").resolve()
    job_folder = Path(folder).resolve() if folder else base / "submitit" / "%j"
    job_name = f"eval-{full.rsplit('.', 1)[-1]}"
    sub = Submission("eval", mode, job_folder, [Path(record_dir)] if record_dir else [], world_size=opts.world_size,
                     notes=[f"job: python -m {full} {shlex.join(args)}"])
    if mode == "dry-run":
        sub.script = _dry_run_script(job_folder, opts, job_name)
        return sub
    executor = _executor(job_folder, opts, mode, job_name)
    job = executor.submit(EvalJob(full, args, env=opts.env, max_requeues=opts.max_requeues, record_dir=record_dir))
    if record_dir:
        _record_submission(Path(record_dir), job, mode, "eval", {"module": full, "args": args})
    sub.jobs.append(job)
    return sub


# ------------------------------------------------------------------------------------------------
# waiting


def _job_done(job: Any, force: bool) -> bool:
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    return all(t.done(force_check=force) for t in tasks)


def _headline(text: str) -> str:
    """The line that names the error: the last line of the job's traceback (submitit frames it
    between dashed lines), else the last non-empty line."""
    marker = "-" * 22 + "\n"
    if "with trace:" in text and text.count(marker) >= 2:
        text = text.split(marker)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and set(ln.strip()) != {"-"}]
    return lines[-1] if lines else "(no error text)"


def wait(sub: Submission | Sequence[Any], timeout_s: float | None = None, poll_s: float = 2.0,
         on_poll: Callable[[], None] | None = None) -> list[list[Any]]:
    """Wait for every job; return each job's per-task results. Raises :class:`JobFailedError` with the
    jobs' error text (the Python traceback, or the end of stderr when the job died without one) and
    ``TimeoutError`` after ``timeout_s``."""
    jobs = list(sub.jobs if isinstance(sub, Submission) else sub)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_force = time.monotonic()
    for job in jobs:
        while True:
            force = time.monotonic() - last_force > 15  # sacct now and then, not only when submitit feels like it
            if force:
                last_force = time.monotonic()
            if _job_done(job, force):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job.job_id} not finished after {timeout_s:.0f} s (state {job.state}); "
                                   f"logs: {job.paths.stdout.parent}")
            if on_poll is not None:
                on_poll()
            time.sleep(poll_s)
    results, errors = [], []
    for job in jobs:
        exc = job.exception()
        if exc is not None:
            errors.append(f"job {job.job_id} failed: {_headline(str(exc))}\n{exc}")
            results.append(None)
        else:
            results.append(job.results())
    if errors:
        raise JobFailedError("\n\n".join(errors))
    return results


# ------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl-container launch",
        description="Submit DINO training (or a sweep, or an evaluation) to Slurm through submitit; --local runs "
                    "it here, --dry-run prints the sbatch script. The run folder (run_dir) holds the resolved config, "
                    "submitit's logs and the checkpoints; a requeued or resubmitted job resumes from the newest "
                    "checkpoint there.",
        epilog="examples:\n"
               "  ssl-container launch --config configs/container_light_imagenet.yaml --nodes 2 --gpus-per-node 8 \\\n"
               "      --cpus-per-task 10 --mem-gb 0 --partition gpu --time 48:00:00 run_dir=/shared/runs/cl100\n"
               "  ssl-container launch --config configs/imagenette.yaml --grid schedule.lr=2e-4,5e-4 --gpus-per-node 1\n"
               "  ssl-container launch --eval knn --checkpoint /shared/runs/cl100 --gpus-per-node 1 -- \\\n"
               "      --data /datasets/imagenet --train-split train --val-split val\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, as for `ssl-container train`")

    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task per GPU (0: CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=None, help="CPU jobs: tasks per node (default 1)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per task (default for training: data.num_workers + 1)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (0: all of it)")

    g = p.add_argument_group("scheduling")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--exclude", default=None, help="nodes to avoid, e.g. node[01-03]")
    g.add_argument("--time", default="24:00:00", help="time limit: minutes or [D-]HH:MM:SS (default 24:00:00)")
    g.add_argument("--comment", default=None)
    g.add_argument("--job-name", default=None, help="default: dino-<run folder name>")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch gres=gpu:8 --sbatch exclusive (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before srun in the batch script, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--srun-arg", action="append", default=[], metavar="ARG", help="extra srun argument (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable set in every task before the work starts (repeatable)")
    g.add_argument("--python", default=None, help="python command on the nodes (default: this interpreter)")

    g = p.add_argument_group("time-outs and preemption")
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="Slurm sends USR2 this long before the time limit; the job requeues itself (default 120)")
    g.add_argument("--max-requeues", type=int, default=10,
                   help="requeues after preemption / time-out before the job gives up (default 10)")

    g = p.add_argument_group("mode")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--local", action="store_true", help="run here with submitit's local executor, and wait")
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    g.add_argument("--wait", action="store_true", help="wait for the job(s); exit 1 with the job's error on failure")
    g.add_argument("--wait-timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds")
    g.add_argument("--folder", default=None, help="submitit folder (default: RUN/submitit/%%j)")
    g.add_argument("--force", action="store_true", help="submit even if a job of this run folder is still queued")

    g = p.add_argument_group("sweeps (one job array, one run folder per member under run_dir)")
    g.add_argument("--sweep", action="append", default=[], metavar="'K=V K=V'",
                   help="one member's overrides (repeatable)")
    g.add_argument("--grid", action="append", default=[], metavar="K=V1,V2",
                   help="a grid axis; members are the product of the axes (and of --sweep entries)")
    g.add_argument("--sweep-file", default=None, help="YAML list of members (mappings or lists of key=value)")

    g = p.add_argument_group("evaluation jobs (arguments after -- go to the module)")
    g.add_argument("--eval", default=None, metavar="NAME", help="knn | linear | detection (or a module name)")
    g.add_argument("--checkpoint", default=None, help="run folder, step folder or export, passed as --weights")
    return p


def options_from_args(args: argparse.Namespace) -> JobOptions:
    time_arg: str | int = args.time
    opts = JobOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, partition=args.partition, account=args.account,
        qos=args.qos, constraint=args.constraint, exclude=args.exclude, time=time_arg, comment=args.comment,
        signal_delay_s=args.signal_delay_s, job_name=args.job_name, max_requeues=args.max_requeues,
        sbatch=parse_key_values(args.sbatch, "--sbatch"), setup=list(args.setup), srun_args=list(args.srun_arg),
        env={k: str(v) for k, v in parse_key_values(args.env, "--env").items()}, python=args.python,
    )
    opts.validate()
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"not key=value overrides: {' '.join(bad)}")
    mode = "local" if args.local else "dry-run" if args.dry_run else "slurm"
    try:
        opts = options_from_args(args)
        if args.eval:
            if args.overrides or args.config or args.sweep or args.grid or args.sweep_file:
                raise LaunchError("--eval takes the module's arguments after --, not a config or overrides")
            sub = submit_eval(args.eval, extra, opts, checkpoint=args.checkpoint, mode=mode, folder=args.folder)
        else:
            if extra:
                raise LaunchError(f"arguments after -- are for --eval jobs only: {' '.join(extra)}")
            members = sweep_members(args.sweep, args.grid, args.sweep_file)
            if members:
                sub = submit_sweep(args.config, args.overrides, members, opts, mode=mode, folder=args.folder,
                                   force=args.force)
            else:
                sub = submit_train(args.config, args.overrides, opts, mode=mode, folder=args.folder, force=args.force)
    except LaunchError as err:
        print(f"ssl-container launch: {err}", file=sys.stderr)
        return 2
    print(sub.describe(), flush=True)
    if mode == "dry-run" or not (args.wait or mode == "local"):
        return 0
    print("waiting for the job(s) to finish ...", flush=True)
    try:
        results = wait(sub, timeout_s=args.wait_timeout)
    except JobFailedError as err:
        print(f"ssl-container launch: {err}", file=sys.stderr)
        return 1
    except TimeoutError as err:
        print(f"ssl-container launch: {err}", file=sys.stderr)
        return 3
    for job, res in zip(sub.jobs, results):
        first = res[0] if res else None
        print(f"job {job.job_id} finished: {json.dumps(first, default=str) if first is not None else 'ok'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
