"""The trainer's step after its bookkeeping moved to flat storage trains exactly as before.

The fixtures hold 20 steps' losses and the final teacher and centre of the step as it was before
(tests/step_reference.py, commit 2006469), per ZeRO stage. Differences allowed are rounding: under
ZeRO-0 the gradient norm is now one reduction over a flat buffer instead of a norm of per-tensor
norms, which changes the clipping scale in its last bits; ZeRO-1/2 clip in DeepSpeed as before.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_container.distributed import free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCRIPT = Path(__file__).resolve().parent / "step_reference.py"


def _steps(tmp_path: Path, zero_stage: int, nproc: int = 1, steps: int = 20) -> dict[str, torch.Tensor]:
    """The script in its own process(es): DeepSpeed keeps process-wide state between engines."""
    out = tmp_path / f"zero{zero_stage}_{nproc}.safetensors"
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    proc = subprocess.run([sys.executable, *(launch if nproc > 1 else []), str(SCRIPT), "--zero-stage", str(zero_stage),
                           "--out", str(out), "--steps", str(steps), "--run-dir", str(tmp_path / f"run{zero_stage}")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_twenty_steps_match_the_step_before_flat_storage(tmp_path, zero_stage):
    ref = load_file(FIXTURES / f"step_reference_zero{zero_stage}.safetensors")
    now = _steps(tmp_path, zero_stage)
    assert set(now) == set(ref)
    torch.testing.assert_close(now["losses"], ref["losses"], rtol=1e-6, atol=0)
    assert now["losses"][-1] < now["losses"][0]  # the fixture is a run that learns, not a constant
    for key in ref:
        if key.startswith("teacher.") and ref[key].is_floating_point():
            torch.testing.assert_close(now[key], ref[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
        elif key.startswith("teacher."):
            assert torch.equal(now[key], ref[key]), key  # BatchNorm's num_batches_tracked
    torch.testing.assert_close(now["center"], ref["center"], rtol=0, atol=1e-7)


def test_two_processes_zero0_flat_all_reduce_matches_deepspeed_zero1(tmp_path):
    """Two gloo ranks with different crops: the trainer's own gradient average (ZeRO-0) trains the
    teacher as DeepSpeed's ZeRO-1 reduce-scatter does."""
    out = {stage: _steps(tmp_path, stage, nproc=2, steps=5) for stage in (0, 1)}
    single = load_file(FIXTURES / "step_reference_zero0.safetensors")
    torch.testing.assert_close(out[0]["losses"], out[1]["losses"], rtol=1e-5, atol=0)
    # The first step sees rank 0's crops in both runs: the same loss as one process.
    torch.testing.assert_close(out[0]["losses"][0], single["losses"][0], rtol=1e-6, atol=0)
    moved = max((out[0][k] - single[k]).abs().max().item() for k in single
                if k.startswith("teacher.") and single[k].is_floating_point() and single[k].numel() > 1)
    assert moved > 0  # the other rank's gradients reached this rank's teacher
    for key in out[0]:
        if key.startswith("teacher.") and out[0][key].is_floating_point():
            torch.testing.assert_close(out[0][key], out[1][key], rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")
