"""Self-supervised methods: what a step computes, beside the trainer that runs it.

A method (:class:`~ssl_container.methods.base.Method`) is an ``nn.Module`` that builds the student the
trainer puts in its engine and owns everything else of the method: its teacher, its losses and their
state (DINO's centre). The trainer (``trainer/run.py``) knows methods only through this registry and the
base class, so adding one is a module here, its config section (``methods/config.py``) and a test.

    method: dino       DINO (the default): EMA teacher, multi-crop, centring; ``dino.*``, ``head.*``
    method: distill    distillation from a frozen pretrained backbone; ``distill.*``

This module stays free of torch (the config reads the names); a method's module loads when it is built.
"""
from __future__ import annotations

import importlib
from typing import Any

from ssl_container.methods.config import METHOD_NAMES

__all__ = ["METHOD_NAMES", "build_method"]

_CLASSES = {"dino": "ssl_container.methods.dino:DINOMethod", "distill": "ssl_container.methods.distill:DistillMethod"}
assert set(_CLASSES) == set(METHOD_NAMES)


def build_method(cfg: Any) -> Any:
    """The method ``cfg.method`` names, built from the run config (each method reads its own sections)."""
    module, name = _CLASSES[cfg.method].split(":")
    return getattr(importlib.import_module(module), name).from_config(cfg)
