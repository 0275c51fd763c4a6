"""Time one full DINO training step (student, teacher, loss, backward, update, EMA).

    python benchmarks/train_step.py --model container_light --batch 4 --precision fp32 --threads 1 \
        [--global-size 224 --n-local 8 --local-size 96] [--steps 3] [--impl both]

Prints one JSON line per implementation:

* ``deepspeed``: the trainer's path (DeepSpeed engine, ZeRO-1, foreach AdamW, global-norm clipping,
  foreach EMA, one backbone call per crop resolution, SDPA attention);
* ``eager``: the same model and loss in the way DINO's reference loop is written (plain
  ``torch.optim.AdamW`` with per-parameter loops, per-tensor gradient clipping, a Python EMA loop).

Synthetic crops: data loading is measured by benchmarks/data_throughput.py. The issue's reference,
the official DINO code with the official Container-Light at fp32, batch 4, 2x224 + 8x96, one
thread, took 7.5 s per step on this machine (ViT-S/16: 5.5 s).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _crops(batch: int, n_global: int, global_size: int, n_local: int, local_size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, global_size, global_size, generator=g) for _ in range(n_global)]
    crops += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(n_local)]
    return [c.to(device) for c in crops]


def _config(args):
    from ssl_container.config import load_config

    return load_config(None, [
        f"model.name={args.model}", f"data.batch_size={args.batch}", f"engine.precision={args.precision}",
        f"engine.device={args.device}", f"data.crops.global_size={args.global_size}",
        f"data.crops.n_local={args.n_local}", f"data.crops.local_size={args.local_size}",
        f"model.channels_last={args.channels_last}", "data.urls=[unused]",
        f"engine.zero_stage={args.zero_stage}", f"engine.compile={args.compile}",
    ] + (["model.kwargs={dynamic_img_size: true}"] if args.model.startswith("vit") else []))


def bench_deepspeed(args) -> dict:
    import torch

    from ssl_container.dino import DINOLoss, get_param_groups
    from ssl_container.distributed import cleanup, init_distributed
    from ssl_container.engine import (autocast_context, compile_backbones, ema_update, effective_precision,
                                      initialize_engine, make_teacher, select_device)
    from ssl_container.train import build_student

    cfg = _config(args)
    device = select_device(cfg)
    init_distributed(device)
    precision = effective_precision(cfg, device)
    torch.manual_seed(0)
    student = build_student(cfg).to(device)
    teacher = make_teacher(student)
    if cfg.engine.compile:
        compile_backbones(student, teacher)
    loss_fn = DINOLoss(cfg.head.out_dim, 2 + args.n_local).to(device)
    engine, optimizer, _ = initialize_engine(cfg, student, get_param_groups(student), device, 1)
    crops = _crops(args.batch, 2, args.global_size, args.n_local, args.local_size, device)
    if cfg.model.channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]

    def step():
        with torch.no_grad(), autocast_context(precision, device):
            t = teacher(crops[:2])
        loss = loss_fn(engine(crops), t, 0.04)
        engine.backward(loss)
        engine.step()
        ema_update(teacher, engine, 0.996)
        return loss

    try:
        return _time(step, args, device, "deepspeed", precision)
    finally:
        cleanup()


def bench_eager(args) -> dict:
    import torch

    from ssl_container.dino import DINOLoss, get_param_groups
    from ssl_container.engine import make_teacher
    from ssl_container.train import build_student

    cfg = _config(args)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    student = build_student(cfg).to(device)
    teacher = make_teacher(student)
    loss_fn = DINOLoss(cfg.head.out_dim, 2 + args.n_local).to(device)
    optimizer = torch.optim.AdamW(get_param_groups(student), lr=1e-4, foreach=False)
    crops = _crops(args.batch, 2, args.global_size, args.n_local, args.local_size, device)
    params = [p for p in student.parameters() if p.requires_grad]
    pairs = list(zip(student.parameters(), teacher.parameters()))

    def step():
        with torch.no_grad():
            t = teacher(crops[:2])
        loss = loss_fn(student(crops), t, 0.04)
        optimizer.zero_grad()
        loss.backward()
        for p in params:  # DINO v1 clips each tensor separately
            if p.grad is not None:
                norm = p.grad.norm()
                p.grad.mul_(torch.clamp(3.0 / (norm + 1e-6), max=1.0))
        optimizer.step()
        with torch.no_grad():
            for ps, pt in pairs:
                pt.mul_(0.996).add_((1 - 0.996) * ps.detach())
        return loss

    return _time(step, args, device, "eager", "fp32")


def _time(step, args, device, impl: str, precision: str) -> dict:
    import torch

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "impl": impl, "model": args.model, "batch": args.batch, "crops": f"2x{args.global_size}+{args.n_local}x{args.local_size}",
        "precision": precision, "device": str(device), "threads": torch.get_num_threads(),
        "zero_stage": args.zero_stage if impl == "deepspeed" else None, "compile": args.compile and impl == "deepspeed",
        "channels_last": args.channels_last, "step_s": round(median, 3), "images_per_s": round(args.batch / median, 3), "steps": args.steps,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="container_light")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones (engine.compile)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", default="both", choices=["deepspeed", "eager", "both"])
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    impls = ["deepspeed", "eager"] if args.impl == "both" else [args.impl]
    results = {}
    for impl in impls:
        results[impl] = (bench_deepspeed if impl == "deepspeed" else bench_eager)(args)
        print(json.dumps(results[impl]), flush=True)
    if len(results) == 2:
        ds, eager = results["deepspeed"]["step_s"], results["eager"]["step_s"]
        print(json.dumps({"speedup_vs_eager": round(eager / ds, 3),
                          "speedup_vs_official_reference_7.5s": round(7.5 / ds, 3) if args.model == "container_light" else None}))


if __name__ == "__main__":
    main()
