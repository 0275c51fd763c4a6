"""The launcher on a real Slurm cluster: a single-node cluster (munge, MariaDB + slurmdbd, slurmctld,
slurmd) started once for this module from launch/local_slurm/, and real DINO jobs on CPU through
`launch.submit` -- the code path of `ssl-container launch`.

(a) a 2-task job runs to completion; (b) a job signalled as at its time limit mid-run requeues
itself, resumes from its checkpoint and ends with the same teacher weights as the uninterrupted run
of (a); (c) a failing job's error text reaches the submitter; (d) a sweep of 2 configurations runs
as one job array; (e) an evaluation job runs k-NN on the checkpoint of (a).

Select with ``-m slurm``. Skips without the Slurm packages (see launch/local_slurm/__init__.py for the
apt line) or without ../shared/data. Every wait has a timeout; the cluster, and with it every job
still queued, is stopped at the end of the module.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from launch.local_slurm import LocalSlurm, missing_requirements
from launch.options import JobOptions, LaunchError
from launch.submit import JobFailedError, main, submit_eval, submit_sweep, submit_train, wait

pytestmark = [pytest.mark.slurm, pytest.mark.data]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagenette"
STEPS = 8  # with a checkpoint every 2 steps


def tiny(run_dir: Path, max_steps: int = STEPS, urls: str | None = None) -> list[str]:
    """A real but tiny DINO run: Container-Light with 16..128 channels, 64/32-px crops, 2 locals."""
    urls = urls or f"{DATA}/train-{{000000..000009}}.tar"
    return [f"run_dir={run_dir}", f"data.urls=[{urls}]", "data.batch_size=4", "data.num_workers=1",
            "data.crops.global_size=64", "data.crops.local_size=32", "data.crops.n_local=2", "head.out_dim=256",
            "head.hidden_dim=128", "head.bottleneck_dim=64", "epochs=2", "schedule.warmup_epochs=0",
            "engine.precision=fp32", "data.samples_per_epoch=20", "logging.tensorboard=false",
            "model.kwargs={embed_dims: [16,32,64,128], depths: [1,1,1,1]}", f"max_steps={max_steps}",
            "checkpoint.every_steps=2"]


def cpu_options(tasks: int = 2) -> JobOptions:
    # the node has 2 CPUs: one per task, one torch thread per task
    return JobOptions(tasks_per_node=tasks, cpus_per_task=1, time=10, signal_delay_s=60,
                      env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"needs the Imagenette shards in {DATA} (../shared/data)")
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    # not under pytest's basetemp: munged wants every directory above its socket world-executable
    base = Path(tempfile.mkdtemp(prefix="ssl-container-slurm-", dir="/tmp"))
    base.chmod(0o755)
    slurm = LocalSlurm(base)
    env = pytest.MonkeyPatch()
    try:
        slurm.start()
        env.setenv("SLURM_CONF", str(slurm.conf))  # for sbatch / sacct / scontrol, here and in the jobs
        yield slurm
    finally:
        env.undo()
        slurm.stop()  # cancels what is still queued, stops every daemon and job step of this cluster
        shutil.rmtree(base, ignore_errors=True)  # the database alone is ~130 MB


def _logs(sub) -> str:
    parts = []
    for job in sub.jobs:
        for task in range(job.num_tasks):
            path = job.paths.folder / f"{job.job_id}_{task}_log.err"
            if path.is_file():
                parts.append(f"== {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


def _wait(sub, cluster: LocalSlurm, timeout_s: float):
    try:
        return wait(sub, timeout_s=timeout_s)
    except TimeoutError as err:
        for jid in sub.job_ids:
            subprocess.run(["scancel", jid.split("_")[0]], timeout=30)
        pytest.fail(f"{err}\n{_logs(sub)}\n{cluster.logs()}")


def _wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _sacct_states(job_id: str) -> list[tuple[str, str]]:
    """Every allocation record of the job (-D: its requeued runs too)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30, check=True)
    return [tuple(line.split("|")[:2]) for line in out.stdout.splitlines() if line.strip()]


def _starts(run_dir: Path) -> list[dict]:
    lines = (run_dir / "launch.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "start"]


def _teacher(run_dir: Path, step: int = STEPS):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "teacher.safetensors"))


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """(a)'s run, uninterrupted: also the reference weights for (b) and the checkpoint for (e)."""
    run = tmp_path_factory.mktemp("runs") / "a"
    sub = submit_train(None, tiny(run), cpu_options(2))
    results = _wait(sub, cluster, 300)
    return run, sub, results


