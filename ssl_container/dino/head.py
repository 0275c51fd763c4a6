"""The DINO projection head.

The head maps pooled backbone features onto ``out_dim`` prototype scores. Its shape follows the
official DINO recipe: an MLP ``in_dim -> hidden -> hidden -> bottleneck`` with GELU (optionally
BatchNorm), an L2 normalisation of the bottleneck, and a weight-normalised linear layer without bias
whose rows are the prototypes.

Why the last layer is weight-normalised with a frozen unit gain (``norm_last_layer=True``): every
logit is then the cosine between the bottleneck embedding and a prototype, bounded in [-1, 1]. The
teacher temperature (0.04) therefore sets the sharpness of the teacher distribution directly, which
is what keeps early training stable. Leaving the gain trainable lets the logit scale grow; DINO only
recommends that for small ViTs and it is off by default.

Weight normalisation uses the parametrization API (``torch.nn.utils.parametrizations.weight_norm``):
the deprecated hook version is scheduled for removal and keeps the derived weight as a non-leaf
attribute, so ``copy.deepcopy`` of a head that has run a forward pass fails (and the teacher is made
by deep-copying the student). State-dict keys are therefore ``last_layer.parametrizations.weight.original0`` (the
gain, shape ``(out_dim, 1)``) and ``...original1`` (the direction ``v``, shape ``(out_dim,
bottleneck_dim)``). PyTorch's load hook still accepts official DINO checkpoints that store
``last_layer.weight_g`` / ``last_layer.weight_v``.

Parameter count (the number reported by DINO, e.g. 22,614,272 for ``DINOHead(512)``) is the sum over
*all* parameters including the frozen gain: MLP ``512*2048+2048 + 2048*2048+2048 + 2048*256+256 =
5,771,520``, prototypes ``256*65536 = 16,777,216`` and the gain ``65,536``.

Pickling a parametrized module whole (``torch.save(model)``) is refused by PyTorch; save
``state_dict()`` instead (the checkpoint code does this anyway).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "is_last_layer_parameter_name"]


def _build_mlp(
    in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool
) -> nn.Module:
    """Build the projection MLP; ``nlayers`` counts Linear layers, as in DINO."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(dim, hidden_dim))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        dim = hidden_dim
    layers.append(nn.Linear(dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head of DINO: MLP, L2 normalisation, weight-normalised prototypes.

    Args:
        in_dim: width of the pooled backbone features.
        out_dim: number of prototypes (65536 in the official recipe).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width of the L2-normalised embedding the prototypes act on.
        nlayers: number of Linear layers in the MLP (at least 1).
        norm_last_layer: fix the weight-norm gain at 1 and exclude it from training, so
            logits are cosines (see the module docstring for why this is the default).
        use_bn: BatchNorm1d after each hidden Linear (used by the ResNet recipe).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        if in_dim <= 0 or out_dim <= 0 or hidden_dim <= 0 or bottleneck_dim <= 0:
            raise ValueError(
                "DINOHead dimensions must be positive, got "
                f"in_dim={in_dim}, out_dim={out_dim}, hidden_dim={hidden_dim}, "
                f"bottleneck_dim={bottleneck_dim}"
            )
        if nlayers < 1:
            raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.bottleneck_dim = bottleneck_dim
        self.norm_last_layer = norm_last_layer

        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        # Initialise the direction before wrapping: weight_norm then derives g = ||v|| from it,
        # and we overwrite g with 1 right after, so only the direction of v matters. A Gaussian
        # direction is uniformly distributed on the sphere (DINO uses the default uniform init
        # here, which is slightly anisotropic; the difference is immaterial).
        self.mlp.apply(self._init_weights)
        self._init_weights(last)
        self.last_layer = weight_norm(last, name="weight", dim=0)
        gain = self.last_layer_gain
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Truncated-normal (std 0.02) Linear weights and zero biases, as in DINO/timm.

        The truncation bounds of ``trunc_normal_`` are absolute (±2), i.e. 100 standard
        deviations, so this is effectively a plain normal; kept for parity with DINO.
        """
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def last_layer_gain(self) -> nn.Parameter:
        """The weight-norm gain ``g`` (shape ``(out_dim, 1)``), frozen when ``norm_last_layer``."""
        return self.last_layer.parametrizations.weight.original0

    @property
    def last_layer_direction(self) -> nn.Parameter:
        """The un-normalised prototype matrix ``v`` (shape ``(out_dim, bottleneck_dim)``)."""
        return self.last_layer.parametrizations.weight.original1

    def last_layer_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that DINO freezes during the first epoch(s) (frozen ones included).

        The optimiser groups use this to put the prototypes in their own zero-lr group while
        ``epoch < freeze_last_layer``; freezing via lr (not by editing ``.grad``) is what works
        under DeepSpeed.
        """
        return self.last_layer.parameters()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck embedding (useful for monitoring and tests)."""
        x = self.mlp(x)
        # fp16 cannot represent 1e-12; a larger eps avoids dividing by a flushed-to-zero norm.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, in_dim)`` features to ``(N, out_dim)`` prototype logits."""
        return self.last_layer(self.embed(x))

    def extra_repr(self) -> str:
        return f"norm_last_layer={self.norm_last_layer}"


def is_last_layer_parameter_name(name: str) -> bool:
    """Whether a ``named_parameters`` name belongs to a DINO head's prototype layer.

    A name-based fallback for code that only sees names (e.g. a state dict); prefer
    :meth:`DINOHead.last_layer_parameters` when the module is at hand.
    """
    return name.startswith("last_layer.") or ".last_layer." in name
