"""trainer/flat.py: parameters, gradients, EMA and buffers in contiguous storage give the numbers of
the per-tensor code (torch.nn.utils.clip_grad_norm_, torch._foreach_*, a copy per buffer)."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ssl_container.trainer.flat import FlatEMA, FlatParameters, pack_buffers


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, bias=False),
                         nn.BatchNorm2d(5), nn.Flatten(), nn.LazyLinear(7))


def _materialized(seed: int = 0) -> nn.Module:
    net = _net(seed)
    net(torch.zeros(2, 3, 9, 9))
    return net


def _backward(net: nn.Module, seed: int = 1) -> None:
    x = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(seed))
    net(x).square().mean().backward()


def test_packed_parameters_are_aligned_views_and_gradients_accumulate_in_the_flat_buffer():
    plain, packed = _materialized(), _materialized()
    flat = FlatParameters(packed)
    assert len(flat.buffers) == 1 and len(flat.grads) == 1
    for p in packed.parameters():
        assert p.untyped_storage().data_ptr() == flat.buffers[0].untyped_storage().data_ptr()
        assert p.data_ptr() % 64 == 0
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert torch.equal(a, b)
    for _ in range(2):  # two micro-batches accumulate, as under gradient accumulation
        flat.zero_grad() if _ == 0 else None
        _backward(plain, seed=_)
        _backward(packed, seed=_)
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert b.grad.untyped_storage().data_ptr() == flat.grads[0].untyped_storage().data_ptr()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    assert flat.intact()
    next(packed.parameters()).data = torch.zeros(1)  # a library re-pointing .data
    assert not flat.intact()


def test_channels_last_weights_keep_their_layout_in_the_buffer():
    plain = _materialized().to(memory_format=torch.channels_last)
    packed = _materialized().to(memory_format=torch.channels_last)
    flat = FlatParameters(packed)
    flat.zero_grad()
    conv = packed[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.grad.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    for net in (plain, packed):
        net(x).square().mean().backward()
    for a, b in zip(plain.parameters(), packed.parameters()):
        assert torch.equal(a, b) and b.stride() == a.stride()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    assert all(p.grad.untyped_storage().data_ptr() == flat.grads[0].untyped_storage().data_ptr()
               for p in packed.parameters())


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    plain, packed = _materialized(), _materialized()
    flat = FlatParameters(packed)
    flat.zero_grad()
    _backward(plain)
    _backward(packed)
    if max_norm:
        ref = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
    else:
        ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in plain.parameters()]))
    norm = flat.clip_grad_norm_(max_norm)
    assert ref > 0.05  # so that 0.05 clips
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    for a, b in zip(plain.parameters(), packed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-9)
    if max_norm == 0.05:
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in packed.parameters()]))
        assert clipped == pytest.approx(0.05, rel=1e-4)


def test_flat_ema_is_bitwise_the_per_tensor_ema():
    student, teacher, reference = _materialized(0), _materialized(1), _materialized(1)
    FlatParameters(student)
    ema = FlatEMA(teacher, student)
    assert ema.flat
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        ema.update(0.9 + 0.01 * step)
        t = [p for _, p in sorted(reference.named_parameters())]
        s = [p.detach() for _, p in sorted(student.named_parameters())]
        with torch.no_grad():
            torch._foreach_mul_(t, 0.9 + 0.01 * step)
            torch._foreach_add_(t, s, alpha=1.0 - (0.9 + 0.01 * step))
    for (name, a), b in zip(teacher.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name
    # The teacher's parameters share one storage now: its state dict still holds separate tensors.
    assert len({p.untyped_storage().data_ptr() for p in teacher.parameters()}) == 1


def test_flat_ema_falls_back_when_the_student_is_not_packed_or_moves():
    student, teacher = _materialized(0), _materialized(1)
    ema = FlatEMA(teacher, student)
    assert not ema.flat  # one storage per parameter: nothing to gain
    expected = [0.5 * t + 0.5 * s for t, s in zip(teacher.parameters(), student.parameters())]
    ema.update(0.5)
    for a, b in zip(teacher.parameters(), expected):
        assert torch.equal(a, b)
    FlatParameters(student)
    ema = FlatEMA(teacher, student)
    assert ema.flat
    for p in student.parameters():  # the student moves out of its buffer: the flat pairs would be stale
        p.data = p.data.clone() + 1
    expected = [0.5 * t + 0.5 * s for t, s in zip(teacher.parameters(), student.parameters())]
    ema.update(0.5)
    for a, b in zip(teacher.parameters(), expected):
        assert torch.equal(a, b)


def test_packed_buffers_train_and_one_copy_snapshots_and_restores_them():
    plain, packed = _materialized(), _materialized()
    flat = pack_buffers([packed])
    assert [b.dtype for b in flat] == [torch.float32, torch.int64]
    saved = [b.clone() for b in flat]
    for net in (plain, packed):  # two BatchNorms in one graph: each keeps its own version counter
        _backward(net)
        _backward(net, seed=2)
    for (name, a), b in zip(plain.named_buffers(), packed.buffers()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(flat, saved))
    torch._foreach_copy_(flat, saved)
    fresh = _materialized()
    for (name, a), b in zip(fresh.named_buffers(), packed.buffers()):
        assert torch.equal(a, b), name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        net = _materialized()
        flat = FlatParameters(net)
        flat.zero_grad()
        _backward(net, seed=10 + rank)
        flat.all_reduce_mean()
        torch.save([p.grad.clone() for p in net.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_mean_over_two_gloo_processes(tmp_path: Path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    per_rank = []
    for r in range(2):
        net = _materialized()
        _backward(net, seed=10 + r)
        per_rank.append([p.grad for p in net.parameters()])
    for g0, g1, a, b in zip(got[0], got[1], *per_rank):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, (a + b) / 2, rtol=1e-5, atol=1e-7)  # thread counts differ


def _net_without_idle_biases(seed: int = 0) -> nn.Module:
    """As :func:`_net` without a bias right before a BatchNorm: its gradient is rounding noise, which
    Adam scales up to full steps, so any two correct optimizers part there within a few steps."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, bias=False),
                        nn.BatchNorm2d(5), nn.Flatten(), nn.LazyLinear(7))
    net(torch.zeros(2, 3, 9, 9))
    return net


