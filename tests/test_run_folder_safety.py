"""Nothing in a run folder is lost: fresh starts over checkpoints, refused resumes, damaged
checkpoints, signals, a full disk. Real trainer runs (the tiny config of test_train)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_container.trainer.metrics import read_metrics
from test_train import REPO, SHARDS, TINY, _env, _losses, _run, _teacher  # noqa: F401  (skip marker too)
from test_train import pytestmark  # noqa: F401

STEPS = ("max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5")


def _refusal(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("ssl-container train:")]


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_fresh_start_over_checkpoints_refuses_and_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "r1"
    _run(run, *STEPS)
    before = _steps(run)
    config_before = (run / "config.yaml").read_text()
    proc = _run(run, "max_steps=2", "checkpoint.resume=false", check=False)
    assert proc.returncode == 2 and len(_refusal(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint.resume=false" in proc.stderr and "checkpoint.overwrite=true" in proc.stderr
    assert _steps(run) == before and (run / "config.yaml").read_text() == config_before  # untouched
    _run(run, "max_steps=2", "checkpoint.resume=false", "checkpoint.overwrite=true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r1.replaced-")]
    assert len(aside) == 1 and _steps(aside[0]) == before  # the old run, whole
    assert _steps(run) == ["step_00000002"] and sorted(_losses(run)) == [1, 2]  # one run per folder


def test_missing_latest_resumes_from_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "r"
    _run(run, *STEPS)
    (run / "checkpoints" / "latest").unlink()
    proc = _run(run, "max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    assert "no usable 'latest'" in proc.stderr
    assert _steps(run) == [f"step_{i:08d}" for i in (2, 4, 6, 8)]  # nothing was pruned or restarted
    assert sorted(_losses(run)) == list(range(1, 9))


def test_refused_resume_rewrites_nothing(tmp_path):
    run = tmp_path / "r"
    _run(run, "max_steps=2", "checkpoint.every_steps=2")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _run(run, "max_steps=4", "head.out_dim=128", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = _refusal(proc)
    assert "out_dim" in line and "new run_dir" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("damage", ["truncate-teacher", "truncate-deepspeed", "garbage-latest"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run(ref, "max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    _run(run, "max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    newest = run / "checkpoints" / "step_00000004"
    if damage == "truncate-teacher":
        victim = newest / "teacher.safetensors"
        victim.write_bytes(victim.read_bytes()[:1000])
    elif damage == "truncate-deepspeed":
        victim = next(newest.glob("mp_rank_*_model_states.pt"))
        victim.write_bytes(victim.read_bytes()[:5000])
    else:
        (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    proc = _run(run, "max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
    if damage != "garbage-latest":
        assert "step_00000004 is damaged" in proc.stderr and victim.name in proc.stderr
        assert "resuming from step_00000002" in proc.stderr
    # resumed from an intact checkpoint: the same per-step losses and teacher as one clean run
    assert _losses(run) == _losses(ref)
    a, b = _teacher(ref, 6), _teacher(run, 6)
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, signum):
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ("max_steps=10", "checkpoint.every_steps=100")
    _run(ref, *common)
    cmd = [sys.executable, "-m", "ssl_container", "train", f"run_dir={run}", *TINY, *common]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("ssl-container train: stopped by")]
    assert len(line) == 1 and "checkpoint saved in" in line[0]
    stopped_at = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "meta.json")
                            .read_text())["step"]
    assert 3 <= stopped_at < 10
    _run(run, *common)
    assert _losses(run) == _losses(ref)


# A tiny-model checkpoint is ~7.7 MB (ZeRO-0, the default). 20 MB: two fit, the third fails the room check
# before it writes anything; 5 MB: the first one runs out of space in the middle of being written.
@pytest.mark.parametrize("size, message", [("20m", "not enough disk space"), ("5m", "GiB free on its disk")])
def test_full_disk_never_leaves_a_partial_checkpoint(tmp_path, size, message):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root in a machine that allows mounts)")
    try:
        run = mnt / "r"
        proc = _run(run, "max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=10", check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        steps = _steps(run) if (run / "checkpoints").is_dir() else []
        assert all((run / "checkpoints" / s / "meta.json").is_file() for s in steps)  # none partial
        assert len(steps) == (2 if size == "20m" else 0)
        assert not [p for p in run.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_keep_last_1_on_a_disk_that_holds_two_checkpoints_trains_to_the_end(tmp_path):
    """The disk-full advice ("lower checkpoint.keep_last") must be true: older checkpoints that keep_last
    lets go are pruned before the room check, so a disk that holds two checkpoints suffices for keep_last=1
    (the newest intact one stays until the new one is complete)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root in a machine that allows mounts)")
    try:
        run = mnt / "r"
        proc = _run(run, "max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep_last=1", check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _steps(run) == ["step_00000008"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_changed_config_on_resume_lists_the_changes_and_refuses_state_keys(tmp_path):
    run = tmp_path / "r"
    _run(run, "max_steps=2", "checkpoint.every_steps=2")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _run(run, "max_steps=4", "data.batch_size=8", check=False)
    assert proc.returncode != 0
    assert "would change data.batch_size" in proc.stderr and "checkpoint.allow_changes=[data.batch_size]" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # refused before any write
    # a change that reinterprets nothing is listed and goes ahead
    proc = _run(run, "max_steps=4", "checkpoint.every_steps=2", "logging.every_steps=1")
    assert "changed config: logging.every_steps: 10 -> 1; max_steps: 2 -> 4" in proc.stderr
    assert sorted(_losses(run)) == [1, 2, 3, 4]


_NEXT_KEYS = r"""
import json, sys, torch
from ssl_container.config import load_config
from ssl_container.distributed import cleanup, init_distributed, resolve_env
from ssl_container.trainer.run import build_run
cfg = load_config(None, sys.argv[1:])
device = torch.device("cpu")
run = build_run(cfg, init_distributed(device, resolve_env()), device)  # resumes the run folder
loader = run.loader()  # what the trainer would read next
print(json.dumps(next(iter(loader))["keys"]))
cleanup()
"""


def _next_keys(run_dir, *overrides) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _NEXT_KEYS, f"run_dir={run_dir}", *TINY, *overrides], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stream_order(overrides, n) -> list[str]:
    from dataclasses import replace

    from ssl_container.config import load_config
    from ssl_container.data import make_train_loader
    from ssl_container.trainer.run import data_config

    cfg = replace(data_config(load_config(None, overrides)), batch_size=1, samples_per_epoch=n)
    return [b["keys"][0] for b in make_train_loader(cfg, 0, 1, epoch=0)]


def test_allowed_batch_change_carries_schedules_and_data_position_over(tmp_path):
    """3 steps of batch 4 (of 6 an epoch of 24 samples), then batch 5 with checkpoint.allow_changes: 12
    samples are left, 2 steps of 5 in an epoch of 4, so the run goes on at the schedules' step 2 (shift 1;
    8 schedule steps end at step 9) with the single data stream at sample 12 (not 2 x 5 = 10)."""
    common = ("logging.every_steps=1", "checkpoint.every_steps=3")
    changed = ("data.batch_size=5", "checkpoint.allow_changes=[data.batch_size]")
    a, b, fresh = tmp_path / "a", tmp_path / "b", tmp_path / "fresh"
    for run in (a, b):
        _run(run, "max_steps=3", *common)
    # a changed start that saves nothing (here: nothing left to do; in life a crash or a requeue) rewrites
    # config.yaml, but the checkpoint's own config stays the reference: the next start still carries over
    _run(a, "max_steps=3", *common, *changed)
    proc = _run(a, *common, *changed)
    assert "samples per step 4 -> 5 (checkpoint.allow_changes): step 3 goes on at the schedules' step 2" in proc.stderr
    assert json.loads((a / "summary.json").read_text())["steps"] == 9
    meta = json.loads((a / "checkpoints" / "step_00000009" / "meta.json").read_text())
    assert meta["train_state"]["schedule_shift"] == 1 and meta["epoch"] == 2
    assert meta["train_state"]["data_base"] == {"epoch": 0, "step": 2, "positions": [12]}
    # the schedules: as a batch-5 run from scratch at the same point (its step 3 = schedule step 2)
    _run(fresh, "max_steps=4", *common, "data.batch_size=5")
    ref = {r["step"]: r for r in read_metrics(fresh / "metrics.jsonl")}
    rows = {r["step"]: r for r in read_metrics(a / "metrics.jsonl")}
    for key in ("lr", "wd", "momentum", "teacher_temp", "epoch"):
        assert rows[4][key] == pytest.approx(ref[3][key], rel=1e-9), key
        assert rows[5][key] == pytest.approx(ref[4][key], rel=1e-9), key
    # stopped mid-epoch after the change (step 4 = schedule step 3 of epoch 0's 4, the stream then at
    # 12 + 5 = 17) and resumed: the same steps as the uninterrupted changed run
    _run(b, "max_steps=4", *common, *changed)
    files = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    proc = _run(b, *common, *changed, "data.num_workers=2", check=False)  # other streams before the epoch ends
    assert proc.returncode != 0 and "resume with data.num_workers=1 and 1 rank(s)" in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == files  # refused before any write
    order = _stream_order([*TINY, "data.samples_per_epoch=24"], 24)  # the stream's raw order, one sample a batch
    assert _next_keys(b, *common, *changed) == order[17:22]
    _run(b, *common, *changed)
    assert _losses(b) == _losses(a) and sorted(_losses(a)) == list(range(1, 10))
    assert all(torch.equal(x, _teacher(b, 9)[k]) for k, x in _teacher(a, 9).items())


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun puts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _kill_all(pid: int) -> None:
    """SIGKILL every process group of the tree, the ranks first (as a cgroup kill does, all at once)."""
    groups = []
    for p in reversed(_tree(pid)):
        try:
            groups.append(os.getpgid(p))
        except ProcessLookupError:
            pass
    for group in dict.fromkeys(groups):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_kill_9_at_ten_random_points_of_a_two_process_run_loses_nothing(tmp_path):
    """A 2-rank run checkpointing every step, SIGKILLed (every process of it) at 10 random moments
    (0-0.3 s after one of its next 1-3 checkpoints: in steps and in saves), restarted each time: the per-step losses
    and the final teacher are those of an uninterrupted run."""
    import random

    from test_train import _free_port

    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ("epochs=7", "max_steps=40", "checkpoint.every_steps=1", "checkpoint.keep_last=2")  # 6 steps an epoch
    _run(ref, *common, nproc=2)
    latest = run / "checkpoints" / "latest"

    def saved() -> int:  # the step of the newest checkpoint (one per step)
        try:
            return int(latest.read_text().strip().split("_")[1])
        except (OSError, IndexError, ValueError):
            return 0

    rng = random.Random(0)
    kills = 0
    while kills < 10 and not (run / "summary.json").is_file():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "ssl_container.train", f"run_dir={run}", *TINY, *common]
        target = saved() + rng.randint(1, 3)  # a random step of this attempt, then a random moment after it
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 180
        while proc.poll() is None and saved() < target and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 10
    _run(run, *common, nproc=2)  # the last restart runs to the end
    assert _losses(run) == _losses(ref)
    a, b = _teacher(ref, 40), _teacher(run, 40)
    assert all((a[k] == b[k]).all() for k in a)


