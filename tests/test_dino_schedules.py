"""Schedules (endpoints and hand values) and parameter groups (membership, lr/wd, freezing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ssl_container.dino import (
    ScheduleConfig,
    DINOHead,
    DINOSchedules,
    MultiCropWrapper,
    apply_lr_wd,
    cosine_value,
    get_param_groups,
)

# --------------------------------------------------------------------------- array form


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """The whole schedule as an array, with the official ``utils.cosine_scheduler``'s signature."""
    total, warmup = epochs * niter_per_ep, warmup_epochs * niter_per_ep
    return np.array([cosine_value(it, base_value, final_value, total, warmup, start_warmup_value)
                     for it in range(total)])


def test_cosine_scheduler_endpoints_with_warmup() -> None:
    # 3 epochs x 4 iterations, 1 warm-up epoch: warm-up its 0..3, cosine its 4..11 (8 values)
    sched = cosine_scheduler(1.0, 0.1, epochs=3, niter_per_ep=4, warmup_epochs=1,
                             start_warmup_value=0.2)
    assert len(sched) == 12
    assert sched[0] == pytest.approx(0.2)            # first value
    assert sched[1] == pytest.approx(0.2 + 0.8 / 4)  # linear warm-up step
    assert sched[3] == pytest.approx(0.2 + 0.8 * 3 / 4)
    assert sched[4] == pytest.approx(1.0)            # value right after warm-up
    assert sched[-1] == pytest.approx(0.1)           # last value
    # cosine its 4..11: progress (it - 4) / 7; hand value at it = 6: 0.1 + 0.45 (1 + cos(2pi/7))
    assert sched[6] == pytest.approx(0.1 + 0.45 * (1 + math.cos(2 * math.pi / 7)))
    assert np.all(np.diff(sched[4:]) < 0)


def test_cosine_scheduler_without_warmup_and_midpoint() -> None:
    sched = cosine_scheduler(0.04, 0.4, epochs=1, niter_per_ep=11)
    assert len(sched) == 11
    assert sched[0] == pytest.approx(0.04)
    assert sched[5] == pytest.approx(0.22)  # cos(pi / 2) = 0: halfway between the ends
    assert sched[-1] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        cosine_scheduler(1.0, 0.0, epochs=2, niter_per_ep=3, warmup_epochs=3)


# --------------------------------------------------------------------------- dataclass


def _official(**kw: object) -> DINOSchedules:
    return DINOSchedules(epochs=100, niter_per_ep=10, total_batch_size=1024, config=ScheduleConfig(**kw))  # type: ignore[arg-type]


def test_dino_schedules_official_endpoints() -> None:
    s = _official()
    last = 100 * 10 - 1
    assert s.total_iters == 1000
    # lr: 5e-4 * 1024 / 256 = 2e-3 after 10 warm-up epochs, cosine to 1e-6 (unscaled)
    assert s.peak_lr == pytest.approx(2e-3)
    assert s.lr(0) == 0.0
    assert s.lr(50) == pytest.approx(1e-3)
    assert s.lr(100) == pytest.approx(2e-3)
    assert s.lr(last) == pytest.approx(1e-6)
    assert s.wd(0) == pytest.approx(0.04)
    assert s.wd(last) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.996)
    assert s.momentum(last) == 1.0
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(last) == pytest.approx(0.04)
    # past the end: final values are held
    assert s.lr(last + 50) == pytest.approx(1e-6)
    assert s.momentum(last + 50) == 1.0
    with pytest.raises(ValueError):
        s.lr(-1)