def test_two_task_job_runs_to_completion(cluster, reference):
    run, sub, results = reference
    job_id = sub.job_ids[0]
    summaries = results[0]
    assert len(summaries) == 2, "one result per task"
    for summary in summaries:
        assert summary["steps"] == STEPS and summary["ranks_in_sync"], summary
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert (run / "config.yaml").is_file() and (run / "submitit" / job_id / f"{job_id}_1_log.out").is_file()
    [start] = _starts(run)
    assert start["world_size"] == 2 and start["requeues"] == 0 and start["job_id"] == job_id
    # sacct works (accounting): submitit and the README's status command rely on it
    states = _wait_until(lambda: [s for s in _sacct_states(job_id) if s[1] == "COMPLETED"], 60, "sacct COMPLETED")
    assert states == [(job_id, "COMPLETED")]


def test_interrupted_job_requeues_resumes_and_matches(cluster, reference, tmp_path):
    """USR2 as Slurm sends it before the time limit: every rank finishes its step and saves, then rank 0's
    checkpoint() returns a fresh submission, submitit requeues the job, and the requeued job resumes
    from the step the warning arrived at."""
    ref_run = reference[0]
    run = tmp_path / "b"
    sub = submit_train(None, tiny(run), cpu_options(2))
    job_id = sub.job_ids[0]
    with pytest.raises(LaunchError, match=f"job {job_id} .* is still using"):  # no second job on one run folder
        submit_train(None, tiny(run), cpu_options(2))
    latest = run / "checkpoints" / "latest"
    _wait_until(lambda: latest.is_file() or not _squeue_state(job_id), 300, "the first checkpoint")
    assert latest.is_file(), f"the job ended before its first checkpoint\n{_logs(sub)}"
    signalled_at = int(latest.read_text().strip().split("_")[1])
    assert signalled_at < STEPS, "the run finished before it could be interrupted"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    # The job requeues itself; Slurm then holds a requeued job for 120 s (BeginTime). Release it now.
    state = _wait_until(lambda: (s := _squeue_state(job_id)).startswith("PENDING") and s or (not s and "gone"), 120,
                        "the job to be requeued")
    assert state != "gone", f"the job ended instead of requeueing\n{_logs(sub)}"
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    results = _wait(sub, cluster, 300)

    for summary in results[0]:
        assert summary["steps"] == STEPS and summary["ranks_in_sync"], summary
    starts = _starts(run)
    assert [s["requeues"] for s in starts] == [0, 1] and {s["job_id"] for s in starts} == {job_id}
    assert ("REQUEUED" in {s for _, s in _sacct_states(job_id)}), _sacct_states(job_id)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    resumed = [e["step"] for e in events if e.get("event") == "resume"]
    [stopped] = [e["step"] for e in events if e.get("event") == "stopped"]  # saved at the warning, then requeued
    assert len(resumed) == 1 and signalled_at <= stopped == resumed[0] < STEPS, (stopped, resumed)

    from ssl_container.trainer.metrics import read_metrics

    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, STEPS + 1))
    import torch

    ours, ref = _teacher(run), _teacher(ref_run)
    assert ours.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not different, f"teacher weights differ from the uninterrupted run in {different[:5]}"


