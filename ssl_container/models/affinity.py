"""The unified context-aggregation block of the CONTAINER paper, with pluggable affinities.

The paper's observation: a Transformer's self-attention, a depthwise convolution and an MLP-Mixer's
token mixing all compute ``Y = Concat(A_1 V_1, ..., A_M V_M) W1`` with ``V = X W2`` and differ only in
the N x N affinity ``A`` that mixes tokens (never channels). This module keeps that structure literal:

* :class:`ContextAggregation` owns the channel projections ``W2`` (``input_proj``, which also produces
  queries and keys when the affinity is dynamic) and ``W1`` (``output_proj``);
* an affinity owns only the token mixing, and can always materialise its dense ``A`` (``dense``) so
  tests and visualisations can check the fast path against the textbook formula.

Everything works on (B, C, H, W) maps; tokens are the H*W positions in row-major order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "Affinity",
    "AttentionAffinity",
    "DepthwiseConvAffinity",
    "TokenMLPAffinity",
    "MixedAffinity",
    "ContextAggregation",
]


class Affinity(nn.Module):
    """Base class: mixes the tokens of ``v`` (B, C, H, W), head by head, never across channels.

    ``dynamic`` affinities depend on the input and need queries and keys; static ones ignore them.
    ``num_heads`` is M in the paper: channels are split into M contiguous groups that share one A.
    """

    dynamic: bool = False
    num_heads: int = 1

    def forward(self, v: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, v: torch.Tensor, q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> torch.Tensor:
        """The affinity as explicit matrices, shape (B, M, N, N): slow, for tests and pictures."""
        raise NotImplementedError


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, M, N, C/M): the head layout of ``Concat(A_m V_m)``."""
    b, c, h, w = x.shape
    return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2)


