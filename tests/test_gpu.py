"""The GPU path on a real CUDA device (pytest -m gpu; each test skips with the reason where there is none).

bf16 steps under every ZeRO stage with every tensor 16-byte aligned, a stop and resume on the GPU,
the device multi-crop against the CPU one, and an export loaded by timm giving the trainer's outputs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the gpu tests)")]
needs_data = pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette")

SMALL = ["model.kwargs={embed_dims: [32,64,128,256], depths: [1,1,2,1]}", "head.out_dim=1024", "head.hidden_dim=256",
         "head.bottleneck_dim=64", "data.crops.global_size=64", "data.crops.local_size=32", "data.crops.n_local=2",
         "engine.device=cuda", "engine.precision=bf16", "logging.tensorboard=false"]

STEPS = r"""
import itertools, json, sys, torch
from ssl_container.config import load_config
from ssl_container.distributed import init_distributed, resolve_env
from ssl_container.trainer.run import build_run, train_step
cfg = load_config(None, sys.argv[1:])
device = torch.device("cuda")
env = init_distributed(device, resolve_env())
run = build_run(cfg, env, device)
misaligned = [n for net in (run.engine.module, run.teacher) for n, t in net.state_dict(keep_vars=True).items()
              if t.data_ptr() % 16]
torch.manual_seed(0)
crops = [torch.randn(16, 3, 64, 64) for _ in range(2)] + [torch.randn(16, 3, 32, 32) for _ in range(2)]
batches = itertools.repeat({"crops": crops})
losses = [train_step(run, batches).metrics["loss"] for _ in range(15)]
print(json.dumps({"losses": losses, "misaligned": misaligned, "precision": run.precision}))
"""


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_bf16_steps_under_each_zero_stage_are_aligned_finite_and_learn(tmp_path, zero_stage):
    import json

    args = [*SMALL, f"engine.zero_stage={zero_stage}", "data.urls=[unused]", "data.samples_per_epoch=100000",
            "data.batch_size=16", "schedule.lr=0.064", "schedule.warmup_epochs=0", "schedule.momentum_teacher=0.9",
            "schedule.warmup_teacher_temp=0.04", "schedule.teacher_temp=0.04", "epochs=100",
            f"run_dir={tmp_path / 'run'}", "checkpoint.resume=false"]
    proc = subprocess.run([sys.executable, "-c", STEPS, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["misaligned"] == [] and out["precision"] == "bf16"
    losses = out["losses"]
    assert all(np.isfinite(losses)), losses
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def _train(run_dir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "ssl_container.train", f"run_dir={run_dir}", *SMALL,
           f"data.urls=[{SHARDS}/train-{{000000..000001}}.tar]", "data.batch_size=16", "data.num_workers=2",
           "data.samples_per_epoch=160", "epochs=2", "schedule.warmup_epochs=0", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@needs_data
def test_stop_and_resume_on_the_gpu_gives_the_same_losses(tmp_path):
    from ssl_container.trainer.metrics import read_metrics

    _train(tmp_path / "straight", "max_steps=12", "checkpoint.every_steps=100")
    _train(tmp_path / "resumed", "max_steps=6", "checkpoint.every_steps=6")
    _train(tmp_path / "resumed", "max_steps=12", "checkpoint.every_steps=100")
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    assert sorted(b) == list(range(1, 13))
    # cuDNN's convolution backward may sum in another order from run to run: equal to bf16 rounding.
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a[step], b[step])


def test_device_multicrop_on_cuda_matches_the_cpu_one():
    from shard_fixtures import real_jpegs, synthetic_jpeg

    from ssl_container.data.augment import MultiCropConfig, decode_for_crops
    from ssl_container.data.gpu_augment import GpuMultiCrop

    real = real_jpegs(24)
    jpegs = [b for _, b, _ in real] if real else [synthetic_jpeg(np.random.default_rng(i), 64, 80) for i in range(24)]
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=4)
    arrays, params = zip(*(decode_for_crops(b, np.random.default_rng(s), cfg) for s, b in enumerate(jpegs)))
    cpu = GpuMultiCrop(cfg, torch.device("cpu"))(list(arrays), list(params))
    cuda = GpuMultiCrop(cfg, torch.device("cuda"))(list(arrays), list(params))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda and a.shape == b.shape
        # The same parameters, the same arithmetic: only float rounding (and resampling) differs.
        assert (a - b.cpu()).abs().mean() < 1e-3, (a - b.cpu()).abs().max()


@needs_data
def test_export_loaded_by_timm_gives_the_teachers_outputs_on_cuda(tmp_path):
    import timm

    import ssl_container  # noqa: F401  (registers the models with timm)
    from ssl_container.export import export, load_backbone

    _train(tmp_path / "run", "max_steps=4", "checkpoint.every_steps=4")
    out = export(tmp_path / "run", tmp_path / "export")
    mine = load_backbone(tmp_path / "run").cuda().eval()
    kwargs = dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 2, 1])
    model = timm.create_model("container_light", pretrained=True, num_classes=0, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors"))).cuda().eval()
    x = torch.randn(4, 3, 96, 128, device="cuda")
    with torch.no_grad():
        assert torch.equal(model(x), mine(x))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.allclose(model(x).float(), mine(x).float(), atol=0, rtol=0)
