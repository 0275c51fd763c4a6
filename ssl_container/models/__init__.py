"""Container backbones: plain nn.Modules with timm's API, registered with timm on import."""
from ssl_container.models.affinity import (
    Affinity,
    AttentionAffinity,
    ContextAggregation,
    DepthwiseConvAffinity,
    MixedAffinity,
    TokenMLPAffinity,
)
from ssl_container.models.container import Container, ContainerBlock
from ssl_container.models.registry import (
    MODEL_ARGS,
    container,
    container_light,
    container_light_narrow,
    container_pam,
    convert_official_state_dict,
    create_model,
    is_official_state_dict,
    list_models,
)

__all__ = [
    "Affinity",
    "AttentionAffinity",
    "Container",
    "ContainerBlock",
    "ContextAggregation",
    "DepthwiseConvAffinity",
    "MixedAffinity",
    "TokenMLPAffinity",
    "MODEL_ARGS",
    "container",
    "container_light",
    "container_light_narrow",
    "container_pam",
    "convert_official_state_dict",
    "create_model",
    "is_official_state_dict",
    "list_models",
]
