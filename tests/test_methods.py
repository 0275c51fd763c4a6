"""Methods as modules (ssl_container/methods): DINO through the generic step, and distillation from a frozen
pretrained backbone trained, resumed, exported and refused through the same trainer.

Runs are real (DeepSpeed engine, real shards, a narrow Container); the fixture ``run_before_methods`` is a
2-step run saved by the trainer before methods were modules (commit 948472f), resumed here by today's.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_container.trainer.metrics import read_metrics
from test_train import TINY

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"
FIXTURE = REPO / "tests" / "fixtures" / "run_before_methods"
needs_shards = pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(),
                                  reason="needs ../shared/data/imagenette (the real shards)")

# The fixture's recipe: test_train's, with a Container of widths 8-64 and a smaller head (the committed
# checkpoint stays under 2 MB).
_SMALLER = {"head.out_dim=256": "head.out_dim=64", "head.hidden_dim=128": "head.hidden_dim=32",
            "head.bottleneck_dim=64": "head.bottleneck_dim=16",
            "model.kwargs={embed_dims: [16,32,64,128], depths: [1,1,1,1]}":
                "model.kwargs={embed_dims: [8,16,32,64], depths: [1,1,1,1]}"}
SMALL = [_SMALLER.get(x, x) for x in TINY]
assert len(set(SMALL) - set(TINY)) == len(_SMALLER)


def _run(run_dir, *overrides, check=True):
    from test_train import _env

    proc = subprocess.run([sys.executable, "-m", "ssl_container", "train", f"run_dir={run_dir}", *SMALL, *overrides],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _metrics(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def _checkpoint(run_dir, step, name):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors"))


@needs_shards
def test_a_run_saved_before_methods_were_modules_resumes_exactly(tmp_path):
    """The checkpoint layout of a DINO run is unchanged (teacher, dino_state, the engine's files): a run the
    previous trainer saved at step 2 goes on to step 4 as an uninterrupted run of today's trainer does."""
    run, fresh = tmp_path / "old", tmp_path / "fresh"
    shutil.copytree(FIXTURE, run)
    for path in (run / "config.yaml", run / "checkpoints" / "step_00000002" / "meta.json"):
        # The fixture was made on another machine: its paths, as a user's moved run folder would be edited.
        text = path.read_text().replace("/work/shared/data/imagenette", str(SHARDS)).replace("/tmp/oldrun", str(run))
        path.write_text(text)
    _run(run, "max_steps=4", "checkpoint.every_steps=2")
    _run(fresh, "max_steps=4", "checkpoint.every_steps=2")
    old, new = _metrics(run), _metrics(fresh)
    assert sorted(old) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):  # 1-2: the old trainer's steps equal today's; 3-4: the resumed ones
        assert old[step]["loss"] == pytest.approx(new[step]["loss"], rel=1e-6, abs=0), step
    a, b = _checkpoint(run, 4, "teacher"), _checkpoint(fresh, 4, "teacher")
    assert set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6) for k in a)
    torch.testing.assert_close(_checkpoint(run, 4, "dino_state")["center"],
                               _checkpoint(fresh, 4, "dino_state")["center"], rtol=0, atol=1e-7)
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["method"] == "dino" and meta["stateful"] == ["dino_state", "teacher"]


