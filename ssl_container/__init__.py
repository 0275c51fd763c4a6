"""ssl_container: DINO pretraining of Container backbones, from one workstation to Slurm clusters."""
from ssl_container.export import load_backbone
from ssl_container.models import container, container_light, container_pam, create_model

__version__ = "0.1.0"

__all__ = ["container", "container_light", "container_pam", "create_model", "load_backbone", "__version__"]
