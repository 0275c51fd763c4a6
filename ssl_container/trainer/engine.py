"""The student inside a DeepSpeed engine, the EMA teacher beside it, and DeepSpeed's config dict.

Choices that follow from DINO's structure (dino.md, local_slurm.md):

* The teacher stays outside the engine in fp32: DeepSpeed's bf16/fp16 modes cast the whole wrapped
  module, and the teacher must be an EMA of fp32 weights.
* ``bf16`` is realised with DeepSpeed's ``torch_autocast`` mode, which keeps the parameters in fp32
  (so the EMA reads them directly) and runs convolutions and matmuls in bf16. ``fp16`` uses
  DeepSpeed's loss-scaled fp16 mode, whose fp32 master weights are fetched for the EMA.
* The optimizer is plain ``torch.optim.AdamW``/``SGD`` with its fused kernels (CUDA and, since
  torch 2.4, CPU, where the foreach path falls back to several per-tensor passes) handed to
  DeepSpeed, so nothing is JIT-compiled; the schedules write lr and weight decay into its groups
  every step.
* Under ZeRO-0 (the default) the student's parameters and gradients live in contiguous buffers
  (``flat.FlatParameters``) and the trainer averages and clips the gradients there, one call each,
  instead of DeepSpeed's per-parameter all-reduce buckets and clipping loop (so the DeepSpeed config
  saved in the run folder says ``gradient_clipping: 0`` for ZeRO-0: the clipping happens, outside it).
  Each parameter group is packed on its own and the optimizer updates it as one tensor
  (``FlatParameters.take_over``); its ``state_dict`` keeps the per-parameter format.
  ZeRO-1/2 pack the parameters into DeepSpeed's own partitions and clip there.
* The teacher's EMA runs over whole storages (``flat.FlatEMA``), whichever stage packed the student.
* Checkpoints are read back with ``torch.load(weights_only=True)``, allowing only the few DeepSpeed
  classes its own files contain: resuming never unpickles arbitrary objects.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterable

import torch
from torch import nn

from ssl_container.config import EngineConfig, OptimConfig
from ssl_container.trainer.flat import FlatEMA, FlatParameters
from ssl_container.run_folder import CheckpointError, is_unsafe_pickle

log = logging.getLogger(__name__)

__all__ = [
    "select_device",
    "effective_precision",
    "build_deepspeed_config",
    "build_optimizer",
    "initialize_engine",
    "TeacherEMA",
    "owns_gradients",
    "autocast_context",
]


def select_device(cfg: EngineConfig, local_rank: int = 0) -> torch.device:
    want = cfg.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("engine.device=cuda but no CUDA device is visible; use engine.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def effective_precision(cfg: EngineConfig, device: torch.device) -> str:
    """bf16/fp16 need an accelerator to pay off (DeepSpeed refuses fp16 on CPU): fall back to fp32."""
    precision = cfg.precision
    if device.type == "cpu" and precision != "fp32":
        log.info("engine.precision=%s requested on CPU: training in fp32 instead", precision)
        return "fp32"
    return precision


def build_deepspeed_config(cfg: EngineConfig, micro_batch: int, clip_grad: float, world_size: int,
                           device: torch.device, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's JSON config from the engine section and the run's batch per rank and clipping norm
    (saved beside the run config in the run folder)."""
    precision = effective_precision(cfg, device)
    micro = micro_batch
    accum = cfg.grad_accum_steps
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(clip_grad),
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # ZeRO-1/2 re-point every parameter into one flat buffer; packed without padding, a
            # parameter after an odd-sized one starts off a 16-byte boundary and cuDNN's kernels
            # fault on it ("misaligned address"). Padding each to 16 bytes costs a few bytes a tensor.
            **({"parameter_alignment": True} if cfg.zero_stage in (1, 2) else {}),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own metrics log; keep DeepSpeed's console quiet
        "wall_clock_breakdown": False,
        # A universal checkpoint re-partitions ZeRO optimizer states for another number of ranks.
        "checkpoint": {"tag_validation": "Warn", "load_universal": load_universal},
    }
    if precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return ds


def build_optimizer(cfg: OptimConfig, param_groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimizer section's AdamW / SGD (fused kernels) over ``param_groups``; ``lr`` is the starting
    value only: the schedules set lr and weight decay in every group each step."""
    # DeepSpeed's elastic ZeRO checkpoints record a per-group "step" (its own optimizers keep one);
    # torch's keep it per parameter, so give the groups a placeholder for the format's sake.
    for group in param_groups:
        group.setdefault("step", 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.betas), fused=True)
    return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum, fused=True)


def _deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed's own checkpoint files pickle besides tensors and containers."""
    found: list[Any] = []
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.checkpoint.constants", ()),
    ]
    import importlib

    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(getattr(module, n) for n in names if hasattr(module, n))
    return found


def _unpadded_layout_as_old(state: Any) -> Any:
    """A ZeRO optimizer file saved without parameter alignment by a DeepSpeed that records its layout
    (>= 0.19.7: all paddings 0) is refused by the aligned engine as a layout mismatch. Without the
    record, DeepSpeed takes it for an older unpadded checkpoint and re-pads it on load, which is what
    it is: drop the all-zero record so runs saved before the alignment fix resume."""
    optim = state.get("optimizer_state_dict") if isinstance(state, dict) else None
    paddings = optim.get("param_alignment_paddings") if isinstance(optim, dict) else None
    if paddings is not None and not any(any(group) for group in paddings):
        del optim["param_alignment_paddings"]
    return state


