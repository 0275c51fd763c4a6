"""ssl_container: DINO pretraining of Container backbones, from one workstation to Slurm clusters.

``import ssl_container`` makes the Container models known to timm (``timm.create_model`` and
``local-dir:`` / ``hf-hub:`` exports find them) without importing torch itself: importing torch and
timm takes about 5 s, and the command line (``ssl-container --help``, ``--print-config``,
``--dry-run``) must answer at once. So the models register when timm is imported, whether before
or after this package, and everything else loads when first used.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

__all__ = ["container", "container_light", "container_pam", "create_model", "load_backbone", "__version__"]

_MODEL_NAMES = ("container", "container_light", "container_pam", "create_model")


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("ssl_container.models"), name)
    if name == "load_backbone":
        return importlib.import_module("ssl_container.export").load_backbone
    raise AttributeError(f"module 'ssl_container' has no attribute {name!r}")


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds ``timm`` as the normal finders do, and once its module has run, imports
    ``ssl_container.models`` (whose ``@register_model`` decorators add the Container family)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module):
            run_timm(module)
            _uninstall()
            importlib.import_module("ssl_container.models")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimm)]


if "timm" in sys.modules:
    importlib.import_module("ssl_container.models")
elif not any(isinstance(f, _RegisterAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTimm())