def _merge_heads(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, M, N, d) -> (B, M*d, H, W), inverse of :func:`_split_heads`."""
    b, m, n, d = x.shape
    return x.transpose(-1, -2).reshape(b, m * d, h, w)


class AttentionAffinity(Affinity):
    """Dynamic affinity ``softmax(Q_m K_m^T / sqrt(d))``.

    Written out as matmul + softmax rather than ``F.scaled_dot_product_attention``: Container attends
    only in its last stage (49 tokens at 224 px, 4 at 64 px), where a fused kernel gains nothing, and
    the explicit form is what every exporter and FLOP counter understands (PyTorch's CPU flash
    kernel has no FLOP formula, so standard counters would report the attention as free)."""

    dynamic = True

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def forward(self, v, q=None, k=None):
        _, _, h, w = v.shape
        qh, kh, vh = (_split_heads(t, self.num_heads) for t in (q, k, v))
        attn = torch.softmax((qh * self.head_dim ** -0.5) @ kh.transpose(-1, -2), dim=-1)
        return _merge_heads(attn @ vh, h, w)

    def dense(self, v, q=None, k=None):
        qh, kh = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads)
        return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class DepthwiseConvAffinity(Affinity):
    """Static local affinity ``A_mij = Ker[m, i - j]`` for ``|i - j| <= k``: a depthwise convolution.

    One head per channel (M = C). The convolution's bias is kept because the released network has it;
    it adds a constant per channel, so ``dense`` reports the affinity of the bias-free operator.
    """

    def __init__(self, dim: int, kernel_size: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = dim
        if kernel_size % 2 != 1:
            raise ValueError(f"DepthwiseConvAffinity needs an odd kernel_size ('same' padding), got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    def forward(self, v, q=None, k=None):
        return self.conv(v)

    def dense(self, v, q=None, k=None):
        b, c, h, w = v.shape
        n = h * w
        # Push each token's one-hot through the (bias-free) conv: column j of A is the response to e_j.
        eye = torch.eye(n, dtype=v.dtype, device=v.device).reshape(n, 1, h, w).expand(n, c, h, w)
        cols = F.conv2d(eye, self.conv.weight.to(v.dtype), None, padding=self.conv.padding, groups=c)
        a = cols.reshape(n, c, n).permute(1, 2, 0)  # (C, N_out, N_in)
        return a.unsqueeze(0).expand(b, c, n, n)


class TokenMLPAffinity(Affinity):
    """Static dense affinity ``A = W_MLP^T`` (N x N, learned): MLP-Mixer's token mixing.

    It is tied to one token count, so the input size is fixed at construction. With ``num_heads > 1``
    each channel group gets its own matrix (the paper's MH-MLP).
    """

    def __init__(self, num_tokens: int, num_heads: int = 1, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.grid = grid
        # Same scale as nn.Linear(N, N)'s default initialisation, which MLP-Mixer uses.
        bound = 1.0 / math.sqrt(num_tokens)
        self.weight = nn.Parameter(torch.empty(num_heads, num_tokens, num_tokens).uniform_(-bound, bound))

    def forward(self, v, q=None, k=None):
        _, c, h, w = v.shape
        if h * w != self.num_tokens:
            where = f" ({self.grid[0]}x{self.grid[1]})" if self.grid else ""
            raise ValueError(
                f"a token-MLP affinity is fixed to {self.num_tokens} tokens{where} but got a {h}x{w} map; "
                "token-MLP models (container_pam) only accept the img_size they were built with: "
                "resize the input or rebuild the model with img_size=<your size>"
            )
        vh = _split_heads(v, self.num_heads)  # (B, M, N, d)
        return _merge_heads(torch.matmul(self.weight, vh), h, w)

    def dense(self, v, q=None, k=None):
        return self.weight.unsqueeze(0).expand(v.shape[0], -1, -1, -1)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, num_heads={self.num_heads}"


class MixedAffinity(Affinity):
    """CONTAINER's ``alpha * A_dynamic + beta * A_static`` with a learned convex gate.

    The released code parametrises (alpha, beta) as (sigmoid(w), 1 - sigmoid(w)) with one scalar ``w``
    per block, initialised to 0 (an even mix). Both affinities act on the same V.
    """

    def __init__(self, dynamic: Affinity, static: Affinity) -> None:
        super().__init__()
        if not dynamic.dynamic or static.dynamic:
            raise ValueError("MixedAffinity takes one dynamic and one static affinity")
        self.dynamic_affinity = dynamic
        self.static_affinity = static
        self.num_heads = dynamic.num_heads
        self.mix_logit = nn.Parameter(torch.zeros(1))

    @property
    def dynamic(self) -> bool:  # type: ignore[override]
        return True

    def forward(self, v, q=None, k=None):
        alpha = torch.sigmoid(self.mix_logit)
        return alpha * self.dynamic_affinity(v, q, k) + (1 - alpha) * self.static_affinity(v)

    def dense(self, v, q=None, k=None):
        """Per-channel (B, C, N, N) since the two parts may have different head counts."""
        alpha = torch.sigmoid(self.mix_logit).to(v.dtype)
        c = v.shape[1]
        dyn = self.dynamic_affinity.dense(v, q, k).repeat_interleave(c // self.dynamic_affinity.num_heads, dim=1)
        sta = self.static_affinity.dense(v).repeat_interleave(c // self.static_affinity.num_heads, dim=1)
        return alpha * dyn + (1 - alpha) * sta


class ContextAggregation(nn.Module):
    """``Y = Concat(A_m V_m) W1``: the paper's general block (the residual ``+ X`` is the caller's).

    ``input_proj`` is a 1x1 convolution producing V (= X W2), preceded by queries and keys when the
    affinity is dynamic, in the released network's channel order [Q | K | V]. ``output_proj`` is W1.
    """

    def __init__(self, dim: int, affinity: Affinity, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.affinity = affinity
        width = 3 * dim if affinity.dynamic else dim
        self.input_proj = nn.Conv2d(dim, width, 1, bias=bias)
        self.output_proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """X -> (V, Q, K); Q and K are None for static affinities."""
        p = self.input_proj(x)
        if not self.affinity.dynamic:
            return p, None, None
        q, k, v = p.split(self.dim, dim=1)
        return v, q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v, q, k = self.project(x)
        return self.output_proj(self.affinity(v, q, k))

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The same block through the materialised affinity matrices (slow; tests and the unified view)."""
        v, q, k = self.project(x)
        b, c, h, w = v.shape
        a = self.affinity.dense(v, q, k)  # (B, M, N, N), M divides C
        heads = a.shape[1]
        vh = _split_heads(v, heads)
        mixed = _merge_heads(a @ vh, h, w)
        if isinstance(self.affinity, DepthwiseConvAffinity) and self.affinity.conv.bias is not None:
            mixed = mixed + self.affinity.conv.bias.view(1, -1, 1, 1)
        if isinstance(self.affinity, MixedAffinity):
            static = self.affinity.static_affinity
            if isinstance(static, DepthwiseConvAffinity) and static.conv.bias is not None:
                beta = 1 - torch.sigmoid(self.affinity.mix_logit)
                mixed = mixed + beta * static.conv.bias.view(1, -1, 1, 1)
        return self.output_proj(mixed)
