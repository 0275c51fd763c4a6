"""Is a DINO run collapsing? The two failure modes, measured as the DINO paper measures them.

DINO has two trivial solutions (Caron et al. 2021, sec. 5.3 and fig. 7):

* **uniform**: centering wins over sharpening; every teacher output becomes the uniform
  distribution, the teacher entropy rises to ``ln K`` and the student matches it (KL -> 0);
* **one-hot**: sharpening wins over centering; one prototype (or a few) takes every image, so few
  prototypes are ever the teacher's choice in a batch, the entropy falls to 0 and again KL -> 0.

Per step :func:`collapse_stats` gives the teacher entropy (nats, mean over teacher crops), the
student-teacher KL (mean over the loss's pairs) and the share of prototypes that are the argmax of
at least one teacher row, out of the most that could be (``min(K, rows)``). A healthy run keeps
the entropy well below ``ln K``, a KL that is not 0 and a share well above 0.
:class:`CollapseMonitor` turns a sustained breach into one warning naming the mode, the likely
cause and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["collapse_stats", "CollapseMonitor"]


@torch.no_grad()
def collapse_stats(p_teacher: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """``teacher_entropy``, ``kl`` and ``prototypes_used`` as 0-d tensors (no host sync).

    ``p_teacher``: teacher probabilities ``(rows, K)``; ``loss``: the DINO cross-entropy averaged
    over (teacher crop, other student crop) pairs. Every teacher crop enters the same number of
    pairs, so the mean KL over pairs is exactly ``loss - mean teacher entropy``.
    """
    p = p_teacher.detach().float()
    rows, k = p.shape
    entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1).mean()
    chosen = torch.zeros(k, device=p.device).index_fill_(0, p.argmax(-1), 1.0).sum()
    return {
        "teacher_entropy": entropy,
        "kl": loss.detach().float() - entropy,
        "prototypes_used": chosen / max(1, min(k, rows)),
    }


@dataclass
class CollapseMonitor:
    """Warns once per mode when a collapse signature lasts ``patience`` consecutive steps.

    ``uniform_fraction``: entropy at or above this share of ``ln K`` counts as uniform;
    ``min_prototypes_used``: a share of used prototypes at or below this counts as one-hot, and so
    does a single prototype for all ``rows`` teacher outputs of a step (small batches).
    """

    out_dim: int
    rows: int = 0
    patience: int = 20
    # 0.97: Sinkhorn-Knopp targets of a healthy short run sit at ~0.9 ln K (1024 prototypes)
    uniform_fraction: float = 0.97
    min_prototypes_used: float = 0.05
    _uniform_run: int = 0
    _onehot_run: int = 0
    _warned: tuple[str, ...] = ()

    def update(self, step: int, stats: dict[str, float]) -> str | None:
        """Feed one step's stats; returns a warning the first time a mode has lasted ``patience`` steps."""
        max_entropy = math.log(self.out_dim)
        entropy, used = stats.get("teacher_entropy"), stats.get("prototypes_used")
        if entropy is None or used is None or not (math.isfinite(entropy) and math.isfinite(used)):
            return None
        self._uniform_run = self._uniform_run + 1 if entropy >= self.uniform_fraction * max_entropy else 0
        one = 1.0 / min(self.rows, self.out_dim) if self.rows else 0.0
        self._onehot_run = self._onehot_run + 1 if used <= max(self.min_prototypes_used, one) + 1e-9 else 0
        if self._uniform_run >= self.patience and "uniform" not in self._warned:
            self._warned += ("uniform",)
            return (
                f"step {step}: the run is collapsing to the uniform distribution: teacher entropy {entropy:.3f} "
                f"is {entropy / max_entropy:.0%} of its maximum ln K = {max_entropy:.3f} for {self.patience} steps, "
                f"KL {stats.get('kl', float('nan')):.4f}. Centering is stronger than sharpening. Fix: lower "
                "schedule.teacher_temp (and schedule.warmup_teacher_temp), shorten schedule.warmup_teacher_temp_epochs, "
                "or lower schedule.lr / raise schedule.warmup_epochs."
            )
        if self._onehot_run >= self.patience and "one-hot" not in self._warned:
            self._warned += ("one-hot",)
            return (
                f"step {step}: the run is collapsing to one prototype: only {used:.1%} of the possible prototypes "
                f"are chosen by the teacher in a batch for {self.patience} steps (entropy {entropy:.3f}). "
                "Sharpening is stronger than centering. Fix: use dino.sinkhorn_knopp=true, lower "
                "dino.center_momentum (a faster center), raise schedule.teacher_temp, lower schedule.lr, or add "
                "dino.koleo_weight=0.1."
            )
        return None
