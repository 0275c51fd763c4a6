"""The step's per-tensor bookkeeping done on contiguous storage: a handful of operator calls, not one
(or five) per parameter.

A DINO step touches every parameter several times outside the network: gradient clipping (a norm and
a scale per gradient), the teacher's EMA (a multiply and an add per parameter), and the snapshot of
BatchNorm statistics and the centre that lets a non-finite step be undone. Written per tensor (or with
``torch._foreach_*``, which on CPU is a loop of per-tensor calls) that is about 17,000 operator calls a
step for Container-Light, each a few microseconds of host time on a GPU: most of a step at 128 px.

The same arithmetic over one contiguous buffer is one call. The tensors stay ordinary ``nn.Parameter``
and buffer objects of ordinary modules (state dicts, names, optimizers and checkpoints see nothing
different); only their storage is shared:

* :class:`FlatParameters` packs a module's parameters into one buffer per dtype and keeps their
  gradients as views of a second one, so that the global gradient norm and the clipping scale are one
  call each. Used under ZeRO-0, where DeepSpeed leaves parameters where they are (ZeRO-1/2 pack them
  into DeepSpeed's own flat buffers and clip there).
* :class:`FlatEMA` gives the teacher the storage layout of the student, whichever packed it (this
  module or DeepSpeed's ZeRO-1/2 partitions), so the EMA is one multiply and one add per storage.
* :func:`pack_buffers` does the same for module buffers, so the pre-step snapshot is one copy per dtype.

Elementwise arithmetic is unchanged, so the EMA and the snapshots are bitwise those of the per-tensor
code; the gradient norm is one reduction instead of a norm of per-tensor norms (equal to rounding).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["FlatParameters", "FlatEMA", "pack_buffers"]

# Each tensor starts on a 64-byte boundary: CUDA kernels (cuDNN's above all) fault on misaligned
# addresses, which is what DeepSpeed's ZeRO packing did before its parameter_alignment option.
_ALIGN_BYTES = 64


def _padded(numel: int, element_size: int) -> int:
    per = max(1, _ALIGN_BYTES // element_size)
    return -(-numel // per) * per


def _pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One zeroed buffer holding ``tensors`` (same dtype and device) at aligned offsets, and a view of
    it shaped (and, for channels_last weights, strided) like each; values are copied in."""
    first = tensors[0]
    sizes = [_padded(t.numel(), t.element_size()) for t in tensors]
    buffer = torch.zeros(sum(sizes), dtype=first.dtype, device=first.device)
    views, offset = [], 0
    for t, size in zip(tensors, sizes):
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            view = buffer.as_strided(t.shape, t.stride(), offset)  # a channels_last weight stays channels_last
        else:
            view = buffer[offset:offset + t.numel()].view(t.shape)
        view.copy_(t)
        views.append(view)
        offset += size
    return buffer, views


def _by_dtype(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.dtype, torch.device], list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


