"""DINOv2's KoLeo regulariser: spread the student's features uniformly over the sphere.

The Kozachenko-Leonenko differential-entropy estimator (Sablayrolles et al. 2019, used by DINOv2)
is, up to constants, ``-1/n sum_i log d_i`` with ``d_i`` the distance of the L2-normalised feature
``x_i`` to its nearest neighbour in the batch. Minimising it pushes features apart, which is what a
short run with small batches needs most: without it, early DINO features crowd into a small cone
(the k-NN vote then sees every image as a neighbour of every other).

Edge cases are defined rather than left to chance: a batch of one sample has no neighbour and
contributes 0; duplicated samples sit at distance 0, where ``eps`` keeps the value (about
``-log(eps)``) and its gradient finite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of a ``(n, d)`` batch of features (any norm; normalised here), a 0-d float32 tensor."""
    if x.ndim != 2:
        raise ValueError(f"koleo_loss expects (n, d) features, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        return x.float().sum() * 0.0  # no neighbour; keeps the graph so backward still works
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-3.0)  # below any cosine: a sample is never its own neighbour
        neighbour = sims.argmax(dim=1)
    # pairwise_distance adds eps inside the norm: duplicates get a finite gradient.
    distances = F.pairwise_distance(x, x[neighbour], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