def test_carried_position_for_other_epoch_lengths_and_at_boundaries():
    """The same carry-over, worked out by hand for an epoch-length change, an epoch that became shorter
    than what was read, a change at an epoch boundary, and a refused change of the streams."""
    from ssl_container.trainer.checkpoint import CheckpointError, TrainState
    from ssl_container.config import load_config
    from ssl_container.trainer.resume import carry_position

    old = load_config(None, TINY)  # batch 4, 24 samples an epoch: 6 steps, one stream

    def carry(step, *changes, iters):
        state = TrainState(step=step)
        carry_position(state, old, load_config(None, [*TINY, *changes]), iters, 1, 1)
        return state.schedule_shift, state.data_base

    # 12 samples read of 48 now: 36 left = 9 steps of 4, so step 3 of 12, the stream at 12
    assert carry(3, "data.samples_per_epoch=48", iters=12) == (0, {"epoch": 0, "step": 3, "positions": [12]})
    # 12 read of an epoch now 8 long: the epoch is over, schedule step 2 = the start of epoch 1
    assert carry(3, "data.samples_per_epoch=8", iters=2) == (1, {"epoch": 0, "step": 2, "positions": [12]})
    # at an epoch boundary (step 6 = epoch 1) nothing is carried but the epoch: batch 2 -> schedule step 12
    assert carry(6, "data.batch_size=2", iters=12) == (-6, None)
    assert carry(6, "data.batch_size=2", "data.num_workers=2", iters=12) == (-6, None)  # streams may change there
    with pytest.raises(CheckpointError, match="keep data.num_workers=1"):
        carry(3, "data.batch_size=2", "data.num_workers=2", iters=12)