def test_teacher_temperature_warmup_boost_recipe() -> None:
    s = _official(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(150) == pytest.approx(0.055)  # halfway through 300 warm-up its
    assert s.teacher_temp(300) == pytest.approx(0.07)
    assert s.teacher_temp(999) == pytest.approx(0.07)


def test_dataclass_matches_array_form() -> None:
    s = DINOSchedules(epochs=5, niter_per_ep=3, total_batch_size=512, config=ScheduleConfig(warmup_epochs=2))
    arrays = {name: np.array([getattr(s, name)(i) for i in range(s.total_iters)]) for name in ("lr", "wd", "momentum")}
    np.testing.assert_allclose(
        arrays["lr"], cosine_scheduler(5e-4 * 2, 1e-6, 5, 3, warmup_epochs=2), rtol=1e-12
    )
    np.testing.assert_allclose(arrays["wd"], cosine_scheduler(0.04, 0.4, 5, 3), rtol=1e-12)
    np.testing.assert_allclose(arrays["momentum"], cosine_scheduler(0.996, 1.0, 5, 3), rtol=1e-12)
    assert all(len(a) == 15 for a in arrays.values())


def test_schedule_validation_lists_problems() -> None:
    with pytest.raises(ValueError, match="warmup_epochs"):
        DINOSchedules(epochs=5, niter_per_ep=3, total_batch_size=64)  # default warm-up 10
    with pytest.raises(ValueError, match="niter_per_ep"):
        DINOSchedules(epochs=5, niter_per_ep=0, total_batch_size=64, config=ScheduleConfig(warmup_epochs=0))


def test_last_layer_frozen_during_first_epoch() -> None:
    s = DINOSchedules(epochs=3, niter_per_ep=4, total_batch_size=64, config=ScheduleConfig(warmup_epochs=0))
    assert [s.last_layer_frozen(i) for i in (0, 3, 4, 11)] == [True, True, False, False]
    s0 = DINOSchedules(epochs=3, niter_per_ep=4, total_batch_size=64,
                       config=ScheduleConfig(warmup_epochs=0, freeze_last_layer=0))
    assert not s0.last_layer_frozen(0)


# --------------------------------------------------------------------------- parameter groups


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _student(norm_last_layer: bool = True) -> MultiCropWrapper:
    head = DINOHead(5, out_dim=9, hidden_dim=8, bottleneck_dim=3,
                    norm_last_layer=norm_last_layer)
    return MultiCropWrapper(_Backbone(), head)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_membership_and_markers() -> None:
    model = _student()
    groups = {g["name"]: g for g in get_param_groups(model)}
    assert set(groups) == {"decay", "no_decay", "last_layer_decay"}
    assert _names(model, groups["decay"]) == {
        "backbone.conv.weight", "backbone.fc.weight",
        "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight",
    }
    assert _names(model, groups["no_decay"]) == {
        "backbone.bn.weight", "backbone.bn.bias", "backbone.fc.bias",
        "head.mlp.0.bias", "head.mlp.2.bias", "head.mlp.4.bias",
    }
    # the frozen unit gain is not trainable and appears in no group
    assert _names(model, groups["last_layer_decay"]) == {
        "head.last_layer.parametrizations.weight.original1"
    }
    assert [(g["apply_wd"], g["is_last_layer"]) for g in groups.values()] == [
        (True, False), (False, False), (True, True)
    ]
    torch.optim.AdamW(list(groups.values()))  # accepted as-is


def test_trainable_gain_goes_to_last_layer_no_decay_and_extra_names() -> None:
    model = _student(norm_last_layer=False)
    groups = {g["name"]: g for g in get_param_groups(model,
                                                     no_weight_decay_names={"backbone.fc.weight"})}
    assert _names(model, groups["last_layer_no_decay"]) == {
        "head.last_layer.parametrizations.weight.original0"
    }
    assert "backbone.fc.weight" in _names(model, groups["no_decay"])
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))


def test_apply_lr_wd_freezes_last_layer_in_first_epoch_with_adamw() -> None:
    torch.manual_seed(0)
    model = _student()
    opt = torch.optim.AdamW(get_param_groups(model), lr=1.0)
    apply_lr_wd(opt, lr=0.1, wd=0.3, epoch=0, freeze_last_layer=1)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (0.1, 0.3)
    assert (by_name["no_decay"]["lr"], by_name["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert (by_name["last_layer_decay"]["lr"],
            by_name["last_layer_decay"]["weight_decay"]) == (0.0, 0.3)

    v_before = model.head.last_layer_direction.detach().clone()
    w_before = model.head.mlp[0].weight.detach().clone()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert torch.equal(model.head.last_layer_direction.detach(), v_before)
    assert not torch.equal(model.head.mlp[0].weight.detach(), w_before)

    apply_lr_wd(opt.param_groups, lr=0.1, wd=0.3, epoch=1, freeze_last_layer=1)
    assert by_name["last_layer_decay"]["lr"] == 0.1


def test_schedules_apply_sets_values_for_an_iteration() -> None:
    model = _student()
    opt = torch.optim.AdamW(get_param_groups(model))
    s = DINOSchedules(epochs=4, niter_per_ep=5, total_batch_size=256, config=ScheduleConfig(warmup_epochs=1))
    values = s.apply(opt, 5)  # first iteration of epoch 1: warm-up done, layer unfrozen
    assert values["lr"] == pytest.approx(5e-4)
    assert {g["lr"] for g in opt.param_groups} == {values["lr"]}
    s.apply(opt, 4)  # still epoch 0
    last = [g for g in opt.param_groups if g["is_last_layer"]]
    assert last and all(g["lr"] == 0.0 for g in last)
