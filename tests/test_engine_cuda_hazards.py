"""CUDA-only hazards, checked where a CPU can see them.

* ZeRO-1/2 re-point every parameter into one flat buffer: unpadded, tensors after an odd-sized one
  start off a 16-byte boundary and cuDNN faults on them ("misaligned address" on an H200). After the
  engine is built, every parameter and buffer of student and teacher must be 16-byte aligned.
* A run saved before the alignment change (its flat buffers unpadded) still resumes, exactly.
* An older DeepSpeed that cannot align is refused on CUDA, naming the fix.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"

ALIGNMENT = r"""
import json, sys, torch
from ssl_container.config import load_config
from ssl_container.distributed import init_distributed, resolve_env
from ssl_container.run import build_run
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
    import os

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
    from ssl_container.engine import _check_deepspeed_version

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.18\.9 packs ZeRO-1 .*deepspeed>=0\.19\.7.*zero_stage=0"):
        _check_deepspeed_version("0.18.9", 1, cuda)
    with pytest.raises(RuntimeError, match="ZeRO-2"):
        _check_deepspeed_version("0.19.6+cu12", 2, cuda)
    for ok in (("0.18.9", 0, cuda), ("0.18.9", 1, cpu), ("0.19.7", 1, cuda), ("0.20.0", 2, cuda), ("1.0", 2, cuda)):
        _check_deepspeed_version(*ok)


UNALIGNED_THEN_ALIGNED = r"""
import sys
import ssl_container.engine as engine
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

    from ssl_container.metrics import read_metrics

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
    for name in ("teacher",):
        x = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000012" / f"{name}.safetensors"))
        y = load_file(str(tmp_path / "old" / "checkpoints" / "step_00000012" / f"{name}.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x)
