"""The DINO self-distillation loss, with its center, and optional Sinkhorn-Knopp teacher.

The loss is the cross-entropy between the teacher's distribution on each global crop and the
student's distribution on every *other* crop, averaged over those (teacher crop, student crop)
pairs and over the batch. Two mechanisms keep it from collapsing:

* **sharpening**: the teacher temperature (0.04) is lower than the student's (0.1);
* **centering**: a running mean of the teacher outputs (the ``center``) is subtracted before the
  teacher softmax, so no single prototype can dominate every image.

DINOv2 offers Sinkhorn-Knopp normalisation of the teacher instead of centering: a few iterations
that make every prototype receive the same share of the (global) batch. It is behind the
``sinkhorn_knopp`` flag; when on, the center is neither used nor updated.

Distributed behaviour: the center is the mean over the *global* batch, so its update all-reduces
the teacher sum (and the sample count, which keeps it exact when ranks have unequal batches); the
Sinkhorn-Knopp sums are all-reduced the same way. Both fall back to plain local computation when
``torch.distributed`` is not initialised. This is the only module of the package that talks to
``torch.distributed``; every rank must call ``forward`` the same number of times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import DINOLossConfig
from .diagnostics import collapse_stats

__all__ = ["DINOLoss", "sinkhorn_knopp"]


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """Teacher probabilities balanced over prototypes by Sinkhorn-Knopp (DINOv2).

    Returns a ``(N, K)`` matrix whose rows (samples) sum to exactly 1 and whose columns
    (prototypes) sum approximately to ``N_global / K``, where ``N_global`` is the number of rows
    over all ranks; the column marginal is only reached in the limit of many iterations, three
    being DINOv2's choice (cheap, and close enough to prevent collapse).

    The exponent is shifted by the global maximum before ``exp``: a global constant factor
    cancels in the first row normalisation, so this changes nothing but avoids overflow at low
    temperatures (DINOv2 exponentiates unshifted). DINOv2's global-sum and ``B`` scalings are
    also pure global factors and are omitted for the same reason.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    logits = teacher_output.detach().float() / teacher_temp
    distributed = _dist_active()
    global_max = logits.max() if logits.numel() else logits.new_zeros(())
    if distributed:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
    # Q is K x N as in the papers' notation: rows are prototypes, columns samples.
    q = torch.exp(logits - global_max).t()
    n_prototypes = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(n_iterations):
        # Every prototype gets total mass 1/K over the global batch ...
        row_sums = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(row_sums)
        q /= row_sums.clamp_min(tiny) * n_prototypes
        # ... then every sample's distribution is renormalised to sum to 1 (local: columns are
        # the samples this rank owns).
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
    return q.t().contiguous()