def _install_safe_checkpoint_engine(engine: Any) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = _deepspeed_safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):  # noqa: D401 - DeepSpeed's signature
            # Process-wide, not a scoped safe_globals(): leaving a scope removes the classes again,
            # also for the loads DeepSpeed makes outside this engine.
            torch.serialization.add_safe_globals(allowed)
            try:
                return _unpadded_layout_as_old(torch.load(path, map_location=map_location, weights_only=True))
            except Exception as err:  # pickle errors come in several types
                what = ("it pickles Python objects that a weights-only load refuses to run (an unsafe or foreign "
                        "file)" if is_unsafe_pickle(str(err)) else "it is damaged (torch.load cannot read it)")
                raise CheckpointError(  # a refusal (one line, exit 2), decided before anything was changed
                    f"refusing to resume from {path}: {what}. Only checkpoints written by ssl_container's trainer "
                    "are resumed: point checkpoints/latest at an older step folder, or start a fresh run_dir."
                ) from None

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def owns_gradients(cfg: EngineConfig, device: torch.device) -> bool:
    """Whether the trainer keeps the student's gradients in its own flat buffer, averages and clips them
    (ZeRO-0 outside fp16, whose DeepSpeed optimizer keeps fp32 master copies and clips those)."""
    return cfg.zero_stage == 0 and effective_precision(cfg, device) != "fp16"


def initialize_engine(cfg: EngineConfig, student: nn.Module, optimizer: torch.optim.Optimizer, *, micro_batch: int,
                      clip_grad: float, device: torch.device, world_size: int, load_universal: bool = False):
    """``deepspeed.initialize`` of the engine section on an already created process group, for the
    student and its optimizer (``build_optimizer``); returns (engine, optimizer, ds_config, grads):
    ``grads`` is the student's :class:`FlatParameters` where the trainer owns the gradients
    (:func:`owns_gradients`: it averages and clips them before ``engine.step()``), else None."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute on 2
        # cores) that only its inference path uses; training all-reduces go through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    _check_deepspeed_version(deepspeed.__version__, cfg.zero_stage, device)
    own = owns_gradients(cfg, device)
    ds_config = build_deepspeed_config(cfg, micro_batch, 0.0 if own else clip_grad, world_size, device, load_universal)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=student, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    _install_safe_checkpoint_engine(engine)
    grads = None
    if own:
        # After initialize: DeepSpeed has broadcast the weights in place and moved nothing since.
        grads = FlatParameters(engine.module, [g["params"] for g in optimizer.param_groups])
        engine.enable_backward_allreduce = False  # FlatParameters.all_reduce_mean: one call per buffer
        if isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed leaves a ZeRO-0 fp32/bf16 optimizer as it is
            grads.take_over(optimizer)  # a group is one tensor to the optimizer: a few calls a step, not a few per parameter
    return engine, optimizer, ds_config, grads


# The first DeepSpeed with zero_optimization.parameter_alignment (see build_deepspeed_config).
MIN_DEEPSPEED_ALIGNED = (0, 19, 7)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _check_deepspeed_version(version: str, zero_stage: int, device: torch.device) -> None:
    """An older DeepSpeed packs ZeRO-1/2 parameters unaligned, and cuDNN faults at the first step on a
    GPU: refuse before building anything, with the two ways out."""
    if device.type != "cuda" or zero_stage not in (1, 2) or _version_tuple(version) >= MIN_DEEPSPEED_ALIGNED:
        return
    need = ".".join(map(str, MIN_DEEPSPEED_ALIGNED))
    raise RuntimeError(
        f"DeepSpeed {version} packs ZeRO-{zero_stage} parameters without alignment, and CUDA kernels fail on them "
        f"('misaligned address' at the first step). Install DeepSpeed >= {need} (pip install 'deepspeed>={need}'), "
        "or train with engine.zero_stage=0.")


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside (DeepSpeed's included) runs with ``weights_only=True``, allowing
    only the DeepSpeed classes its own checkpoint files contain."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def convert_to_universal(step_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """DeepSpeed's ZeRO checkpoint -> its universal format (needed to resume on another world size)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(step_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_loads():
        ds_to_universal.main(args)


def _fp32_source_params(engine: Any, names: Iterable[str]) -> list[torch.Tensor]:
    params = dict(engine.module.named_parameters())
    out = []
    for name in names:
        p = params[name]
        if p.dtype == torch.float32:
            out.append(p.detach())
        else:  # fp16 mode: the fp32 master copy lives in the optimizer
            from deepspeed.utils import safe_get_full_fp32_param

            out.append(safe_get_full_fp32_param(p).detach())
    return out


class TeacherEMA:
    """The trainer's EMA: ``teacher`` takes the storage layout of the engine's student once, then each
    update is one multiply and one add per storage (``flat.FlatEMA``). fp16 training reads the fp32
    master copies instead, per tensor."""

    def __init__(self, teacher: nn.Module, engine: Any) -> None:
        self.engine = engine
        self.flat = FlatEMA(teacher, engine.module)
        self.master = any(p.dtype != torch.float32 for p in engine.module.parameters())

    def __call__(self, momentum: float) -> None:
        sources = _fp32_source_params(self.engine, self.flat.names) if self.master else None
        self.flat.update(momentum, sources)


def autocast_context(precision: str, device: torch.device):
    """The teacher's forward precision, matching the student's (the engine autocasts the student)."""
    if precision in ("bf16", "fp16") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast(device.type, enabled=False)
