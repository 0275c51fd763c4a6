"""``ssl-container study`` end to end on synthetic shards: two arms trained by the real trainer, every
curve point and floor evaluated with the project's k-NN protocol, the three files written with every
key, a stopped study resumed (finished units kept, a half-trained one continued), the Slurm array and
the paper-setting config as dry runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shard_fixtures import write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]

RECIPE_OVERRIDES = [
    "data.batch_size=8", "data.num_workers=1", "data.samples_per_epoch=16", "data.shuffle_buffer=16",
    "data.crops.global_size=32", "data.crops.n_local=0", "head.out_dim=64", "head.hidden_dim=32",
    "head.bottleneck_dim=16", "schedule.warmup_epochs=0", "logging.tensorboard=false",
]


def _study(tmp_path: Path) -> Path:
    data = tmp_path / "synth"
    train = write_synthetic_shards(data, n_shards=2, per_shard=16, split="train", seed=0)
    write_synthetic_shards(data, n_shards=1, per_shard=12, split="val", seed=1)
    cfg = {
        "name": "tiny", "out": str(tmp_path / "study"), "recipe": str(REPO / "configs" / "demo.yaml"),
        "overrides": [f"data.urls=[{train}]", *RECIPE_OVERRIDES], "steps": 4, "curve_every_steps": 2, "seeds": [0],
        "headline": ["light", "resnet"],
        "knn": {"path": str(data), "reference_split": "train", "held_out_split": "val", "resolution": 32},
        "transfer": {"path": str(data), "reference_split": "train", "held_out_split": "val", "resolution": 32,
                     "streaming": True},
        "arms": [
            {"name": "light", "model": "container_light_narrow", "kwargs": {"depths": [1, 1, 1, 1]}},
            {"name": "resnet", "model": "resnet18", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8},
             "overrides": ["optim.clip_grad=1.0"], "note": "a narrow ResNet-18"},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "ssl_container", "study", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"study failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_a_tiny_study_writes_every_figure_and_resumes(tmp_path):
    import torch

    from eval.protocol import RawPixels, knn_eval, load_split
    from ssl_container.models import create_model
    from ssl_container.models.info import count_macs, count_parameters
    from study.config import load_study_config
    from study.plan import plan_units, schedule, train_overrides

    config = _study(tmp_path)
    cfg = load_study_config(config)
    units = plan_units(cfg)
    # A half-trained unit, as a stopped study leaves it: the same trainer command, stopped at step 2.
    light = units[0]
    subprocess.run([sys.executable, "-m", "ssl_container.train", "--config", cfg.recipe,
                    *train_overrides(cfg, light, schedule(cfg)), "max_steps=2"], cwd=REPO, check=True,
                   capture_output=True)

    proc = _run("--config", str(config))
    assert "light_seed0 (container_light_narrow): training 4 steps from step 2" in proc.stdout
    assert "resnet_seed0 (resnet18): training 4 steps from scratch" in proc.stdout
    logged = [json.loads(line).get("step") for line in (light.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert logged == [1, 2, 3, 4]  # resumed at step 3: steps 1-2 were not trained (and logged) a second time

    out = tmp_path / "study"
    doc = json.loads((out / "study.json").read_text())
    assert (out / "study.md").stat().st_size > 0 and (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert [a["arm"] for a in doc["arms"]] == ["light", "resnet"]
    ref = load_split(cfg.knn.path, "train", 32)
    held = load_split(cfg.knn.path, "val", 32)
    pixels = round(knn_eval(RawPixels(), ref, held)["top1"], 2)
    for arm, entry in zip(cfg.arms, doc["arms"]):
        for key in ("arm", "model", "seed", "params", "gmacs", "steps", "train_seconds", "images_per_s", "knn",
                    "knn_random", "knn_pixels", "transfer", "detection"):
            assert key in entry, key
        model = create_model(arm.model, num_classes=0, **arm.kwargs)
        assert entry["params"] == count_parameters(model)
        assert entry["gmacs"] == round(count_macs(model, (32, 32)) / 1e9, 4)
        assert entry["steps"] == 4 and [p["step"] for p in entry["curve"]] == [2, 4]
        assert entry["knn"] == entry["curve"][-1]["knn"]
        assert entry["knn_pixels"] == pixels  # the protocol's own raw-pixel floor
        torch.manual_seed(0)
        assert entry["knn_random"] == round(knn_eval(create_model(arm.model, num_classes=0, **arm.kwargs),
                                                     ref, held)["top1"], 2)
        assert entry["train_seconds"] > 0 and entry["images_per_s"] > 0
        assert 0 <= entry["transfer"]["knn"] <= 100 and entry["transfer"]["num_held_out"] == 12
        assert entry["transfer"]["knn_pixels"] is None  # a streamed set has no raw-pixel floor
        assert entry["detection"] is None
    h = doc["headline"]
    assert h["margin"] == pytest.approx(doc["arms"][0]["knn"] - doc["arms"][1]["knn"], abs=0.011)
    md = (out / "study.md").read_text()
    assert "optim.clip_grad=1.0" in md and "| light | container_light_narrow |" in md

    # Run again: every unit is kept, nothing trains.
    before = (light.run_dir / "metrics.jsonl").read_text()
    again = _run("--config", str(config))
    assert again.stdout.count(": done, kept") == 2 and "training" not in again.stdout
    assert (light.run_dir / "metrics.jsonl").read_text() == before

    # A unit stopped during its evaluation (its curve saved, the transfer not): evaluated again, not trained.
    resnet = units[1]
    partial = json.loads(resnet.result_path.read_text())
    partial["complete"] = False
    resnet.result_path.write_text(json.dumps(partial))
    third = _run("--config", str(config))
    assert "resnet_seed0 (resnet18): evaluating" in third.stdout and "training" not in third.stdout
    assert json.loads(resnet.result_path.read_text())["complete"] is True


def test_study_refusals_and_dry_runs(tmp_path):
    config = _study(tmp_path)
    plan = _run("--config", str(config), "--dry-run").stdout
    assert "2 units (2 arms x 1 seeds)" in plan and "arm overrides: optim.clip_grad=1.0" in plan
    assert not (tmp_path / "study").exists()  # a dry run writes nothing
    bad = _run("--config", str(config), "arms.0.name=resnet", check=False)
    assert bad.returncode == 2 and "arm names must be unique" in bad.stderr and len(bad.stderr.splitlines()) == 1
    bad = _run("--config", str(config), "--arms", "nope", check=False)
    assert bad.returncode == 2 and "no arm named 'nope'" in bad.stderr
    array = _run("--config", str(config), "--slurm", "--dry-run").stdout
    assert "#SBATCH --array=0-1" in array and "study-study" in array


def test_the_paper_setting_is_one_command_away():
    plan = _run("--config", "configs/studies/imagenet.yaml", "--dry-run").stdout
    assert "container_light_seed0" in plan and "deit_s_seed0" in plan and "vit_small_patch16_224" in plan
    script = _run("--config", "configs/studies/imagenet.yaml", "--slurm", "--dry-run").stdout
    for line in ("#SBATCH --array=0-1", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"):
        assert line in script
    cpu = _run("--config", "configs/studies/imagenette.yaml", "--dry-run").stdout
    assert "2720 steps per unit (85 recipe epochs)" in cpu


def test_every_shipped_study_config_plans():
    configs = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert len(configs) >= 4
    for config in configs:
        plan = _run("--config", str(config), "--dry-run").stdout
        assert "budget:" in plan and "output:" in plan, config
    plan = _run("--config", "configs/studies/imagenette_detection_96.yaml", "--dry-run").stdout
    assert "3400 steps per unit" in plan and "data.crops.global_size=96" in plan and "at 96 px" in plan


def test_study_help_is_quick():
    import time

    t0 = time.perf_counter()
    proc = _run("--help")
    assert "study.json" in proc.stdout and time.perf_counter() - t0 < 5


def test_a_report_without_raw_pixel_floors(tmp_path):
    """A streamed k-NN set (ImageNet) has no raw-pixel floor: the log line, the table and the figure do without."""
    from study.config import ArmConfig, EvalDataConfig, StudyConfig
    from study.report import write_report

    cfg = StudyConfig(name="t", out=str(tmp_path), recipe="r.yaml", steps=4, seeds=[0, 1],
                      arms=[ArmConfig(name="a", model="m"), ArmConfig(name="b", model="m")], headline=["a", "b"],
                      knn=EvalDataConfig(path="/data/imagenet", resolution=224, streaming=True))
    results = [{"arm": arm, "model": "m", "note": "", "arm_overrides": [], "seed": seed, "params": 1, "gmacs": 0.1,
                "steps": 4, "train_seconds": 60.0, "images_per_s": 10.0, "knn": knn, "knn_random": 1.0,
                "knn_pixels": None, "transfer": None, "detection": None, "complete": True,
                "curve": [{"step": 4, "train_seconds": 60.0, "knn": knn}]}
               for arm, seed, knn in (("a", 0, 50.0), ("a", 1, 52.0), ("b", 0, 40.0), ("b", 1, 41.0))]
    files = write_report(cfg, results)
    doc = json.loads(files["json"].read_text())
    assert doc["headline"]["margin"] == 10.5 and doc["headline"]["margin_exceeds_spread"] is True
    assert doc["headline"]["paired"] == [10.0, 11.0]
    assert "| **51.00** (2.00) | 1.00 | - |" in files["md"].read_text()
    assert files["png"].read_bytes()[:4] == b"\x89PNG"


def test_a_finished_detection_seed_is_kept_and_a_changed_command_reruns(tmp_path):
    from study.runner import _kept_detection

    argv = ["--data", "coco128", "--weights", "w", "--init", "dino", "random", "--seed", "0", "--epochs", "4"]
    out = tmp_path / "ft0"
    assert _kept_detection(out, argv) is None  # nothing there yet
    out.mkdir()
    (out / "results.json").write_text("{broken")
    assert _kept_detection(out, argv) is None  # unreadable: run again
    results = {"command": "python -m eval.detection " + " ".join(argv), "runs": {"dino": {}}}
    (out / "results.json").write_text(json.dumps(results))
    assert _kept_detection(out, argv) is None  # stopped after the first init
    results["runs"]["random"] = {}
    (out / "results.json").write_text(json.dumps(results))
    assert _kept_detection(out, argv) == results
    assert _kept_detection(out, [*argv[:-1], "12"]) is None  # another schedule