class FlatParameters:
    """A module's trainable parameters and their gradients in contiguous storage.

    After construction each parameter's ``.data`` is a view of :attr:`buffers` and, once
    :meth:`zero_grad` has run, its ``.grad`` a view of :attr:`grads`. Autograd then accumulates into
    those views in place. Whoever sets a gradient to ``None`` (DeepSpeed's ``zero_grad`` does after
    each step) breaks the link until the next :meth:`zero_grad`, which every step calls first.

    ``groups`` (an optimizer's parameter groups' ``params``) packs each group into buffers of its own,
    so that :meth:`take_over` can let the optimizer update a whole group as one tensor.
    """

    def __init__(self, module: nn.Module, groups: Sequence[Sequence[nn.Parameter]] = ()) -> None:
        params = [p for p in module.parameters()]
        self.params = params
        self.buffers: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self._grad_views: list[tuple[nn.Parameter, torch.Tensor]] = []
        # One bucket per optimizer group (in its parameters' order) and dtype, then one per dtype for
        # the parameters no group holds (frozen ones).
        grouped = {id(p) for g in groups for p in g}
        buckets = [(gi, g) for gi, group in enumerate(groups) for g in _by_dtype(group).values()]
        buckets += [(None, g) for g in _by_dtype(p for p in params if id(p) not in grouped).values()]
        self._group_buckets: dict[int, list[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]] = {}
        for gi, bucket in buckets:
            buffer, views = _pack(bucket)
            for p, view in zip(bucket, views):
                p.data = view
            self.buffers.append(buffer)
            trainable = [p for p in bucket if p.requires_grad]
            grad_buffer = None
            if trainable:
                grad_buffer, grad_views = _pack([torch.zeros_like(p) for p in trainable])
                self.grads.append(grad_buffer)
                self._grad_views += list(zip(trainable, grad_views))
            if gi is not None:
                self._group_buckets.setdefault(gi, []).append(
                    (buffer, grad_buffer if len(trainable) == len(bucket) else None, views))
        self._data_ptrs = [p.data_ptr() for p in params]
        self._flat_params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._layouts: list[list[tuple[torch.Size, tuple[int, ...], int]]] = []

    def take_over(self, optimizer: torch.optim.Optimizer) -> bool:
        """Make ``optimizer`` (a fresh torch optimizer over the ``groups`` given at construction) update
        each group's buffer as one tensor: its multi-tensor kernels then make a few calls a step instead
        of a few per parameter (CPU's fused AdamW reads each parameter's step count on the host).

        The arithmetic is elementwise, so the updates are those of the per-parameter optimizer, and
        :meth:`~torch.optim.Optimizer.state_dict` / ``load_state_dict`` keep its per-parameter format
        (checkpoints either way resume either way). False (nothing changed) where a group spans dtypes,
        holds a frozen parameter or does not match, or the optimizer has state already."""
        if optimizer.state or len(self._group_buckets) != len(optimizer.param_groups):
            return False
        packed = []
        for gi, group in enumerate(optimizer.param_groups):
            buckets = self._group_buckets.get(gi, [])
            if len(buckets) != 1 or buckets[0][1] is None:
                return False
            buffer, grad_buffer, views = buckets[0]
            if len(views) != len(group["params"]) or any(
                    p.data_ptr() != v.data_ptr() for p, v in zip(group["params"], views)):
                return False
            packed.append((buffer, grad_buffer, views))
        for group, (buffer, grad_buffer, views) in zip(optimizer.param_groups, packed):
            flat = nn.Parameter(buffer)  # the buffer itself, not a copy
            flat.grad = grad_buffer
            group["params"] = [flat]
            self._flat_params.append((flat, grad_buffer))
            self._layouts.append([(v.shape, v.stride(), v.storage_offset()) for v in views])
        optimizer.register_state_dict_post_hook(self._per_parameter_state)
        optimizer.register_load_state_dict_pre_hook(self._flat_state)
        return True

    def _per_parameter_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
        """The flat groups' state as the per-parameter optimizer's ``state_dict`` would hold it."""
        state, groups, index = {}, [], 0
        for group, (flat, _), layout in zip(saved["param_groups"], self._flat_params, self._layouts):
            ids = list(range(index, index + len(layout)))
            index += len(layout)
            flat_state = saved["state"].get(group["params"][0])
            if flat_state is not None:
                for i, (shape, stride, offset) in zip(ids, layout):
                    state[i] = {k: v if not torch.is_tensor(v) else v.clone() if k == "step"
                                else v.as_strided(shape, stride, offset).clone() for k, v in flat_state.items()}
            groups.append({**group, "params": ids})
        return {"state": state, "param_groups": groups}

    def _flat_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
        """A per-parameter ``state_dict`` (what :meth:`_per_parameter_state` writes) packed for the flat groups."""
        state, groups = {}, []
        for gi, (group, (flat, _), layout) in enumerate(zip(saved["param_groups"], self._flat_params, self._layouts)):
            ids = group["params"]
            if len(ids) != len(layout):
                raise ValueError(f"saved optimizer group {gi} holds {len(ids)} parameters, this model's {len(layout)}")
            per = [saved["state"].get(i) for i in ids]
            if any(p is not None for p in per):
                if any(p is None for p in per):
                    raise ValueError(f"saved optimizer group {gi} has state for some of its parameters only")
                packed = {}
                for k, v in per[0].items():
                    if not torch.is_tensor(v) or k == "step":
                        packed[k] = v.clone() if torch.is_tensor(v) else v  # all the group's steps are equal
                        continue
                    out = torch.zeros(flat.numel(), dtype=v.dtype, device=v.device)
                    for p, (shape, stride, offset) in zip(per, layout):
                        out.as_strided(shape, stride, offset).copy_(p[k])
                    packed[k] = out
                state[gi] = packed
            groups.append({**group, "params": [gi]})
        return {"state": state, "param_groups": groups}

    def intact(self) -> bool:
        """Whether every parameter still lives where it was packed (a ``.to()``, ``.half()`` or a
        library re-pointing ``.data`` would move it out, and the flat buffers would go stale)."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self._data_ptrs))

    @torch.no_grad()
    def zero_grad(self) -> None:
        for g in self.grads:
            g.zero_()
        for p, view in self._grad_views:
            if p.grad is not view:
                p.grad = view
        for flat, grad in self._flat_params:
            if flat.grad is not grad:
                flat.grad = grad

    @torch.no_grad()
    def all_reduce_mean(self) -> None:
        """Average the gradients over the data-parallel ranks: one collective per buffer."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        world = dist.get_world_size()
        for g in self.grads:
            dist.all_reduce(g)
            g.div_(world)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of the gradients, and their scaling to ``max_norm`` when above it
        (``max_norm`` 0: norm only), as ``torch.nn.utils.clip_grad_norm_`` and DeepSpeed compute it
        (scale ``min(1, max_norm / (norm + 1e-6))``), without a host sync."""
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in self.grads]
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
            for g in self.grads:
                g.mul_(scale.to(g.dtype))
        return norm


class FlatEMA:
    """``teacher = m * teacher + (1 - m) * student`` over whole storages.

    The student's parameters are grouped by the storage they live in (a :class:`FlatParameters`
    buffer, DeepSpeed's ZeRO-1/2 flat partitions); the teacher's matching parameters are moved into a
    buffer of the same size at the same offsets, and the update runs once per storage. Gaps between
    parameters in a storage (alignment padding) are averaged too, which nothing reads.

    Falls back to the per-tensor update (``torch._foreach_*``, the same arithmetic) where storages
    cannot be mirrored: a student whose parameters are not all packed, of another dtype than the
    teacher (fp16 training, where the fp32 master copies are the source), or shared with tensors that
    are not parameters. :meth:`update` re-checks every step that the student has not been moved.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        t_named = dict(teacher.named_parameters())
        s_named = dict(student.named_parameters())
        if set(t_named) != set(s_named):
            raise ValueError("teacher and student must have the same parameters")
        self.names = sorted(s_named)
        self.t_params = [t_named[n] for n in self.names]
        self.s_params = [s_named[n] for n in self.names]
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._s_ptrs = [p.data_ptr() for p in self.s_params]
        if self._mirrorable():
            self._mirror()

    def _mirrorable(self) -> bool:
        if any(s.dtype != t.dtype or s.device != t.device or s.shape != t.shape
               for s, t in zip(self.s_params, self.t_params)):
            return False
        storages = {}
        for s in self.s_params:
            st = s.untyped_storage()
            storages.setdefault(st.data_ptr(), (st, []))[1].append(s)
        # Worth it only when parameters share storages; and a storage must hold parameters only (its
        # bytes all accounted for by them and by small gaps), or the EMA would blend unrelated data.
        if len(storages) * 4 > len(self.s_params):
            return False
        for st, members in storages.values():
            used = sum(p.numel() * p.element_size() for p in members)
            if used * 2 < st.nbytes():
                return False
        self._storages = list(storages.values())
        return True

    @torch.no_grad()
    def _mirror(self) -> None:
        index = {id(s): i for i, s in enumerate(self.s_params)}
        for st, members in self._storages:
            dtype = members[0].dtype
            source = torch.empty(0, dtype=dtype, device=members[0].device).set_(
                st, 0, (st.nbytes() // members[0].element_size(),))
            target = torch.zeros_like(source)
            for s in members:
                t = self.t_params[index[id(s)]]
                view = target.as_strided(s.shape, s.stride(), s.storage_offset())
                view.copy_(t)
                t.data = view
            self.pairs.append((target, source))

    @property
    def flat(self) -> bool:
        return bool(self.pairs)

    @torch.no_grad()
    def update(self, momentum: float, sources: Sequence[torch.Tensor] | None = None) -> None:
        """One EMA step. ``sources``: the student's fp32 values when they are not its parameters
        (fp16 training's master copies), in the order of :attr:`names`."""
        if self.pairs and sources is None and all(p.data_ptr() == q for p, q in zip(self.s_params, self._s_ptrs)):
            for target, source in self.pairs:
                target.mul_(momentum).add_(source, alpha=1.0 - momentum)
            return
        src = list(sources) if sources is not None else [p.detach() for p in self.s_params]
        torch._foreach_mul_(self.t_params, momentum)
        torch._foreach_add_(self.t_params, src, alpha=1.0 - momentum)


def pack_buffers(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Move every buffer of ``modules`` into one contiguous tensor per dtype (each buffer becomes a
    view of it, updated in place as before) and return those tensors: a copy of them is a snapshot
    of all buffers."""
    unique = {id(b): b for module in modules for b in module.buffers()}
    flat = []
    for group in _by_dtype(unique.values()).values():
        buffer, views = _pack(group)
        for b, view in zip(group, views):
            # ``.data =`` keeps each buffer its own version counter: views of one tensor would share
            # one, and a BatchNorm's in-place statistics update would then look, to autograd, like
            # a change to every other BatchNorm's saved statistics.
            b.data = view
        flat.append(buffer)
    return flat
