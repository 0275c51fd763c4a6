"""Parameter and compute counts, measured the way the specs quote them.

GMACs are ``torch.utils.flop_counter`` FLOPs / 2 for one image. Container models are stock PyTorch
(plain convolutions, attention as matmul + softmax), so any standard counter gives the same figure.
For timm's ViTs, whose attention runs PyTorch's fused CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``, no FLOP formula registered), the standard SDPA
formula is supplied; without it their attention would count as free.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import flop_counter


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _custom_mapping() -> dict[Any, Any]:
    # FlopCounterMode wraps custom formulas itself: they receive shapes, not tensors.
    formulas = {"_scaled_dot_product_flash_attention_for_cpu": _cpu_sdpa_flops}
    return {getattr(torch.ops.aten, name): f for name, f in formulas.items() if hasattr(torch.ops.aten, name)}


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a single image (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, in_chans, *input_size, device=device)
        with flop_counter.FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            model(x)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


def describe(name: str, sizes: Iterable[int] = (224, 96), **kwargs: Any) -> dict[str, Any]:
    """Parameters and GMACs of a registered model (backbone only unless num_classes is given).

    Token-MLP models (container_pam) are tied to one input size, so they are built once per size and
    their parameter count is reported per size too."""
    from ssl_container.models.registry import create_model

    kwargs.setdefault("num_classes", 0)
    per_size = name == "container_pam"
    row: dict[str, Any] = {"model": name, "params": None, "gmacs": {}}
    model = None
    for size in sizes:
        if model is None or per_size:
            model = create_model(name, **({"img_size": size, **kwargs} if per_size else kwargs))
        if per_size:
            row.setdefault("params_by_size", {})[str(size)] = count_parameters(model)
        if row["params"] is None:
            row["params"] = count_parameters(model)
        row["gmacs"][str(size)] = round(count_macs(model, (size, size)) / 1e9, 4)
    return row


# The order the table prints: the paper's three, then this project's quarter-width demo network.
TABLE_MODELS = ("container_light", "container", "container_pam", "container_light_narrow")


def describe_models(sizes: Iterable[int] = (224, 96)) -> list[dict[str, Any]]:
    """The family's rows (``describe``) in the order the command line prints them."""
    return [describe(name, list(sizes)) for name in TABLE_MODELS]
