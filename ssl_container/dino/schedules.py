"""Per-iteration schedules of DINO and the optimiser parameter groups they act on.

DINO changes four quantities every iteration: the learning rate (linear warm-up, then cosine),
the weight decay (cosine 0.04 -> 0.4), the teacher EMA momentum (cosine 0.996 -> 1) and the
teacher temperature (linear warm-up, then constant). They are all closed-form functions of the
*global* iteration ``it = epoch * niter_per_ep + step``, so resuming mid-epoch needs nothing but
the iteration counter; nothing here holds state.

Conventions, and where they differ from the official code (by at most one iteration):

* Warm-up is linear from ``start_warmup_value`` at ``it = 0`` and reaches ``base_value`` exactly
  at ``it = warmup_iters`` (DINO's ``linspace`` reaches it one iteration earlier and repeats it).
* The cosine runs from ``base_value`` at ``it = warmup_iters`` to ``final_value`` exactly at the
  last iteration ``epochs * niter_per_ep - 1`` (DINO stops one step short of ``final_value``;
  for the teacher momentum that means it never quite reaches 1). Past the end the final value is
  held, so a trainer that runs a few extra iterations gets sane values.
* The teacher temperature warms up per iteration rather than per epoch.

Parameter groups carry marker keys (``apply_wd``, ``is_last_layer``) so that
:func:`apply_lr_wd` can set lr and weight decay each iteration without re-deriving which group
is which. The prototype layer is frozen during the first ``freeze_last_layer`` epochs by giving
its groups lr 0 -- not by editing gradients, which an engine such as DeepSpeed owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, MutableMapping

from torch import nn

from .config import ScheduleConfig
from .head import DINOHead

__all__ = [
    "cosine_value",
    "linear_warmup_value",
    "DINOSchedules",
    "get_param_groups",
    "apply_lr_wd",
]


def cosine_value(
    it: int,
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
) -> float:
    """Value at iteration ``it`` of a linear-warm-up + cosine schedule (see module docstring)."""
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    if total_iters <= 0:
        raise ValueError(f"total_iters must be > 0, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, {total_iters}], got {warmup_iters}")
    if it < warmup_iters:
        return start_warmup_value + (base_value - start_warmup_value) * it / warmup_iters
    cosine_iters = total_iters - warmup_iters
    if it >= total_iters - 1 or cosine_iters <= 1:
        # The last iteration (also when it is the only post-warm-up one) gets the final value.
        return float(final_value)
    progress = (it - warmup_iters) / (cosine_iters - 1)
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def linear_warmup_value(it: int, start_value: float, end_value: float, warmup_iters: int) -> float:
    """Linear ramp from ``start_value`` (``it = 0``) to ``end_value`` (``it >= warmup_iters``)."""
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    if warmup_iters <= 0 or it >= warmup_iters:
        return float(end_value)
    return start_value + (end_value - start_value) * it / warmup_iters


@dataclass(frozen=True)
class DINOSchedules:
    """All four DINO schedules, evaluated at a global iteration.

    ``config`` is the run config's ``schedule`` section (defaults: the official ViT-S/16 recipe);
    ``epochs``, ``niter_per_ep`` and ``total_batch_size`` come from the run. ``total_batch_size``
    is the batch summed over all ranks (and gradient-accumulation steps).
    """

    epochs: int
    niter_per_ep: int
    total_batch_size: int
    config: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        c, problems = self.config, []
        for name in ("epochs", "niter_per_ep", "total_batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
            if getattr(c, name) > self.epochs:
                problems.append(f"schedule.{name} ({getattr(c, name)}) exceeds epochs ({self.epochs})")
        if problems:
            raise ValueError("invalid DINO schedule: " + "; ".join(problems))

    @property
    def total_iters(self) -> int:
        return self.epochs * self.niter_per_ep

    @property
    def peak_lr(self) -> float:
        """The lr at the end of warm-up, after linear batch-size scaling."""
        return self.config.lr * self.total_batch_size / self.config.lr_reference_batch

    def epoch(self, it: int) -> int:
        """The (0-based) epoch that global iteration ``it`` falls in."""
        return it // self.niter_per_ep

    def lr(self, it: int) -> float:
        return cosine_value(it, self.peak_lr, self.config.min_lr, self.total_iters,
                            self.config.warmup_epochs * self.niter_per_ep, 0.0)

    def wd(self, it: int) -> float:
        return cosine_value(it, self.config.weight_decay, self.config.weight_decay_end, self.total_iters)

    def momentum(self, it: int) -> float:
        """Teacher EMA momentum: ``teacher = m * teacher + (1 - m) * student``."""
        return cosine_value(it, self.config.momentum_teacher, self.config.momentum_teacher_end, self.total_iters)

    def teacher_temp(self, it: int) -> float:
        return linear_warmup_value(it, self.config.warmup_teacher_temp, self.config.teacher_temp,
                                   self.config.warmup_teacher_temp_epochs * self.niter_per_ep)

    def last_layer_frozen(self, it: int) -> bool:
        """Whether the prototype layer gets lr 0 at this iteration (DINO: the first epoch)."""
        return self.epoch(it) < self.config.freeze_last_layer

    def apply(self, optimizer_or_groups: Any, it: int) -> dict[str, float]:
        """Set lr / weight decay of every group for iteration ``it``; return the values used."""
        lr, wd = self.lr(it), self.wd(it)
        apply_lr_wd(optimizer_or_groups, lr=lr, wd=wd, epoch=self.epoch(it),
                    freeze_last_layer=self.config.freeze_last_layer)
        return {"lr": lr, "wd": wd}


def _is_no_decay(name: str, param: nn.Parameter, gains: set[int]) -> bool:
    """Biases, 1-D parameters (norm scales/shifts) and weight-norm gains are not decayed.

    The weight-norm gain has shape ``(out_dim, 1)``, so DINO's 1-D rule would decay it when it
    is trainable (``norm_last_layer=False``); a gain is a scale like a norm weight, and
    shrinking it towards 0 only flattens the logits, so it is excluded here.
    """
    return name.endswith(".bias") or param.ndim <= 1 or id(param) in gains


def get_param_groups(
    model: nn.Module, no_weight_decay_names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Optimiser parameter groups for DINO's student.

    Trainable parameters only, split by (weight decay?, prototype layer?) into at most four
    groups; empty groups are dropped. Every group carries:

    * ``"name"``: ``"decay"``, ``"no_decay"``, ``"last_layer_decay"`` or ``"last_layer_no_decay"``;
    * ``"apply_wd"``: whether the scheduled weight decay applies (otherwise it stays 0);
    * ``"is_last_layer"``: whether lr is forced to 0 while the last layer is frozen.

    The prototype layer is found as the ``last_layer`` of every :class:`DINOHead` inside
    ``model``. ``no_weight_decay_names`` adds exact parameter names to exclude from decay
    (e.g. a timm model's ``no_weight_decay()`` set, prefixed as in ``model``); DINO itself
    uses only the bias / 1-D rule.
    """
    heads = [m for m in model.modules() if isinstance(m, DINOHead)]
    last_ids = {id(p) for h in heads for p in h.last_layer_parameters()}
    gain_ids = {id(h.last_layer_gain) for h in heads}
    extra_no_wd = set(no_weight_decay_names)

    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (True, False): [], (False, False): [], (True, True): [], (False, True): []
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        apply_wd = not (_is_no_decay(name, param, gain_ids) or name in extra_no_wd)
        buckets[(apply_wd, id(param) in last_ids)].append(param)

    names = {
        (True, False): "decay", (False, False): "no_decay",
        (True, True): "last_layer_decay", (False, True): "last_layer_no_decay",
    }
    groups = []
    for (apply_wd, is_last), params in buckets.items():
        if params:
            groups.append({
                "params": params,
                "name": names[(apply_wd, is_last)],
                "apply_wd": apply_wd,
                "is_last_layer": is_last,
                "weight_decay": 0.0,
            })
    return groups


def apply_lr_wd(
    optimizer_or_groups: Any,
    lr: float,
    wd: float,
    epoch: int,
    freeze_last_layer: int = 1,
) -> None:
    """Write lr and weight decay into every parameter group for the current iteration.

    Accepts an optimiser (anything with ``param_groups``, including DeepSpeed's wrappers) or
    a list of group dicts. Groups without markers are treated as ordinary decayed groups.
    The prototype groups get lr 0 while ``epoch < freeze_last_layer``: with AdamW that leaves
    the weights exactly unchanged (the decoupled decay is scaled by lr too), although the
    optimiser moments still accumulate, unlike DINO's dropping of the gradients.
    """
    groups: Iterable[MutableMapping[str, Any]] = getattr(
        optimizer_or_groups, "param_groups", optimizer_or_groups
    )
    frozen = epoch < freeze_last_layer
    for group in groups:
        is_last = bool(group.get("is_last_layer", False))
        group["lr"] = 0.0 if (is_last and frozen) else lr
        group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