class DINOLoss(nn.Module):
    """Cross-entropy of the student against the centred, sharpened teacher.

    Args:
        out_dim: number of prototypes ``K``.
        ncrops: total number of student crops (globals + locals), e.g. 10.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
        sinkhorn_knopp: normalise the teacher with Sinkhorn-Knopp instead of centering.
        n_global_crops: number of teacher (global) crops; they must be the first crops of
            the student as well, in the same order, since pairs with equal index are skipped.
        sinkhorn_iterations: iterations of Sinkhorn-Knopp when enabled (3 in DINOv2).

    Layout: ``student_out`` is ``(ncrops * B, K)`` and ``teacher_out`` is
    ``(n_global_crops * B, K)``, both crop-major (every image's crop 0, then every image's crop
    1, ...), which is what :class:`~ssl_container.dino.multicrop.MultiCropWrapper` returns.

    The ``center`` buffer is persistent so that it is saved and restored with the state dict:
    resuming without it would restart centering from zero and perturb training.
    """

    center: torch.Tensor

    @classmethod
    def from_config(cls, cfg: DINOLossConfig, out_dim: int, ncrops: int, n_global_crops: int) -> "DINOLoss":
        """The loss of the run config's ``dino`` section, for a head of ``out_dim`` prototypes and the
        crop counts of the data section."""
        return cls(out_dim, ncrops, cfg.student_temp, cfg.center_momentum, cfg.sinkhorn_knopp,
                   n_global_crops=n_global_crops)

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_knopp: bool = False,
        n_global_crops: int = 2,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"DINOLoss needs out_dim > 0, got {out_dim}")
        if n_global_crops < 1:
            raise ValueError(f"DINOLoss needs n_global_crops >= 1, got {n_global_crops}")
        if ncrops < n_global_crops:
            raise ValueError(
                f"DINOLoss: ncrops ({ncrops}) must count the {n_global_crops} global crops too"
            )
        if ncrops == 1:
            raise ValueError("DINOLoss needs at least 2 crops: a crop is never paired with itself")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.use_sinkhorn_knopp = sinkhorn_knopp
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def n_loss_terms(self) -> int:
        """Number of (teacher crop, student crop) pairs averaged: 18 for 2 globals + 8 locals."""
        return self.n_global_crops * self.ncrops - min(self.n_global_crops, self.ncrops)

    def teacher_probabilities(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The teacher targets ``(n_global_crops * B, K)``, detached, in float32."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        if self.use_sinkhorn_knopp:
            return sinkhorn_knopp(teacher_out, teacher_temp, self.sinkhorn_iterations)
        centred = teacher_out.detach().float() - self.center
        return F.softmax(centred / teacher_temp, dim=-1)

    def _check_shapes(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> int:
        if student_out.ndim != 2 or teacher_out.ndim != 2:
            raise ValueError(
                "DINOLoss expects 2-D (crops*batch, out_dim) tensors, got "
                f"student {tuple(student_out.shape)} and teacher {tuple(teacher_out.shape)}"
            )
        if student_out.shape[1] != self.out_dim or teacher_out.shape[1] != self.out_dim:
            raise ValueError(
                f"DINOLoss built for out_dim={self.out_dim}, got student "
                f"{student_out.shape[1]} and teacher {teacher_out.shape[1]}"
            )
        if student_out.shape[0] % self.ncrops:
            raise ValueError(
                f"student rows ({student_out.shape[0]}) are not a multiple of ncrops={self.ncrops}"
            )
        batch = student_out.shape[0] // self.ncrops
        if teacher_out.shape[0] != self.n_global_crops * batch:
            raise ValueError(
                f"teacher rows ({teacher_out.shape[0]}) != n_global_crops ({self.n_global_crops})"
                f" x batch ({batch}) inferred from the student; are the crops crop-major?"
            )
        return batch

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Return the scalar loss, then update the center from ``teacher_out``.

        Computed in float32 whatever the input dtype: a 65536-way log-softmax in fp16 loses
        the small probabilities that carry most of the gradient signal.

        Instead of forming the 18 pair products one by one, this uses
        ``sum_{i, v != i} p_i . l_v = (sum_i p_i) . (sum_v l_v) - sum_{i < ncrops} p_i . l_i``
        (``p`` teacher probabilities, ``l`` student log-probabilities), which needs
        ``n_global_crops + 1`` products instead of ``n_loss_terms`` and is exactly equal.
        """
        batch = self._check_shapes(student_out, teacher_out)
        ng = self.n_global_crops
        log_p_student = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_p_student = log_p_student.view(self.ncrops, batch, self.out_dim)
        p_teacher = self.teacher_probabilities(teacher_out, teacher_temp)
        p_teacher = p_teacher.view(ng, batch, self.out_dim)

        all_pairs = (p_teacher.sum(0) * log_p_student.sum(0)).sum(-1)  # (B,)
        same_view = (p_teacher * log_p_student[:ng]).sum(dim=(0, 2))  # (B,)
        loss = -(all_pairs - same_view).mean() / self.n_loss_terms
        # Collapse diagnostics for the trainer's log; tensors, so reading them is the only sync.
        self.last_stats = collapse_stats(p_teacher.view(-1, self.out_dim), loss)

        if not self.use_sinkhorn_knopp:
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the global-batch mean of the (un-centred) teacher outputs.

        Sum and count are all-reduced together in one call, so the mean is over all samples
        of all ranks even if the per-rank batches differ (DINO divides by ``B * world_size``).
        """
        teacher = teacher_out.detach().float()
        distributed = _dist_active()
        if not distributed and teacher.shape[0] == 0:
            return
        stats = torch.cat(
            [teacher.sum(dim=0), teacher.new_full((1,), float(teacher.shape[0]))]
        ).unsqueeze(0)
        if distributed:
            dist.all_reduce(stats)
        # clamp instead of a data-dependent branch: no host sync on the accelerator.
        batch_center = stats[:, :-1] / stats[:, -1:].clamp_min(1.0)
        self.center.mul_(self.center_momentum).add_(
            batch_center.to(self.center.dtype), alpha=1.0 - self.center_momentum
        )

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, ncrops={self.ncrops}, n_global_crops={self.n_global_crops}, "
            f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
            f"sinkhorn_knopp={self.use_sinkhorn_knopp}"
        )
