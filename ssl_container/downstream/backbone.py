"""The backbone a user names, ready to evaluate: the one reading of "--weights / --model" that the
evaluations (``eval.features``), the pictures (``ssl-container visualize``) and the demo share.

``source`` is an existing path (an export folder, a run or step folder, a .safetensors or .pth file:
anything :func:`ssl_container.export.load_backbone` reads; ``which`` picks the teacher or the student,
``model`` overrides the architecture recorded there), or a model name (the Container family or any
timm model), built at random initialisation from ``seed`` unless ``pretrained`` asks for timm's
weights. With no ``source``, ``model`` names it (``container_light`` by default).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["eval_backbone"]


def eval_backbone(source: str | os.PathLike | None = None, *, model: str | None = None, which: str | None = None,
                  seed: int = 0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A backbone with no classifier, in eval mode (see the module doc for what ``source`` may be)."""
    if source is not None and Path(source).exists():
        from ssl_container.export import load_backbone

        return load_backbone(source, which, model_name=model, num_classes=0, **kwargs).eval()
    name = model or "container_light"
    if source is not None:
        import timm

        name = str(source)
        if not timm.is_model(name):
            raise FileNotFoundError(f"{name}: neither a file or folder nor a model name (ssl-container models lists "
                                    "the Container family; any timm model name works too)")
    from ssl_container.models import create_model

    torch.manual_seed(seed)
    return create_model(name, num_classes=0, pretrained=pretrained, **kwargs).eval()
