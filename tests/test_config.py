"""Typed configs: defaults, YAML + overrides, and errors that name the key and the fix."""
from pathlib import Path

import pytest
import yaml

from ssl_container.config import ConfigError, TrainConfig, config_digest, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_dino_recipe():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert (cfg.schedule.lr, cfg.schedule.min_lr, cfg.schedule.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (cfg.schedule.weight_decay, cfg.schedule.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.schedule.teacher_temp, cfg.dino.student_temp, cfg.schedule.momentum_teacher) == (0.04, 0.1, 0.996)
    assert (cfg.data.crops.n_global, cfg.data.crops.global_size, cfg.data.crops.n_local, cfg.data.crops.local_size) == (2, 224, 8, 96)
    assert cfg.data.crops.global_scale == (0.4, 1.0) and cfg.data.crops.local_scale == (0.05, 0.4)
    assert cfg.head.out_dim == 65536 and cfg.engine.zero_stage is None  # resolved by the run folder


def test_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 17\nschedule:\n  lr: 0.001\ndata:\n  urls: ['/d/train-{000000..000009}.tar']\n")
    cfg = load_config(recipe, ["schedule.lr=2e-3", "data.crops.local_size=32", "model.kwargs={img_size: 64}",
                               "data.urls=[/a/x-{0..3}.tar,/b/y-{0..1}.tar]", "data.weights=[1,3]"])
    assert cfg.epochs == 17 and cfg.schedule.lr == 2e-3 and cfg.data.crops.local_size == 32
    assert cfg.model.kwargs == {"img_size": 64}
    assert cfg.data.urls == ["/a/x-{0..3}.tar", "/b/y-{0..1}.tar"] and cfg.data.weights == [1.0, 3.0]
    # a single brace pattern is a one-element list
    assert load_config(None, ["data.urls=/d/t-{0..9}.tar"]).data.urls == ["/d/t-{0..9}.tar"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr'.*Allowed keys here: optimizer, clip_grad"),
        ("bogus=1", r"unknown config key 'bogus'"),
        ("schedule.lr=abc", r"bad value for 'schedule.lr'"),
        ("engine.precision=fp8", r"'engine.precision' is 'fp8'; allowed values: fp32, bf16, fp16"),
        ("engine.zero_stage=3", r"'engine.zero_stage' is 3; allowed values: null, 0, 1, 2"),
        ("epochs=0", r"'epochs' must be > 0"),
        ("data.crops.global_scale=[0.5,0.1]", r"data.crops.global_scale"),
        ("schedule.lr", r"not key=value"),
    ],
)
def test_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml: unknown config key 'optim.learning_rate'"):
        load_config(unknown)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["schedule.lr=3e-4", "data.urls=[/x/{0..1}.tar]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_digest(again) == config_digest(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["schedule"]["lr"] == 3e-4


def test_shipped_recipes_load():
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"container_light_imagenet", "vit_small_imagenet", "imagenette", "cifar10", "demo"}
    for path in recipes:
        load_config(path)


def test_demo_reads_the_packaged_recipe_file():
    from ssl_container.cli import DEMO_CONFIG, demo_recipe

    # one copy of the recipe: configs/ is the package's configs folder, and the demo reads it
    assert DEMO_CONFIG == (REPO / "ssl_container" / "configs" / "demo.yaml")
    assert (REPO / "configs" / "demo.yaml").resolve() == DEMO_CONFIG.resolve()
    assert demo_recipe() == yaml.safe_load(DEMO_CONFIG.read_text())
    cfg = load_config(demo_recipe(), ["max_steps=7"])  # a mapping loads like the file
    assert cfg.max_steps == 7 and cfg == load_config(DEMO_CONFIG, ["max_steps=7"])


def test_a_broken_recipe_mapping_is_named():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config({"optim": {"lrr": 1.0}})


def test_demo_is_the_small_budget_recipe_without_local_crops():
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    small = yaml.safe_load((REPO / "configs" / "small_budget.yaml").read_text())
    assert demo.pop("max_steps") == 960 and demo.pop("run_dir") != small.pop("run_dir")
    # 30 epochs of 1024 images = 960 steps of 32: the schedules end with the demo
    assert (demo.pop("epochs"), small.pop("epochs")) == (30, 15)
    assert (demo["data"]["crops"].pop("n_local"), small["data"]["crops"].pop("n_local")) == (0, 6)
    assert demo["data"]["crops"].pop("global_scale") == [0.6, 1.0] and "global_scale" not in small["data"]["crops"]
    assert demo["checkpoint"].pop("keep_last") == 1 and "keep_last" not in small["checkpoint"]
    assert demo == small
    cfg = load_config(REPO / "configs" / "small_budget.yaml")
    assert cfg.model.name == "container_light_narrow" and cfg.dino.sinkhorn_knopp and cfg.dino.koleo_weight == 0.1


def test_yaml_words_stay_words_for_text_keys_and_booleans_for_boolean_keys():
    cfg = load_config(None, ["logging.progress=off", "logging.tensorboard=off", "checkpoint.resume=yes"])
    assert (cfg.logging.progress, cfg.logging.tensorboard, cfg.checkpoint.resume) == ("off", False, True)


@pytest.mark.parametrize("override, key", [("schedule.lr=-1", "schedule.lr"), ("data.crops.n_local=-1", "data.crops.n_local"),
                                           ("schedule.momentum_teacher=1.5", "schedule.momentum_teacher"),
                                           ("data.crops.global_size=0", "data.crops.global_size"),
                                           ("schedule.lr=inf", "schedule.lr"), ("schedule.lr=nan", "schedule.lr"),
                                           ("schedule.weight_decay=inf", "schedule.weight_decay")])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_keys_moved_into_the_schedule_section_still_load_under_their_old_names(tmp_path, caplog):
    # optim.lr, dino.momentum_teacher, ... moved to schedule.*: old recipes, overrides and runs keep working
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  lr: 0.002\n  clip_grad: 1.0\ndino:\n  momentum_teacher: 0.99\n  koleo_weight: 0.1\n")
    cfg = load_config(old, ["dino.teacher_temp=0.07"])
    assert (cfg.schedule.lr, cfg.schedule.momentum_teacher, cfg.schedule.teacher_temp) == (0.002, 0.99, 0.07)
    assert (cfg.optim.clip_grad, cfg.dino.koleo_weight) == (1.0, 0.1)
    assert "'optim.lr' is now 'schedule.lr'" in caplog.text and "'dino.teacher_temp' is now 'schedule.teacher_temp'" in caplog.text
    assert load_config(None, ["checkpoint.allow_changes=[optim.lr]"]).checkpoint.allow_changes == ["schedule.lr"]
    with pytest.raises(ConfigError, match=r"'optim.lr' and 'schedule.lr' are both set"):
        load_config({"optim": {"lr": 1.0}, "schedule": {"lr": 2.0}})


def test_a_config_saved_with_the_old_names_has_no_changes():
    from ssl_container.config import config_to_dict
    from ssl_container.trainer.resume import config_changes

    cfg = load_config(None, ["schedule.lr=0.002"])
    saved = config_to_dict(cfg)
    saved["optim"]["lr"] = saved["schedule"].pop("lr")  # as an older version wrote config.yaml
    assert config_changes(saved, cfg) == []
    saved["optim"]["lr"] = 0.001
    assert config_changes(saved, cfg) == [("schedule.lr", 0.001, 0.002)]
