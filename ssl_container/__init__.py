"""ssl_container: DINO pretraining of Container backbones, from one workstation to Slurm clusters.

``import ssl_container`` registers the Container models with timm (so ``timm.create_model`` knows
them); everything else loads when first used.
"""
from ssl_container.models import container, container_light, container_pam, create_model

__version__ = "0.1.0"

__all__ = ["container", "container_light", "container_pam", "create_model", "load_backbone", "__version__"]


def __getattr__(name: str):
    if name == "load_backbone":  # the checkpoint readers are not needed to build a model
        from ssl_container.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'ssl_container' has no attribute {name!r}")
