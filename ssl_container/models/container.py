"""The CONTAINER family as plain ``nn.Module``s with timm's model API.

Four stages, each a patch embedding (strided convolution + per-token LayerNorm) followed by blocks
of the shape shared by every variant:

    x = x + DWConv3x3(x)                                   conditional position encoding
    x = x + DropPath(ContextAggregation(BN(x)))            token mixing (the affinity differs)
    x = x + DropPath(MLP(BN(x)))                           channel mixing, 1x1 convolutions

The variants differ only in which affinity each stage's blocks use (``stage_affinities``):
``"conv"`` (static depthwise 5x5), ``"attention+conv"`` (Container's mix), ``"attention+mlp"``
(Container-PAM's mix), and also plain ``"attention"`` and ``"mlp"`` for experiments.

Nothing here knows about distribution, precision or data; the trainer applies those from outside.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_container.models.affinity import (
    Affinity,
    AttentionAffinity,
    ContextAggregation,
    DepthwiseConvAffinity,
    MixedAffinity,
    TokenMLPAffinity,
)
from ssl_container.models.official import convert_official_state_dict, is_official_state_dict

__all__ = ["Container", "ContainerBlock", "ContainerStage", "DropPath", "PatchEmbed", "ConvMlp", "STRIDE"]

STRIDE = 32  # 4 * 2 * 2 * 2: the total downsampling of the four patch embeddings


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the residual branch of whole images), with timm's
    attributes (``drop_prob``, ``scale_by_keep``) and behaviour.

    The rate also lives in a 0-d buffer that the training forward reads as a tensor: ``torch.compile``
    then builds one graph for all blocks of a stage, where a Python float would be a constant that
    recompiles every block (the rate differs block to block). Non-persistent: state dicts don't hold it.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("_rate", torch.tensor(float(drop_prob)), persistent=False)
        self._drop_prob = float(drop_prob)

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        self._drop_prob = float(value)
        self._rate.fill_(float(value))

    scale_by_keep = True  # as timm's default: kept samples are scaled by 1 / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (not torch.compiler.is_compiling() and self._drop_prob == 0.0):
            return x
        keep = 1.0 - self._rate
        mask = (torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep).to(x.dtype)
        return x * (mask / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self._drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Non-overlapping strided convolution, then LayerNorm over channels at every position."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        # LayerNorm over C of a (B, C, H, W) map, without a copy through (B, N, C).
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """Channel MLP as two 1x1 convolutions (C -> ratio*C -> C) with GELU."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def build_affinity(kind: str, dim: int, num_heads: int, grid: tuple[int, int] | None, mlp_heads: int = 1) -> Affinity:
    """Affinity by name; ``grid`` (tokens per side) is needed only by the token-MLP kinds."""

    def token_mlp() -> TokenMLPAffinity:
        if grid is None:
            raise ValueError(f"affinity '{kind}' needs a fixed input size: pass img_size to the model")
        return TokenMLPAffinity(grid[0] * grid[1], num_heads=mlp_heads, grid=grid)

    if kind == "conv":
        return DepthwiseConvAffinity(dim, kernel_size=5)
    if kind == "attention":
        return AttentionAffinity(dim, num_heads)
    if kind == "mlp":
        return token_mlp()
    if kind == "attention+conv":
        return MixedAffinity(AttentionAffinity(dim, num_heads), DepthwiseConvAffinity(dim, kernel_size=5))
    if kind == "attention+mlp":
        return MixedAffinity(AttentionAffinity(dim, num_heads), token_mlp())
    raise ValueError(
        f"unknown affinity '{kind}': choose from conv, attention, mlp, attention+conv, attention+mlp"
    )