def _groups(net: nn.Module) -> list[dict]:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return [dict(params=decay, weight_decay=0.04), dict(params=no_decay, weight_decay=0.0)]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_an_optimizer_over_whole_groups_steps_and_saves_as_the_per_parameter_one(kind):
    """take_over: each parameter group is one tensor to the optimizer (a few calls a step instead of a few
    per parameter); updates equal the per-parameter optimizer's, its state_dict has the per-parameter
    format, and a per-parameter state loads into it and continues the same."""
    def make(net):
        if kind == "adamw":
            return torch.optim.AdamW(_groups(net), lr=1e-2, betas=(0.9, 0.99), fused=True)
        return torch.optim.SGD(_groups(net), lr=1e-2, momentum=0.9, fused=True)

    plain = _net_without_idle_biases().to(memory_format=torch.channels_last)
    packed = _net_without_idle_biases().to(memory_format=torch.channels_last)
    opt_plain = make(plain)
    opt_flat = make(packed)
    flat = FlatParameters(packed, [g["params"] for g in opt_flat.param_groups])
    assert len(flat.buffers) == 2  # one per group
    assert flat.take_over(opt_flat)
    assert [len(g["params"]) for g in opt_flat.param_groups] == [1, 1]

    def step(seed):
        opt_plain.zero_grad(set_to_none=True)
        flat.zero_grad()
        _backward(plain, seed)
        _backward(packed, seed)
        opt_plain.param_groups[0]["lr"] = opt_flat.param_groups[0]["lr"] = 1e-2 / (1 + seed)
        opt_plain.step()
        opt_flat.step()
        opt_flat.zero_grad(set_to_none=True)  # as DeepSpeed's engine does: the next zero_grad relinks

    for seed in range(4):
        step(seed)
    for a, b in zip(plain.parameters(), packed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    saved_plain, saved_flat = opt_plain.state_dict(), opt_flat.state_dict()
    assert [g["params"] for g in saved_flat["param_groups"]] == [g["params"] for g in saved_plain["param_groups"]]
    assert saved_flat["state"].keys() == saved_plain["state"].keys()
    for i, s in saved_plain["state"].items():
        assert s.keys() == saved_flat["state"][i].keys()
        for k, v in s.items():
            assert saved_flat["state"][i][k].shape == v.shape and saved_flat["state"][i][k].stride() == v.stride()
            torch.testing.assert_close(saved_flat["state"][i][k], v, rtol=0, atol=1e-6)

    # A per-parameter checkpoint (the previous code's) resumes into the flat optimizer.
    opt_flat.load_state_dict(saved_plain)
    assert len(opt_flat.state) == 2
    for seed in range(4, 7):
        step(seed)
    for a, b in zip(plain.parameters(), packed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_take_over_refuses_an_optimizer_it_cannot_mirror():
    net = _materialized()
    used = torch.optim.AdamW(_groups(net), lr=1e-3)
    _backward(net)
    used.step()
    flat = FlatParameters(net, [g["params"] for g in used.param_groups])
    assert not flat.take_over(used)  # it has state already
    other = _materialized(1)
    fresh = torch.optim.AdamW(_groups(other), lr=1e-3)
    assert not flat.take_over(fresh)  # not this module's parameters
    assert all(len(g["params"]) > 1 for g in fresh.param_groups)
