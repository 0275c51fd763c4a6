"""CUDA-only hazards, checked where a CPU can see them.

* ZeRO-1/2 re-point every parameter into one flat buffer: unpadded, tensors after an odd-sized one
  start off a 16-byte boundary and cuDNN faults on them ("misaligned address" on an H200). After the
  engine is built, every parameter and buffer of student and teacher must be 16-byte aligned.
* A run saved before the alignment change (its flat buffers unpadded) still resumes, exactly.
* An older DeepSpeed that cannot align is refused on CUDA, naming the fix.
* Pinned memory: batches bound for a GPU are page-locked (else ``non_blocking=True`` is a blocking
  copy through a bounce buffer); CPU runs do not pin (it warns and wastes memory there).
* SyncBatchNorm only across several GPU ranks: one GPU keeps plain BatchNorm (SyncBatchNorm's
  single-process path differs in eval and export), CPU ranks keep plain BatchNorm (no CPU kernel).
* The teacher under bf16 autocast hands bf16 logits to the loss: the loss and the center stay float32.
* Device-to-host copies: the step's logged values come back in one blocking copy (``_to_host``), so a
  value is never read before the device wrote it.
* RNG: nothing to save. Every micro-step reseeds all generators (``torch.manual_seed`` seeds CPU and
  every CUDA device) from (seed, step, rank); the exact-resume tests rest on that, on CPU here and on
  the GPU in tests/test_gpu.py. The device multi-crop against the CPU one: tests/test_data_gpu_augment.py.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"

ALIGNMENT = r"""
import json, sys, torch
from ssl_container.config import load_config
from ssl_container.distributed import init_distributed, resolve_env
from ssl_container.trainer.run import build_run
device = torch.device("cpu")
env = init_distributed(device, resolve_env())
out = {}
for stage in (0, 1, 2):
    cfg = load_config(None, [f"engine.zero_stage={stage}", "data.urls=[unused]", "data.samples_per_epoch=1000",
                             f"run_dir={sys.argv[1]}/z{stage}", "checkpoint.resume=false", "logging.tensorboard=false"])
    run = build_run(cfg, env, device)
    tensors = {f"{who}.{n}": t for who, net in (("student", run.engine.module), ("teacher", run.teacher))
               for n, t in net.state_dict(keep_vars=True).items()}
    out[stage] = {"checked": len(tensors), "misaligned": sorted(n for n, t in tensors.items() if t.data_ptr() % 16)}
print(json.dumps(out))
"""


def _env():

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_every_parameter_and_buffer_is_16_byte_aligned_under_each_zero_stage(tmp_path):
    # The default Container-Light: before the fix, 34 of its tensors were misaligned under ZeRO-1 and -2.
    proc = subprocess.run([sys.executable, "-c", ALIGNMENT, str(tmp_path)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in ("0", "1", "2"):
        assert out[stage]["checked"] > 800, out[stage]  # student and teacher, parameters and buffers
        assert out[stage]["misaligned"] == [], (stage, out[stage]["misaligned"][:5])


def test_an_older_deepspeed_is_refused_on_cuda_with_the_fix_named():
    from ssl_container.trainer.engine import _check_deepspeed_version

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.18\.9 packs ZeRO-1 .*deepspeed>=0\.19\.7.*zero_stage=0"):
        _check_deepspeed_version("0.18.9", 1, cuda)
    with pytest.raises(RuntimeError, match="ZeRO-2"):
        _check_deepspeed_version("0.19.6+cu12", 2, cuda)
    for ok in (("0.18.9", 0, cuda), ("0.18.9", 1, cpu), ("0.19.7", 1, cuda), ("0.20.0", 2, cuda), ("1.0", 2, cuda)):
        _check_deepspeed_version(*ok)


UNALIGNED_THEN_ALIGNED = r"""
import sys
import ssl_container.trainer.engine as engine
if sys.argv[1] == "unaligned":  # the configuration DeepSpeed was given before the fix
    build = engine.build_deepspeed_config
    def unaligned(*a, **k):
        ds = build(*a, **k)
        ds["zero_optimization"].pop("parameter_alignment", None)
        return ds
    engine.build_deepspeed_config = unaligned