def test_the_distillation_loss_is_zero_for_the_teacher_itself_and_positive_otherwise():
    """Cosine distances of pooled features and feature maps: a student that is the teacher, with an identity
    projector, has loss 0 (to rounding); a randomly initialised one does not."""
    from ssl_container.methods.distill import DistillMethod, DistillStudent
    from ssl_container.methods.config import DistillConfig
    from ssl_container.models import create_model

    torch.manual_seed(0)
    kwargs = dict(embed_dims=[8, 16, 32, 64], depths=[1, 1, 1, 1])
    teacher = create_model("container_light", num_classes=0, **kwargs).eval()
    method = DistillMethod.__new__(DistillMethod)
    torch.nn.Module.__init__(method)
    method.model_cfg, method.cfg, method.teacher = None, DistillConfig(teacher="unused"), teacher
    crops = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32)]

    same = DistillStudent(teacher, teacher.num_features).eval()
    with torch.no_grad():
        same.projector["pooled"].weight.copy_(torch.eye(64))
        same.projector["pooled"].bias.zero_()
        same.projector["maps"].weight.copy_(torch.eye(64)[:, :, None, None])
        same.projector["maps"].bias.zero_()
    out = method.losses(same, crops, {})
    assert out.loss.item() == pytest.approx(0.0, abs=1e-5)
    assert set(out.stats) == {"distill_pooled", "distill_maps"}

    other = DistillStudent(create_model("container_light", num_classes=0, **kwargs), teacher.num_features).eval()
    out = method.losses(other, crops, {})
    assert 0.5 < out.loss.item() < 4.0  # two cosine distances of unrelated features, each about 1
    out.loss.backward()  # the student and its projector learn; the teacher has no gradient
    assert other.projector["maps"].weight.grad is not None and all(p.grad is None for p in teacher.parameters())


@needs_shards
def test_distillation_trains_resumes_exactly_and_exports_the_student(tmp_path):
    """method=distill from a DINO run folder: the student learns the frozen teacher's features (loss falls),
    a stopped run resumes exactly, checkpoints hold no teacher, and the export is the student's backbone."""
    teacher_run, full, split = tmp_path / "teacher", tmp_path / "full", tmp_path / "split"
    _run(teacher_run, "max_steps=2", "checkpoint.every_steps=2")
    distill = ("method=distill", f"distill.teacher={teacher_run}", "schedule.lr=0.2", "checkpoint.every_steps=3",
               "model.kwargs={embed_dims: [8,16,32,64], depths: [1,1,1,2]}")  # another student than the teacher
    _run(full, *distill, "max_steps=6")
    _run(split, *distill, "max_steps=3")
    proc = _run(split, *distill, "max_steps=6")
    assert "distill container_light" in proc.stderr
    rows, resumed = _metrics(full), _metrics(split)
    assert [rows[s]["loss"] for s in range(1, 7)] == [resumed[s]["loss"] for s in range(1, 7)]
    assert rows[6]["loss"] < rows[1]["loss"]  # it learns
    assert "momentum" not in rows[6] and {"distill_pooled", "distill_maps"} <= set(rows[6])
    step = full / "checkpoints" / "step_00000006"
    assert not (step / "teacher.safetensors").exists()
    assert _checkpoint(full, 6, "student") .keys() == _checkpoint(split, 6, "student").keys()
    a, b = _checkpoint(full, 6, "student"), _checkpoint(split, 6, "student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((step / "meta.json").read_text())
    assert meta["method"] == "distill" and meta["distill"]["teacher"] == str(teacher_run) and "head" not in meta

    # The teacher's run goes on: the same path now holds other weights, and a resume refuses to distil from them.
    _run(teacher_run, "max_steps=4", "checkpoint.every_steps=2")
    files = {p: p.read_bytes() for p in split.rglob("*") if p.is_file()}
    proc = _run(split, *distill, "max_steps=8", check=False)
    assert proc.returncode == 2 and "now holds other weights than the teacher this run was distilled from" in proc.stderr
    assert {p: p.read_bytes() for p in split.rglob("*") if p.is_file()} == files

    from ssl_container.export import export, load_backbone

    out = export(full, tmp_path / "export")
    backbone = load_backbone(out)
    assert backbone.num_features == 64 and len(backbone.stages[3].blocks) == 2
    assert json.loads((out / "meta.json").read_text())["which"] == "student"
    assert not (out / "dino_head.safetensors").exists()


@needs_shards
def test_a_distillation_teacher_that_cannot_be_read_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "r"
    proc = _run(run, "method=distill", f"distill.teacher={tmp_path / 'nowhere'}", "max_steps=1", check=False)
    assert proc.returncode == 2 and "distill.teacher" in proc.stderr and not run.exists()
    proc = _run(run, "method=distill", "max_steps=1", check=False)
    assert proc.returncode == 2 and "needs config key 'distill.teacher'" in proc.stderr and not run.exists()
