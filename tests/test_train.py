"""The DeepSpeed trainer end to end on CPU: real shards, real engine, 1 and 2 gloo processes.

A narrow Container (same code, widths 16-128, one block per stage) and small crops keep each run
to seconds; the mechanics under test (engine, EMA, center, checkpoints, resume) do not depend on
the width.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from ssl_container.trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"
pytestmark = pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(),
                                reason="needs ../shared/data/imagenette (the real shards)")

TINY = [
    f"data.urls=[{SHARDS}/train-{{000000..000009}}.tar]",
    "data.batch_size=4", "data.num_workers=1", "data.crops.global_size=64", "data.crops.local_size=32",
    "data.crops.n_local=2", "data.samples_per_epoch=24", "head.out_dim=256", "head.hidden_dim=128",
    "head.bottleneck_dim=64", "epochs=2", "schedule.warmup_epochs=0", "engine.precision=fp32",
    "logging.tensorboard=false", "model.kwargs={embed_dims: [16,32,64,128], depths: [1,1,1,1]}",
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _faults(**faults):
    """An environment whose Python processes load tests/faults/sitecustomize.py, which injects ``faults``."""
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH")) if p)
    return _env(PYTHONPATH=path, **faults)


def _run(run_dir, *overrides, nproc=1, env=None, check=True, timeout=300):
    args = [f"run_dir={run_dir}", *TINY, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "ssl_container", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "ssl_container.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _free_port():
    from ssl_container.distributed import free_port

    return free_port()


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def _teacher(run_dir, step):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "teacher.safetensors"))


def test_single_process_run_writes_everything(tmp_path):
    run = tmp_path / "run"
    _run(run, "max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=1")
    for name in ("config.yaml", "deepspeed_config.json", "metrics.jsonl", "training_curves.png", "summary.json"):
        assert (run / name).is_file(), name
    ds = json.loads((run / "deepspeed_config.json").read_text())
    # A new run trains with ZeRO-0, whose gradients the trainer averages and clips itself (trainer/flat.py):
    # DeepSpeed is told not to clip, the config says by how much the trainer does.
    assert ds["zero_optimization"]["stage"] == 0 and ds["gradient_clipping"] == 0.0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["engine"]["zero_stage"] == 0 and saved["optim"]["clip_grad"] == 3.0
    assert ds["train_batch_size"] == 4
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "images_per_s", "data_wait", "memory_gib"):
        assert isinstance(records[-1][key], float), key
    # last layer frozen for epoch 0 by lr 0 is not visible in lr (the logged lr is the backbone's);
    # the schedules start where DINO's do
    assert records[0]["wd"] == pytest.approx(0.04) and records[0]["momentum"] == pytest.approx(0.996)
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004"]  # keep_last=1
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["model"]["name"] == "container_light" and meta["head"]["out_dim"] == 256
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ranks_in_sync"]


def test_zero_stage_0_single_process_trains(tmp_path):
    run = tmp_path / "z0"
    _run(run, "max_steps=2", "checkpoint.every_steps=1", "engine.zero_stage=0")
    first, second = _teacher(run, 1), _teacher(run, 2)
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("weight"))
    student1 = load_file(str(run / "checkpoints" / "step_00000001" / "student.safetensors"))
    student2 = load_file(str(run / "checkpoints" / "step_00000002" / "student.safetensors"))
    assert any(not torch.equal(student1[k], student2[k]) for k in student1 if "blocks" in k)


def test_two_processes_resume_exactly_after_kill_during_save(tmp_path):
    """Reference: 2 ranks, 6 steps. Crash run: killed (SIGKILL) in the middle of saving step 4,
    after the files but before the pointer; restarted, it resumes from step 2 and must reproduce
    the reference's per-step losses and final teacher bit for bit."""
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    common = ("max_steps=6", "checkpoint.every_steps=2")
    _run(ref, *common, nproc=2)
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["ranks_in_sync"] and len(summary["student_sha256_per_rank"]) == 2

    proc = _run(crash, *common, nproc=2, env=_faults(TEST_FAULT_KILL_BEFORE_META="4"), check=False)
    assert proc.returncode != 0
    assert (crash / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (crash / "checkpoints" / "step_00000004").is_dir()  # half-written, not pointed to
    _run(crash, *common, nproc=2)
    assert _losses(crash) == _losses(ref)
    assert len(_losses(ref)) == 6
    a, b = _teacher(ref, 6), _teacher(crash, 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(json.loads(line).get("event") == "resume" for line in (crash / "metrics.jsonl").read_text().splitlines())


def test_resume_on_fewer_processes(tmp_path):
    run = tmp_path / "run"
    _run(run, "max_steps=2", "checkpoint.every_steps=2", nproc=2)
    before = _teacher(run, 2)
    _run(run, "max_steps=4", "checkpoint.every_steps=2", nproc=1)
    after = _teacher(run, 4)
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 1


def test_nonfinite_loss_is_skipped_then_stops_with_last_good_state(tmp_path):
    run = tmp_path / "skip"
    _run(run, "max_steps=4", env=_faults(TEST_FAULT_NAN_CALLS="1"))
    records = read_metrics(run / "metrics.jsonl")
    assert records[1]["loss"] == "nan" and records[1]["skipped_steps"] == 1
    assert all(isinstance(r["loss"], float) for i, r in enumerate(records) if i != 1)

    stop = tmp_path / "stop"
    proc = _run(stop, "max_steps=8", "max_nonfinite=3", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                env=_faults(TEST_FAULT_NAN_CALLS="2,3,4"), check=False)
    assert proc.returncode != 0
    assert "3 consecutive non-finite losses" in proc.stderr and "schedule.lr" in proc.stderr
    # the checkpoint written at the stop holds the weights of the last good step (2): skipped
    # steps change neither the teacher nor the student
    good, stopped = _teacher(stop, 2), _teacher(stop, 5)
    for k in good:
        assert torch.equal(good[k], stopped[k]), k
    # The advice works: a lower lr, allowed as a change, resumes from the stop and trains to the end.
    assert "checkpoint.allow_changes=[schedule.lr]" in proc.stderr
    again = _run(stop, "max_steps=8", "max_nonfinite=3", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                 "schedule.lr=1e-5", "checkpoint.allow_changes=[schedule.lr]")
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 8


def test_help_and_config_refusals_answer_without_loading_torch():
    """`python -m ssl_container.train --help` took 5 s and a config refusal 6-8 s: torch (and timm) loaded
    before the arguments were read. The loop is now imported only once the config is good and the
    shards are there (configs/demo.yaml on a fresh clone: one line, no torch)."""
    probe = ("import sys, contextlib, io\n"
             "from ssl_container.train import main\n"
             "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
             "    rc = main(['run_dir=/nonexistent/r', 'optim.lrr=1'])\n"
             "assert rc == 2 and 'optim.lrr' in err.getvalue(), err.getvalue()\n"
             "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
             "    rc = main(['run_dir=/nonexistent/r', 'data.urls=[/nonexistent/train-{000000..000009}.tar]'])\n"
             "assert rc == 2 and '10 of the 10 training shards are missing' in err.getvalue(), err.getvalue()\n"
             "try:\n"
             "    main(['--help'])\n"
             "except SystemExit as e:\n"
             "    assert e.code == 0\n"
             "print(sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_config_error_fails_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssl_container", "train", f"run_dir={tmp_path}/r", "optim.lrr=1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key 'optim.lrr'" in proc.stderr
    assert not (tmp_path / "r").exists()


OVERFIT = r"""
import itertools, sys, torch
from ssl_container.config import load_config
from ssl_container.distributed import init_distributed, resolve_env
from ssl_container.trainer.run import build_run, train_step
cfg = load_config(None, sys.argv[1:])
device = torch.device("cpu")
env = init_distributed(device, resolve_env())
run = build_run(cfg, env, device)  # the trainer's own run and step
torch.manual_seed(0)
crops = [torch.randn(8, 3, 64, 64) for _ in range(2)] + [torch.randn(8, 3, 32, 32) for _ in range(2)]
batches = itertools.repeat({"crops": crops})
losses, kls, used = [], [], []
for step in range(25):
    record = train_step(run, batches).metrics
    losses.append(record["loss"])
    kls.append(record["kl"])
    used.append(record["prototypes_used"])
print(losses[0], min(losses[-5:]), kls[0], min(kls[-5:]), min(used))
"""


def test_loss_falls_when_overfitting_a_fixed_batch(tmp_path):
    # A constant lr of 1e-3 (8 images: 0.032 per 256) and teacher momentum 0.9 over a long schedule.
    fixed = ["data.batch_size=8", "schedule.lr=0.032", "schedule.min_lr=0.001", "schedule.momentum_teacher=0.9", "epochs=1000",
             "schedule.warmup_teacher_temp=0.04", "schedule.teacher_temp=0.04", "schedule.weight_decay=0.0",
             "schedule.weight_decay_end=0.0", f"run_dir={tmp_path / 'run'}", "checkpoint.resume=false"]
    proc = subprocess.run([sys.executable, "-c", OVERFIT, *TINY, *fixed], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last, kl_first, kl_last, min_used = map(float, proc.stdout.split()[-5:])
    assert first > 4.0 and last < 0.6 * first, (first, last)
    # The diagnostics move the right way: the student closes in on the teacher (KL falls) while the
    # teacher keeps spreading the 8 images over several prototypes (no one-hot collapse).
    assert kl_last < 0.5 * kl_first, (kl_first, kl_last)
    assert min_used > 1 / 16, min_used


def test_collapse_diagnostics_logged_and_forced_uniform_collapse_warned(tmp_path):
    run = tmp_path / "run"
    # A teacher temperature of 100 flattens every teacher output: the uniform collapse, forced.
    proc = _run(run, "epochs=4", "max_steps=21", "checkpoint.every_steps=100", "schedule.teacher_temp=100",
                "schedule.warmup_teacher_temp=100")
    records = read_metrics(run / "metrics.jsonl")
    for key in ("teacher_entropy", "kl", "prototypes_used"):
        assert all(isinstance(r[key], float) for r in records), key
    assert records[-1]["teacher_entropy"] > 0.99 * math.log(256)
    assert "collapsing to the uniform distribution" in proc.stderr and "schedule.teacher_temp" in proc.stderr
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [e["step"] for e in events if e["event"] == "collapse_warning"] == [20]


def test_healthy_run_raises_no_collapse_warning(tmp_path):
    run = tmp_path / "run"
    proc = _run(run, "epochs=4", "max_steps=21", "checkpoint.every_steps=100")
    assert "collaps" not in proc.stderr
    records = read_metrics(run / "metrics.jsonl")
    assert max(r["teacher_entropy"] for r in records) < 0.9 * math.log(256)
    assert min(r["prototypes_used"] for r in records) > 1 / 8


def test_online_knn_monitor_logs_at_epoch_ends(tmp_path):
    run = tmp_path / "run"
    _run(run, "epochs=2", "checkpoint.every_steps=100", "monitor.every_epochs=1", "monitor.resize=64",
         "monitor.crop=64", "monitor.max_train_samples=128", f"monitor.train_urls=[{SHARDS}/train-000000.tar]",
         f"monitor.val_urls=[{SHARDS}/val-000000.tar]")
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event": "knn"' in x]
    assert [e["step"] for e in events] == [6, 12]  # 24 images an epoch, batches of 4
    assert all(0.0 < e["top1_k20"] <= e["top5_k20"] <= 1.0 for e in events)
