"""The methods' config sections, without torch (``ssl_container.config`` composes them into the run
config): ``method`` picks one of ``METHOD_NAMES``; ``distill.*`` configures distillation. DINO's own
sections (``dino.*``, ``head.*``) live beside its tensors in ``ssl_container/dino/config.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ssl_container.utils.checks import check_fields

__all__ = ["METHOD_NAMES", "DistillConfig"]

METHOD_NAMES = ("dino", "distill")


@dataclass
class DistillConfig:
    """``method: distill``: the student (``model.*``) learns to reproduce a frozen pretrained backbone's
    features on the same crops.

    ``teacher``: an export folder, a run or step folder (``which`` picks its teacher or student), a
    .safetensors / .pth file (``teacher_model`` names the architecture when the file does not), or a model
    name whose weights timm finds locally. ``global_weight`` / ``patch_weight``: the weights of the pooled
    feature's and the feature map's cosine losses."""

    teacher: str = ""
    which: str = "teacher"
    teacher_model: Optional[str] = None
    global_weight: float = 1.0
    patch_weight: float = 1.0

    def __post_init__(self) -> None:
        check_fields(self, "distill", non_negative=("global_weight", "patch_weight"),
                     choices={"which": ("teacher", "student")})
        if self.global_weight == 0 and self.patch_weight == 0:
            raise ValueError("config keys 'distill.global_weight' and 'distill.patch_weight' are both 0: "
                             "the student would learn nothing")