from ssl_container.train import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette (the real shards)")
def test_a_run_saved_with_unaligned_zero_buffers_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from ssl_container.trainer.metrics import read_metrics

    tiny = [f"data.urls=[{SHARDS}/train-{{000000..000009}}.tar]", "data.batch_size=4", "data.num_workers=1",
            "data.crops.global_size=64", "data.crops.local_size=32", "data.crops.n_local=2",
            "data.samples_per_epoch=24", "head.out_dim=256", "head.hidden_dim=128", "head.bottleneck_dim=64",
            "epochs=2", "schedule.warmup_epochs=0", "engine.precision=fp32", "engine.zero_stage=1",
            "logging.tensorboard=false", "model.kwargs={embed_dims: [16,32,64,128], depths: [1,1,1,1]}"]

    def train(mode, run_dir, *extra):
        proc = subprocess.run([sys.executable, "-c", UNALIGNED_THEN_ALIGNED, mode, f"run_dir={run_dir}", *tiny, *extra],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train("aligned", tmp_path / "straight", "checkpoint.every_steps=6")
    train("unaligned", tmp_path / "old", "max_steps=6", "checkpoint.every_steps=6")
    state = torch.load(tmp_path / "old" / "checkpoints" / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    # The old layout: DeepSpeed >= 0.19.7 records its (all-zero) paddings, older ones record none.
    assert not any(any(group) for group in state.get("param_alignment_paddings", []))
    train("aligned", tmp_path / "old", "checkpoint.every_steps=6")
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "old" / "metrics.jsonl")}
    assert sorted(b) == sorted(a) == list(range(1, 13))
    assert [b[s] for s in range(7, 13)] == [a[s] for s in range(7, 13)]
    x = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000012" / "teacher.safetensors"))
    y = load_file(str(tmp_path / "old" / "checkpoints" / "step_00000012" / "teacher.safetensors"))
    # The first six steps ran in the other buffer layout, where a weight may come out different in its last bits
    # (on an AMD EPYC: one bias element, 2.8e-14, with DeepSpeed 0.19.7 and 0.19.8; most likely a CPU kernel's
    # vector/tail split falling at another offset). Two aligned runs, straight and resumed, agree bit for bit
    # there. A lost or misplaced optimizer state would move the weights by 1e-4 or more.
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-12, msg=lambda m, k=k: f"teacher {k}: {m}")


def test_batches_bound_for_a_gpu_are_pinned_and_cpu_batches_are_not():
    from ssl_container.data import TrainDataConfig, make_train_loader

    def loader(device, **kw):
        cfg = TrainDataConfig(urls=["unused-{0000..0003}.tar"], samples_per_epoch=64, batch_size=8, **kw)
        return make_train_loader(cfg, 0, 1, 0, device=device)

    assert loader("cuda").pin_memory is True
    assert loader(torch.device("cuda", 1)).pin_memory is True
    assert loader("cpu").pin_memory is False
    assert loader(None).pin_memory is False
    assert loader("cuda", pin_memory=False).pin_memory is False  # the config still wins
    assert loader("cpu", pin_memory=True).pin_memory is True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def _sync_bn_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from ssl_container.distributed import maybe_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        # Only the device's type is read: no CUDA call is made, so this runs on a CPU machine.
        kinds = {dev: sorted({type(m).__name__ for m in maybe_sync_batchnorm(_bn_model(), torch.device(dev)).modules()
                              if isinstance(m, nn.modules.batchnorm._BatchNorm)})
                 for dev in ("cuda", "cpu")}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(kinds))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_sync_batchnorm_only_across_several_gpu_ranks(tmp_path, world):
    mp.spawn(_sync_bn_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        kinds = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert kinds["cuda"] == (["SyncBatchNorm"] if world > 1 else ["BatchNorm2d"]), (world, kinds)
        assert kinds["cpu"] == ["BatchNorm2d"]


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_a_bf16_teacher_feeds_a_float32_loss_and_center():
    from ssl_container.dino import DINOLoss
    from ssl_container.trainer.engine import autocast_context

    ctx = autocast_context("bf16", torch.device("cuda"))
    assert (ctx.device, ctx.fast_dtype) == ("cuda", torch.bfloat16)  # the teacher matches the student
    assert autocast_context("bf16", torch.device("cpu"))._enabled is False
    assert autocast_context("fp32", torch.device("cuda"))._enabled is False

    # The same dtype flow on CPU: a teacher head under bf16 autocast returns bf16 logits.
    gen = torch.Generator().manual_seed(0)
    head, k, b = nn.Linear(32, 512), 512, 6
    x_t, student = torch.randn(2 * b, 32, generator=gen), torch.randn(4 * b, k, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t_bf16 = head(x_t)
    assert t_bf16.dtype == torch.bfloat16
    with torch.no_grad():
        t_fp32 = head(x_t)
    losses, centers = {}, {}
    for name, teacher in (("bf16", t_bf16), ("fp32", t_fp32)):
        fn = DINOLoss(k, 4)
        losses[name] = fn(student, teacher, 0.04)
        centers[name] = fn.center
    assert losses["bf16"].dtype == centers["bf16"].dtype == torch.float32
    assert torch.isfinite(losses["bf16"])
    # bf16 keeps 8 bits of mantissa: the sharpened teacher moves the loss by well under 1 %.
    assert abs(losses["bf16"].item() - losses["fp32"].item()) < 1e-2 * abs(losses["fp32"].item())
    torch.testing.assert_close(centers["bf16"], centers["fp32"], atol=2e-2, rtol=0)