@pytest.mark.parametrize("case", ["crop", "model", "missing-shards", "read-only"])
def test_a_refusal_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    """Each refusal names the problem and the fix in one line (no rank-prefixed traceback), exits 2,
    and leaves no run folder behind (a missing shard used to leave config.yaml, deepspeed_config.json
    and metrics.jsonl)."""
    run, extra, expected = tmp_path / "r", [], ""
    if case == "crop":
        extra, expected = ["data.crops.global_size=70"], "data.crops.global_size=70 (e.g. data.crops.global_size=64)"
    elif case == "model":
        extra, expected = ["model.name=container_huge"], "model.name=container_huge: "
    elif case == "missing-shards":
        extra, expected = [f"data.urls=[{tmp_path}/gone-{{000000..000003}}.tar]"], "4 of the 4 training shards are missing"
    else:
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs here (needs root in a machine that allows mounts)")
        run, expected = mnt / "r", f"cannot write in the run folder {mnt / 'r'}"
    try:
        proc = _run(run, "max_steps=2", *extra, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "[rank0]" not in proc.stderr, proc.stderr[-3000:]
        [line] = _refusal(proc)
        assert expected in line, line
        assert not run.exists()
    finally:
        if case == "read-only":
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)


def test_ranks_orphaned_by_a_killed_torchrun_save_and_stop_so_a_restart_is_not_locked_out(tmp_path):
    """``kill -9`` of torchrun alone: its ranks (each in a session of its own) must not train on as
    orphans holding the run folder; they stop at a step boundary with a checkpoint, and a restart
    continues from it."""
    from test_train import _free_port

    run = tmp_path / "run"
    common = ("epochs=7", "max_steps=40", "checkpoint.every_steps=100")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "ssl_container.train", f"run_dir={run}", *TINY, *common]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.is_file() and len(read_metrics(metrics)) >= 2):
        time.sleep(0.1)
    ranks = _tree(proc.pid)[1:]
    assert len(ranks) >= 2, "the ranks never started"
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in ranks):
        time.sleep(0.1)
    left = [p for p in ranks if Path(f"/proc/{p}").exists()]
    for p in left:  # do not leave them behind when the assertion below fails
        os.kill(p, signal.SIGKILL)
    assert not left, "the ranks trained on after torchrun was killed"
    assert not (run / "summary.json").exists()
    step = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "meta.json")
                      .read_text())["step"]
    assert 2 <= step < 40
    assert not (run / ".lock").exists()
    _run(run, *common, nproc=2)
    assert sorted(_losses(run)) == list(range(1, 41))
