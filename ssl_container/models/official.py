"""Official allenai/container checkpoint names -> this project's (420 entries, nothing dropped)."""
from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["convert_official_state_dict", "is_official_state_dict"]

_OFFICIAL_BLOCK_RULES: list[tuple[str, str]] = [
    (r"pos_embed\.", "pos_embed."),
    (r"norm1\.", "norm1."),
    (r"norm2\.", "norm2."),
    (r"conv1\.", "aggregation.input_proj."),
    (r"conv2\.", "aggregation.output_proj."),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
]


def is_official_state_dict(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith(("patch_embed1.", "blocks1.")) for k in state_dict)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official allenai/container ``state_dict`` (420 entries) to this project's names.

    The official code calls the 5x5 depthwise convolution ``attn`` in conv blocks and ``conv`` in
    mixed blocks, and the mixing gate ``sa_weight``; here they are the affinity's ``conv`` and
    ``mix_logit``. Stages 1-4 become ``stages.0-3``. Unknown keys raise, naming the key, rather than
    being silently dropped.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    # Which stages hold mixed blocks is read from the checkpoint itself (a ``sa_weight`` present).
    mixed_stages = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks(\d)\.\d+\.sa_weight$", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = _convert_key(key, mixed_stages)
        if new is None:
            raise KeyError(
                f"unexpected key '{key}' in what looks like an official Container checkpoint; "
                "expected patch_embed{1..4}, blocks{1..4}, norm and head entries"
            )
        out[new] = value
    return out


def _convert_key(key: str, mixed_stages: set[int]) -> str | None:
    if m := re.match(r"patch_embed(\d)\.(proj|norm)\.(.+)$", key):
        return f"stages.{int(m.group(1)) - 1}.patch_embed.{m.group(2)}.{m.group(3)}"
    if key.startswith(("norm.", "head.")):
        return key
    m = re.match(r"blocks(\d)\.(\d+)\.(.+)$", key)
    if not m:
        return None
    stage, idx, rest = int(m.group(1)), m.group(2), m.group(3)
    prefix = f"stages.{stage - 1}.blocks.{idx}."
    mixed = stage in mixed_stages
    if rest == "sa_weight":
        return prefix + "aggregation.affinity.mix_logit"
    if mixed and rest.startswith("conv."):
        return prefix + "aggregation.affinity.static_affinity.conv." + rest[len("conv.") :]
    if not mixed and rest.startswith("attn."):
        return prefix + "aggregation.affinity.conv." + rest[len("attn.") :]
    for pattern, repl in _OFFICIAL_BLOCK_RULES:
        if re.match(pattern, rest):
            return prefix + re.sub("^" + pattern, repl, rest)
    return None