class ContainerBlock(nn.Module):
    """Position encoding, context aggregation and channel MLP, each as a residual branch."""

    def __init__(self, dim: int, affinity: Affinity, mlp_ratio: float, drop_path: float = 0.0, drop: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.aggregation = ContextAggregation(dim, affinity)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.aggregation(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ContainerStage(nn.Module):
    def __init__(self, patch_embed: PatchEmbed, blocks: Sequence[ContainerBlock]) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


class Container(nn.Module):
    """CONTAINER backbone + optional classifier, following timm's model conventions.

    ``forward_features`` returns the final normalised map (B, 512, H/32, W/32); ``forward_head``
    pools it (``pre_logits=True`` stops there); ``forward`` = both. Inputs must have sides
    divisible by 32, except for token-MLP variants, which take exactly ``img_size``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 8, 3),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        patch_sizes: Sequence[int] = (4, 2, 2, 2),
        head_dim: int = 32,
        stage_affinities: Sequence[str] = ("conv", "conv", "conv", "attention+conv"),
        mlp_heads: int = 1,
        img_size: int | tuple[int, int] | None = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(mlp_ratios) == len(patch_sizes) == len(stage_affinities):
            raise ValueError("embed_dims, depths, mlp_ratios, patch_sizes and stage_affinities need one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.stage_affinities = tuple(stage_affinities)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else (tuple(img_size) if img_size else None)
        self.drop_rate = drop_rate

        # Stochastic depth rises linearly over all blocks of all stages.
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, in_dim, stride, first = [], in_chans, 1, 0
        self.feature_info = []
        for i, (dim, depth, ratio, patch, kind) in enumerate(
            zip(embed_dims, depths, mlp_ratios, patch_sizes, stage_affinities)
        ):
            stride *= patch
            grid = (self.img_size[0] // stride, self.img_size[1] // stride) if self.img_size else None
            blocks = [
                ContainerBlock(
                    dim,
                    build_affinity(kind, dim, max(dim // head_dim, 1), grid, mlp_heads),
                    ratio,
                    drop_path=rates[first + j],
                    drop=proj_drop_rate,
                )
                for j in range(depth)
            ]
            first += depth
            stages.append(ContainerStage(PatchEmbed(in_dim, dim, patch), blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.ModuleList(stages)
        self.total_stride = stride
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As released: only Linear layers and LayerNorms are initialised; convs and BNs keep defaults.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------
    # input checks
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"Container expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.img_size is not None and (h, w) != self.img_size:
            raise ValueError(
                f"this model's token-MLP affinities are fixed to {self.img_size[0]}x{self.img_size[1]} inputs, "
                f"got {h}x{w}: resize the input, or rebuild the model with img_size=({h}, {w})"
            )
        if h % self.total_stride or w % self.total_stride:
            def near(s: int) -> int:
                return max(self.total_stride, round(s / self.total_stride) * self.total_stride)
            raise ValueError(
                f"Container needs input height and width divisible by {self.total_stride} (its total patch "
                f"stride), got {h}x{w}: resize or pad to e.g. {near(h)}x{near(w)}"
            )

    # ----------------------------------------------------------------------------------------------
    # timm API
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (64/128/320/512 channels at strides 4/8/16/32) and, unless
        ``intermediates_only``, the final normalised map. ``indices``: an int n takes the last n
        stages, a sequence takes those stages (negative allowed). ``norm`` applies the final
        BatchNorm to the last stage's map, as timm does for models with a final norm."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = _resolve_indices(indices, len(self.stages))
        self._check_input(x)
        intermediates = []
        last = max(take) if (stop_early or intermediates_only) else len(self.stages) - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                y = self.norm(x) if (norm and i == len(self.stages) - 1) else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        if last == len(self.stages) - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one ``indices`` needs (timm API)."""
        take = _resolve_indices(indices, len(self.stages))
        self.stages = self.stages[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The mixing gates are scalars whose decay would pull every block toward an even mix.
        return {name for name, _ in self.named_parameters() if name.endswith("mix_logit")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)\.patch_embed", (0,)), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_drop_path_rate(self, rate: float) -> None:
        """Re-spread stochastic depth 0 -> rate over all blocks (e.g. 0 for evaluation-time finetunes)."""
        blocks = [b for s in self.stages for b in s.blocks]
        for block, p in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
            block.drop_path.drop_prob = p


def _resolve_indices(indices: int | Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: take between 1 and {n} stages")
        return list(range(n - indices, n))
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"stage indices {bad} out of range for {n} stages")
    return sorted(i % n for i in indices)


def checkpoint_filter_fn(state_dict: dict, model: Container) -> dict:
    """Accept the official allenai/container names as well as ours (used by timm's pretrained path)."""
    if "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    elif "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    if model.num_classes == 0:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    return state_dict