def test_scancel_term_to_every_task_saves_and_the_restarted_job_resumes(cluster, reference, tmp_path):
    """A preemption without grace time or `scancel --signal=TERM JOB`: SIGTERM to every task and its
    loader worker. submitit ignored it ("Bypassing signal SIGTERM") and the steps since the last save
    were lost at the SIGKILL; now every rank finishes its step, saves and stops, the submitter reads
    one line, and the job started again resumes from that step (exactness against an uninterrupted
    run is the USR2 test's and test_stop_signals'; this run is long enough to be caught mid-way).
    (Not `--full`: srun turns a SIGTERM it receives itself into SIGKILL of its tasks at once, see
    the README's Slurm section.)"""
    run = tmp_path / "t"
    no_periodic = "checkpoint.every_steps=1000"  # the checkpoint found later can only be the stop's own
    sub = submit_train(None, [*tiny(run, 400), "epochs=100", no_periodic], cpu_options(2))
    job_id = sub.job_ids[0]
    metrics = run / "metrics.jsonl"
    _wait_until(lambda: metrics.is_file() and metrics.read_text().count('"loss"') >= 2, 300, "two logged steps")
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
    _wait_until(lambda: not _squeue_state(job_id), 120, "the signalled job to end")
    logs = _logs(sub)
    assert "Bypassing signal SIGTERM" not in logs and "killed by signal" not in logs, logs
    stop_events = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"stopped"' in ln]
    assert len(stop_events) == 1, logs
    stopped_at = stop_events[0]["step"]
    assert 2 <= stopped_at < 400 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    with pytest.raises(JobFailedError, match=f"stopped by SIGTERM after step {stopped_at}: checkpoint saved"):
        wait(sub, timeout_s=60)

    again = submit_train(None, [*tiny(run, stopped_at + 2), "epochs=100", no_periodic], cpu_options(2))
    for summary in _wait(again, cluster, 300)[0]:
        assert summary["steps"] == stopped_at + 2 and summary["ranks_in_sync"], summary
    events = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"event"' in ln]
    assert [e["step"] for e in events if e["event"] == "resume"] == [stopped_at]
    from ssl_container.trainer.metrics import read_metrics

    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, stopped_at + 3)), steps


def test_failing_job_surfaces_its_error_to_the_submitter(cluster, tmp_path, capsys):
    run = tmp_path / "c"
    argv = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--env", "OMP_NUM_THREADS=1",
            "--wait", "--wait-timeout", "300", *tiny(run, 2, urls="/nonexistent/train-{000000..000009}.tar")]
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 1, out.out + out.err
    assert "submitted Slurm job" in out.out
    headline = out.err.splitlines()[0]
    assert "failed" in headline and "/nonexistent/train-000000.tar" in headline, out.err
    assert "Traceback" in out.err  # the job's own traceback, not just a state
    job_id = [r for r in map(json.loads, (run / "launch.jsonl").read_text().splitlines())][0]["job_id"]
    _wait_until(lambda: not _squeue_state(job_id), 60, "the failed job to leave the queue")


def test_sweep_runs_as_one_job_array(cluster, tmp_path):
    root = tmp_path / "d"
    sub = submit_sweep(None, tiny(root, 2), [["seed=0"], ["seed=1"]], cpu_options(1))
    results = _wait(sub, cluster, 300)
    array_ids = {jid.split("_")[0] for jid in sub.job_ids}
    assert len(array_ids) == 1 and sorted(jid.split("_")[1] for jid in sub.job_ids) == ["0", "1"], sub.job_ids
    [array_id] = array_ids
    run_dirs = [Path(m["run_dir"]) for m in json.loads((root / "sweep.json").read_text())["members"]]
    assert [r[0]["run_dir"] for r in results] == [str(d) for d in run_dirs]
    assert all(r[0]["steps"] == 2 for r in results)
    import torch

    t0, t1 = _teacher(run_dirs[0], 2), _teacher(run_dirs[1], 2)
    assert not all(torch.equal(t0[k], t1[k]) for k in t0), "two seeds, two different runs"
    states = _wait_until(lambda: (s := _sacct_states(array_id)) and all(st == "COMPLETED" for _, st in s) and s,
                         60, "sacct to show the array completed")
    assert sorted(j for j, _ in states) == [f"{array_id}_0", f"{array_id}_1"]


def test_eval_job_runs_against_a_checkpoint(cluster, reference, tmp_path):
    run = reference[0]
    out = tmp_path / "knn"
    args = ["--train-shards", f"{DATA}/train-000000.tar", "--val-shards", f"{DATA}/val-000000.tar", "--resize", "64",
            "--crop", "64", "--batch-size", "64", "--num-workers", "1", "--gpu", "no", "--no-cache", "--ks", "10", "20",
            "--threads", "1", "--out", str(out)]
    sub = submit_eval("knn", args, cpu_options(1), checkpoint=run)
    try:
        [[result]] = _wait(sub, cluster, 300)
    except JobFailedError as err:
        pytest.fail(f"eval.knn failed in the job:\n{err}")
    assert result["returncode"] == 0 and result["module"] == "eval.knn"
    assert result["args"][:2] == ["--weights", str(run)]
    doc = json.loads((out / "knn.json").read_text())
    assert doc["eval"] == "knn"
    assert [r for r in _starts(run) if r["kind"] == "eval"], "the eval job is recorded in the run folder"
