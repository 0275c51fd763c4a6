"""Resumes that cannot work are refused before anything is written: an optimizer-state layout the
checkpoint was not saved with, and a universal conversion made from another checkpoint of the same name."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_container.config import CheckpointConfig
from ssl_container.trainer.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"


def test_a_universal_conversion_is_reused_only_for_the_checkpoint_it_came_from(tmp_path):
    ckpt = CheckpointManager(tmp_path, CheckpointConfig(), meta={})
    step = ckpt.root / "step_00000005"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 5, "files": {"a": {"sha256": "1" * 64}}}))
    universal = ckpt.root / "step_00000005_universal"
    (universal / "zero").mkdir(parents=True)
    assert not ckpt.universal_is_current("step_00000005")  # no record of its source: converted again
    (universal / "source.json").write_text(json.dumps({"meta_sha256": ckpt._meta_digest("step_00000005")}))
    assert ckpt.universal_is_current("step_00000005")
    # `latest` moved back and the run retrained: a new step_00000005 with other files
    (step / "meta.json").write_text(json.dumps({"step": 5, "files": {"a": {"sha256": "2" * 64}}}))
    assert not ckpt.universal_is_current("step_00000005")


@pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette (the real shards)")
@pytest.mark.parametrize("change, said", [("engine.zero_stage=1", "engine.zero_stage=1: its checkpoint holds the "
                                           "optimizer state of engine.zero_stage=0"),
                                          ("optim.optimizer=sgd", "optim.optimizer='sgd': its checkpoint holds")])
def test_an_optimizer_layout_change_is_refused_in_one_line(tmp_path, change, said):
    from test_train import TINY, _env

    run = tmp_path / "run"
    base = [sys.executable, "-m", "ssl_container.train", f"run_dir={run}", *TINY, "max_steps=2"]
    subprocess.run(base, cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = subprocess.run([*base, "max_steps=3", change], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said.replace("'", "") in lines[0].replace("'", ""), lines
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette (the real shards)")
def test_the_default_zero_stage_resumes_a_zero1_run_at_its_stage(tmp_path):
    """A run folder trained with ZeRO-1 (the default before engine.zero_stage became null) resumes without
    naming the stage; a new run folder trains with 0."""
    from test_train import TINY, _env

    run = tmp_path / "run"
    base = [sys.executable, "-m", "ssl_container.train", f"run_dir={run}", *TINY, "checkpoint.every_steps=1"]
    subprocess.run([*base, "max_steps=1", "engine.zero_stage=1"], cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.run([*base, "max_steps=2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "engine.zero_stage" not in proc.stderr  # no change listed: the stage came from the checkpoint
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["config"]["engine"]["zero_stage"] == 1
    assert (run / "checkpoints" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # ZeRO-1's layout
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "ssl_container.train", f"run_dir={fresh}", *TINY, "max_steps=1"], cwd=REPO,
                   env=_env(), check=True, capture_output=True, timeout=300)
    assert json.loads((fresh / "checkpoints" / "step_00000001" / "meta.json").read_text())["config"]["engine"][
        "zero_stage"] == 0


def test_overwrite_through_a_symlinked_run_folder_acts_where_the_folder_lives(tmp_path):
    """checkpoint.overwrite=true on RUN -> /scratch/RUN renamed the link, and the new run was created where
    the link had been (a quota-limited home, say)."""
    from ssl_container.run_folder import move_aside

    scratch = tmp_path / "scratch" / "run"
    (scratch / "checkpoints" / "step_00000002").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    link = home / "run"
    link.symlink_to(scratch)
    aside = move_aside(link)
    assert aside.parent == scratch.parent and (aside / "checkpoints" / "step_00000002").is_dir()
    assert link.is_symlink() and link.resolve() == scratch and scratch.is_dir() and not any(scratch.iterdir())
    assert sorted(p.name for p in home.iterdir()) == ["run"]  # nothing new in the home folder


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette (the real shards)")
def test_a_resume_from_an_unsafe_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path):
    import torch

    from ssl_container.run_folder import folder_files
    from test_train import TINY, _env

    run = tmp_path / "run"
    base = [sys.executable, "-m", "ssl_container.train", f"run_dir={run}", *TINY, "max_steps=2"]
    subprocess.run(base, cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    step = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save({"module": _Evil(marker)}, step / "mp_rank_00_model_states.pt")
    meta = json.loads((step / "meta.json").read_text())
    meta["files"] = folder_files(step)  # the digests agree: only the weights-only load stands in the way
    (step / "meta.json").write_text(json.dumps(meta))
    proc = subprocess.run(base, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickles Python objects" in lines[0], lines[-5:]
    assert not marker.exists()
