"""Model constructors, timm registration and the official-checkpoint key converter.

``import ssl_container`` registers ``container_light``, ``container`` and ``container_pam`` with timm,
so ``timm.create_model("container_light", num_classes=0)`` works, including timm's
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` for local weights (safetensors or a
``weights_only`` torch file, with official or project names).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ssl_container.models.container import Container, checkpoint_filter_fn
from ssl_container.models.official import convert_official_state_dict, is_official_state_dict

__all__ = [
    "container_light",
    "container",
    "container_pam",
    "container_light_narrow",
    "create_model",
    "list_models",
    "convert_official_state_dict",
    "is_official_state_dict",
    "MODEL_ARGS",
]

# Architecture arguments per variant. Light: static conv affinity in stages 1-3, the learned mix of
# attention and conv in stage 4 (the released network). Container: the mix in every stage. PAM:
# attention mixed with a dense token-MLP in every stage, which fixes the input size.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "container_light": dict(stage_affinities=("conv", "conv", "conv", "attention+conv")),
    "container": dict(stage_affinities=("attention+conv",) * 4),
    "container_pam": dict(stage_affinities=("attention+mlp",) * 4, img_size=224),
    # This project's, not the paper's: Container-Light's blocks, depths and stage layout at a quarter
    # of the widths, for CPU demos and small-budget recipes (about 16x fewer MACs).
    "container_light_narrow": dict(stage_affinities=("conv", "conv", "conv", "attention+conv"),
                                   embed_dims=(16, 32, 80, 128)),
}

_CFG = dict(
    url="",
    num_classes=1000,
    input_size=(3, 224, 224),
    pool_size=(7, 7),
    crop_pct=0.875,
    interpolation="bicubic",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    first_conv="stages.0.patch_embed.proj",
    classifier="head",
    license="apache-2.0",
)


def _check_recorded_digest(path: str) -> None:
    """A weights file inside one of this project's step or export folders must match the sha256 its
    meta.json recorded when it was written (the trainer refuses such a file; so does timm loading).
    Plain files without that record are taken as they are."""
    import hashlib
    import json
    from pathlib import Path

    file = Path(path)
    meta_path = file.parent / "meta.json"
    if not (file.is_file() and meta_path.is_file()):
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return
    recorded = (meta.get("files") or {}).get(file.name) or {}
    if not recorded and file.name in ("backbone.safetensors", "model.safetensors"):
        recorded = meta.get("weights") or {}
    want = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not want:
        return
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        raise RuntimeError(f"{file} does not match the sha256 recorded in {meta_path} when it was written: it is "
                           "damaged. Use an older checkpoint or restore the file from a copy.")


def _build(variant: str, pretrained: bool = False, **kwargs: Any) -> Container:
    args = {**MODEL_ARGS[variant], **kwargs}
    overlay = args.get("pretrained_cfg_overlay") or {}
    if pretrained and isinstance(overlay, dict) and overlay.get("file"):
        _check_recorded_digest(overlay["file"])
    cfg = args.get("pretrained_cfg") or {}
    cfg = cfg if isinstance(cfg, dict) else getattr(cfg, "__dict__", {})
    if pretrained and cfg.get("source") == "local-dir" and cfg.get("file"):
        # timm.create_model("local-dir:EXPORT", pretrained=True): the README's fine-tuning path. timm reads
        # model.safetensors (else pytorch_model.bin) from the folder; check it before timm loads it.
        from pathlib import Path

        for name in ("model.safetensors", "pytorch_model.bin"):
            if (Path(cfg["file"]) / name).is_file():
                _check_recorded_digest(str(Path(cfg["file"]) / name))
                break
    try:
        from timm.models import build_model_with_cfg
    except ImportError:  # timm is a dependency, but keep the models usable without it
        if pretrained:
            raise RuntimeError("pretrained=True needs timm; use ssl_container.load_backbone(PATH) instead")
        args.pop("pretrained_cfg", None)
        args.pop("pretrained_cfg_overlay", None)
        return Container(**args)
    return build_model_with_cfg(
        Container,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **args,
    )


def container_light(pretrained: bool = False, **kwargs: Any) -> Container:
    """Container-Light as released (20.12M backbone parameters, 3.848 GMACs at 224)."""
    return _build("container_light", pretrained, **kwargs)


def container(pretrained: bool = False, **kwargs: Any) -> Container:
    """CONTAINER: attention mixed with depthwise conv in all four stages (paper, no released code)."""
    return _build("container", pretrained, **kwargs)


def container_pam(pretrained: bool = False, **kwargs: Any) -> Container:
    """CONTAINER-PAM: attention mixed with a dense token-MLP in all stages; fixed input size."""
    return _build("container_pam", pretrained, **kwargs)


def container_light_narrow(pretrained: bool = False, **kwargs: Any) -> Container:
    """This project's quarter-width Container-Light (widths 16/32/80/128, same blocks and depths):
    not a network of the paper; for CPU demos and small-budget pretraining."""
    return _build("container_light_narrow", pretrained, **kwargs)


_CONSTRUCTORS: dict[str, Callable[..., Container]] = {
    "container_light": container_light,
    "container": container,
    "container_pam": container_pam,
    "container_light_narrow": container_light_narrow,
}


def list_models() -> list[str]:
    return sorted(_CONSTRUCTORS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Our models by name; any other name goes to timm (e.g. ``vit_small_patch16_224``)."""
    if name in _CONSTRUCTORS:
        return _CONSTRUCTORS[name](**kwargs)
    import timm

    if not timm.list_models(name):
        raise ValueError(f"unknown model '{name}': use one of {list_models()} or any timm model name")
    return timm.create_model(name, **kwargs)


def _register_with_timm() -> None:
    try:
        from timm.models import generate_default_cfgs, is_model, register_model
    except ImportError:  # pragma: no cover - timm is a hard dependency
        return
    default_cfgs = generate_default_cfgs({name: dict(_CFG) for name in _CONSTRUCTORS})
    import sys

    module = sys.modules[__name__]
    module.default_cfgs = default_cfgs  # timm reads the variant's cfg from its module
    for name, fn in _CONSTRUCTORS.items():
        if not is_model(name):
            register_model(fn)


_register_with_timm()
