"""Forward + backward time of every 1x1 and depthwise convolution of a DINO step, ours vs PyTorch's.

    python benchmarks/conv_kernels.py --threads 1 [--batch 4 --global-size 224 --n-local 8 --local-size 96]

Runs Container-Light once on the global-crop batch and once on the local-crop batch to collect the
geometry of every convolution that ``ssl_container.utils.cpu_kernels.use_fast_cpu_kernels`` speeds up (1x1
and 5x5 depthwise), then times each distinct one (best of --repeat; forward, then backward for input,
weight and bias) on channels_last inputs two ways: ``ours`` (the float32 CPU kernels the trainer
applies) and ``pytorch`` (the same module as a plain ``nn.Conv2d``: PyTorch's own kernel choice). Prints one JSON line per layer shape and
a last line with totals over the whole step (each shape weighted by how often it runs: the student
sees the global and local crops forward and backward, the teacher the global crops forward only).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

from step_args import add_step_arguments


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from ssl_container.utils.cpu_kernels import FastDepthwiseConv, FastPointwiseConv, use_fast_cpu_kernels
    from ssl_container.models import create_model
    from ssl_container.utils.runtime import retain_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # time the kernels, not the page faults of fresh output buffers
    model = create_model(args.model, num_classes=0)
    use_fast_cpu_kernels(model)  # only to find the convolutions the trainer speeds up
    layers: dict = {}
    counts: Counter = Counter()
    crop_batch = [None]

    def record(module, inputs):
        key = (type(module).__name__, tuple(inputs[0].shape), module.out_channels, module.kernel_size[0],
               module.bias is not None)
        layers[key] = module
        counts[key] += 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, (FastPointwiseConv, FastDepthwiseConv))]
    with torch.no_grad():
        for n, size in ((2 * args.batch, args.global_size), (args.n_local * args.batch, args.local_size)):
            crop_batch[0] = n
            model(torch.randn(n, 3, size, size))
    for h in hooks:
        h.remove()

    totals: Counter = Counter()
    for key in sorted(layers, key=lambda k: -counts[k] * k[1][0] * k[1][1] * k[1][2] * k[1][3]):
        kind, shape, cout, k, _ = key
        module = layers[key]
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(shape[0], cout, shape[2], shape[3]).contiguous(memory_format=torch.channels_last)
        is_global = shape[0] == 2 * args.batch
        row = {}
        fast_class = type(module)
        for impl, fast in (("ours", True), ("pytorch", False)):
            module.__class__ = fast_class if fast else torch.nn.Conv2d
            with torch.no_grad():
                fwd = _best(lambda: module(x), args.repeat)
            y = module(x)
            bwd = _best(lambda: torch.autograd.grad(y, [x, *module.parameters()], g, retain_graph=True), args.repeat)
            row[f"{impl}_forward_ms"], row[f"{impl}_backward_ms"] = fwd * 1e3, bwd * 1e3
            # student forward + backward on every crop batch, teacher forward on the global one
            totals[f"{impl}_ms"] += counts[key] * ((fwd + bwd) + (fwd if is_global else 0.0)) * 1e3
        module.__class__ = fast_class
        print(json.dumps({"layer": kind, "input": list(shape), "out_channels": cout, "kernel": k,
                          "per_step": counts[key], **{n: round(v, 2) for n, v in row.items()},
                          "speedup": round((row["pytorch_forward_ms"] + row["pytorch_backward_ms"])
                                           / (row["ours_forward_ms"] + row["ours_backward_ms"]), 2)}), flush=True)
    print(json.dumps({"total_ours_ms": round(totals["ours_ms"], 1), "total_pytorch_ms": round(totals["pytorch_ms"], 1),
                      "speedup": round(totals["pytorch_ms"] / totals["ours_ms"], 3), "threads": torch.get_num_threads(),
                      "batch": args.batch, "crops": f"2x{args.global_size}+{args.n_local}x{args.local_size}"}))


if __name__ == "__main__":
    main()
