"""DINOLoss across 2 gloo processes: the center and Sinkhorn-Knopp span the global batch.

Each rank gets different teacher outputs (and, for the center, a different batch size, which
the count all-reduce must handle). The reference is computed in this process, without
torch.distributed, on the concatenation of both ranks' rows.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_container.dino import DINOLoss, sinkhorn_knopp

K, NCROPS = 7, 4
BATCH = {0: 2, 1: 3}  # per-rank batch (images); the teacher has 2 rows per image


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    b = BATCH[rank]
    teacher = torch.randn(2 * b, K, generator=gen) + rank  # different distribution per rank
    student = torch.randn(NCROPS * b, K, generator=gen)
    return student, teacher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        student, teacher = _inputs(rank)
        loss_fn = DINOLoss(K, NCROPS, center_momentum=0.9)
        loss_fn.center.fill_(0.5)
        loss = loss_fn(student, teacher, 0.04)
        q = sinkhorn_knopp(teacher, 0.1, n_iterations=3)
        torch.save({"center": loss_fn.center.clone(), "loss": loss.detach(), "sk": q},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_center_and_sinkhorn_all_reduce_over_two_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    teachers = [_inputs(r)[1] for r in range(2)]
    global_teacher = torch.cat(teachers)
    # hand formula: 0.9 * old center + 0.1 * mean over all 10 global teacher rows
    expected = 0.9 * torch.full((1, K), 0.5) + 0.1 * global_teacher.mean(0, keepdim=True)
    # same thing through the single-process code path
    single = DINOLoss(K, NCROPS, center_momentum=0.9)
    single.center.fill_(0.5)
    single.update_center(global_teacher)

    assert torch.equal(results[0]["center"], results[1]["center"])
    torch.testing.assert_close(results[0]["center"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0]["center"], single.center, rtol=1e-6, atol=1e-6)

    # the loss itself is local: each rank's value equals the single-process one on its data
    for r in range(2):
        student, teacher = _inputs(r)
        local = DINOLoss(K, NCROPS)
        local.center.fill_(0.5)
        torch.testing.assert_close(results[r]["loss"], local(student, teacher, 0.04))

    # Sinkhorn-Knopp: the ranks' rows together equal the single-process result on all rows
    sk_single = sinkhorn_knopp(global_teacher, 0.1, n_iterations=3)
    sk_dist = torch.cat([results[0]["sk"], results[1]["sk"]])
    torch.testing.assert_close(sk_dist, sk_single, rtol=1e-5, atol=1e-6)
    local_only = sinkhorn_knopp(teachers[0], 0.1, n_iterations=3)
    assert not torch.allclose(results[0]["sk"], local_only, atol=1e-4)  # the sums did span ranks
