"""Time one full DINO training step (student, teacher, loss, backward, update, EMA), side by side.

    python benchmarks/train_step.py --model container_light --batch 4 --precision fp32 --threads 1 \
        [--global-size 224 --n-local 8 --local-size 96] [--steps 5] [--impl deepspeed,eager,official] \
        [--official-dino DIR --official-container DIR] [--rounds 3] [--baseline-checkout DIR]

Prints one JSON line per implementation, then one with the speed-ups:

* ``deepspeed``: the trainer's path (DeepSpeed engine with the run config's ZeRO stage, fused AdamW,
  global-norm clipping, foreach EMA, one backbone call per crop resolution, channels_last crops,
  the float32 CPU convolution kernels of ``ssl_container.utils.cpu_kernels``, the allocator setting of
  ``ssl_container.utils.runtime``);
* ``deepspeed/MOD[/MOD...]``: the same with parts switched off, to see what each is worth:
  ``no-retain-memory`` (``engine.cpu_retain_memory=false``), ``stock-kernels`` (PyTorch's own
  convolution kernels instead of those of ``ssl_container.utils.cpu_kernels``), ``nchw``
  (``model.channels_last=false``);
* ``eager``: the same model and loss in the way DINO's reference loop is written (plain
  ``torch.optim.AdamW`` with per-parameter loops, per-tensor gradient clipping, a Python EMA loop,
  contiguous crops);
* ``official``: the official code itself, when checkouts are given: ``--official-dino`` (a clone of
  facebookresearch/dino: its ``utils.MultiCropWrapper``, ``vision_transformer.DINOHead``,
  ``main_dino.DINOLoss``, clipping, last-layer cancelling, AdamW and EMA loop as in
  ``train_one_epoch``) and ``--official-container`` (a clone of allenai/container: its
  ``models.container_v1_light``). Nothing of either is copied here. The official PatchEmbed asserts
  a 224 input; a forward pre-hook sets its ``img_size`` to the input's so the 96 px crops pass
  (nothing in the model depends on it).

Each implementation runs in a fresh process of its own (the allocator setting is per process and
must not leak into the others), ``--rounds`` times alternating, and reports the median and minimum
step over all its timed steps. Synthetic crops: data loading is measured by
benchmarks/data_throughput.py. The issue's reference, the official DINO code with the official
Container-Light at fp32, batch 4, 2x224 + 8x96, one thread, took 7.5 s per step (ViT-S/16: 5.5 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_args import add_step_arguments

REPO = Path(__file__).resolve().parents[1]


def _crops(batch: int, n_global: int, global_size: int, n_local: int, local_size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch, 3, global_size, global_size, generator=g) for _ in range(n_global)]
    crops += [torch.randn(batch, 3, local_size, local_size, generator=g) for _ in range(n_local)]
    return [c.to(device) for c in crops]


def _config(args):
    from ssl_container.config import load_config

    overrides = [
        f"model.name={args.model}", f"data.batch_size={args.batch}", f"engine.precision={args.precision}",
        f"engine.device={args.device}", f"data.crops.global_size={args.global_size}",
        f"data.crops.n_local={args.n_local}", f"data.crops.local_size={args.local_size}", "data.urls=[unused]",
        "data.samples_per_epoch=1000000", "data.num_workers=0",
        *([f"engine.zero_stage={args.zero_stage}"] if args.zero_stage is not None else []), f"engine.compile={args.compile}",
        f"engine.compile_mode={args.compile_mode}",
    ]
    if args.channels_last is not None:
        overrides.append(f"model.channels_last={args.channels_last}")
    if args.model.startswith("vit"):
        overrides.append("model.kwargs={dynamic_img_size: true}")
    return load_config(None, overrides)


def _device(args):
    import torch

    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


_MODS = ("no-retain-memory", "stock-kernels", "nchw")


def bench_deepspeed(args, mods: tuple[str, ...] = ()) -> dict:
    """The trainer's own run and step (``ssl_container.trainer.run.build_run`` / ``train_step``) on synthetic crops."""
    import itertools
    import tempfile

    import torch

    from ssl_container.distributed import cleanup, init_distributed, resolve_env
    from ssl_container.trainer.engine import select_device
    from ssl_container.trainer.run import build_run, train_step

    cfg = _config(args)
    cfg.engine.cpu_retain_memory = cfg.engine.cpu_retain_memory and "no-retain-memory" not in mods
    cfg.model.channels_last = cfg.model.channels_last and "nchw" not in mods
    cfg.engine.fast_cpu_kernels = cfg.engine.fast_cpu_kernels and "stock-kernels" not in mods
    device = select_device(cfg.engine)
    env = init_distributed(device, resolve_env())
    with tempfile.TemporaryDirectory(prefix="train_step_") as run_dir:
        cfg.run_dir = run_dir
        run = build_run(cfg, env, device, resume=False)
        # train_step moves the crops to the device and to channels_last itself, every step, as in training.
        batches = itertools.repeat({"crops": _crops(args.batch, 2, args.global_size, args.n_local, args.local_size,
                                                    "cpu")})
        try:
            extra = {"zero_stage": cfg.engine.zero_stage, "compile": cfg.engine.compile,
                     "compile_mode": cfg.engine.compile_mode if cfg.engine.compile else None,
                     "channels_last": cfg.model.channels_last, "retain_memory": cfg.engine.cpu_retain_memory,
                     "fast_cpu_kernels": cfg.engine.fast_cpu_kernels}
            t0 = time.perf_counter()
            train_step(run, batches)  # the first step: cuDNN's kernel search, and torch.compile when on
            if device.type == "cuda":
                torch.cuda.synchronize()
            extra["first_step_s"] = round(time.perf_counter() - t0, 2)
            if cfg.engine.compile:  # graphs made by the first step; any made later are recompiles
                from torch._dynamo.utils import counters

                extra["graphs_first_step"] = counters["stats"]["unique_graphs"]
            row = _time(lambda: train_step(run, batches), args, device, "/".join(("deepspeed", *mods)), run.precision,
                        extra)
            if args.profile:
                row.update(_profile(lambda: train_step(run, batches), device))
            if cfg.engine.compile:  # counted before _split_ops compiles its own copy of the models
                row["graphs_after_first_step"] = counters["stats"]["unique_graphs"] - extra["graphs_first_step"]
            if args.profile:
                row.update(_split_ops(cfg, device, run.precision, row))
            if device.type == "cuda":
                row.update(_utilisation(cfg, device, run.precision, row["step_s"]))
            return row
        finally:
            cleanup()


# Dense bf16 peak of the card (vendor datasheets, SXM parts), for model FLOPs utilisation.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _utilisation(cfg, device, precision: str, step_times: list[float]) -> dict:
    """Model FLOPs of one step (the student's forward and backward on all crops, the teacher's forward
    on the global crops; counted by torch's FlopCounterMode on an eager copy) and their share of the
    card's bf16 peak at the median step time."""
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssl_container.trainer.engine import autocast_context
    from ssl_container.trainer.run import build_student

    student = build_student(cfg).to(device)
    crops = _crops(cfg.data.batch_size, cfg.data.crops.n_global, cfg.data.crops.global_size, cfg.data.crops.n_local,
                   cfg.data.crops.local_size, device)
    counter = FlopCounterMode(display=False)
    with counter, autocast_context(precision, device):
        with torch.no_grad():
            student(crops[:cfg.data.crops.n_global])
        student(crops).float().sum().backward()
    flops = counter.get_total_flops()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
    step = statistics.median(step_times)
    return {"model_tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / step / 1e12, 1),
            "mfu_vs_bf16_peak": round(flops / step / peak, 4) if peak else None}


def _profile(step, device, steps: int = 3) -> dict:
    """torch.profiler over a few steps: where the time goes between the host and the device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6 / steps
    syncs = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    copies_to_host = [e for e in events if e.name.startswith("Memcpy DtoH")]
    ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
    return {"profiled_wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4),
            "host_bound_share": round(1 - busy / wall, 3) if device.type == "cuda" else None,
            "kernels_per_step": round(len(kernels) / steps), "syncs_per_step": round(len(syncs) / steps, 1),
            "copies_to_host_per_step": round(len(copies_to_host) / steps, 1),
            "aten_ops_per_step": round(len(ops) / steps)}


def _split_ops(cfg, device, precision: str, row: dict) -> dict:
    """The step's aten calls split into the network's own (the teacher's forward on the global crops,
    the student's forward and backward on all crops, heads included: the trainer's models, built as
    it builds them, run on their own without DeepSpeed) and the rest (loss, centre, clipping,
    optimizer, EMA, DeepSpeed's buffers, logging). ``host_ms_per_step``: the median step time in ms;
    at the tiny size of the issue's command the arithmetic is negligible, so it is the host's work."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ssl_container.trainer.engine import autocast_context
    from ssl_container.trainer.run import build_models

    if cfg.engine.compile:  # a fresh start for the copy, as in a process of its own (its graphs count against
        torch._dynamo.reset()  # the same per-code-object limit as the trainer's otherwise)
    student, method = build_models(cfg, device, precision)
    teacher = method.teacher
    student.train()
    teacher.train()
    crops = _crops(cfg.data.batch_size, cfg.data.crops.n_global, cfg.data.crops.global_size, cfg.data.crops.n_local,
                   cfg.data.crops.local_size, device)
    if cfg.model.channels_last:
        crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]

    def network() -> None:
        with torch.no_grad(), autocast_context(precision, device):
            teacher(crops[:cfg.data.crops.n_global])
        with autocast_context(precision, device):
            out = student(crops, return_features=cfg.dino.koleo_weight > 0)
        out = out[1] if isinstance(out, tuple) else out
        out.float().sum().backward()

    network()  # first call: lazy initialisation, compilation
    steps = 3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            network()
    ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
    net = round(len(ops) / steps)
    return {"aten_ops_network": net, "aten_ops_rest": row["aten_ops_per_step"] - net,
            "host_ms_per_step": round(1000 * statistics.median(row["step_s"]), 1)}


def _union_us(ranges: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(ranges):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def bench_eager(args) -> dict:
    import torch

    from ssl_container.utils.cpu_kernels import use_fast_cpu_kernels
    from ssl_container.dino import DINOLoss, get_param_groups
    from ssl_container.methods.dino import make_teacher
    from ssl_container.trainer.run import build_student

    cfg = _config(args)
    device = _device(args)
    torch.manual_seed(0)
    student = build_student(cfg).to(device)
    if device.type == "cpu":  # the same model as the trainer's, kernels included: only the loop differs
        use_fast_cpu_kernels(student)
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

    return _time(step, args, device, "eager", "fp32", {"channels_last": False})


def bench_official(args) -> dict:
    """facebookresearch/dino's train_one_epoch body on allenai/container's Container-Light, fp32."""
    import tempfile

    import torch
    import torch.distributed as dist

    if args.model != "container_light":
        raise SystemExit("--impl official is wired for --model container_light only")
    # DINO first: both checkouts have a utils.py, and DINO's is the one its modules import.
    sys.path[:0] = [str(Path(args.official_dino).resolve()), str(Path(args.official_container).resolve())]
    import main_dino  # noqa: E402  (official DINO)
    import models as official_models  # noqa: E402  (official Container)
    import utils  # noqa: E402  (official DINO)
    from vision_transformer import DINOHead  # noqa: E402

    if not dist.is_initialized():  # DINOLoss.update_center all-reduces the center
        store = tempfile.NamedTemporaryFile(prefix="dino_pg_", delete=False).name
        os.remove(store)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    device = _device(args)
    torch.manual_seed(0)

    def backbone(**kw):
        net = official_models.container_v1_light(num_classes=0, **kw)
        for m in net.modules():
            if type(m).__name__ == "PatchEmbed":
                m.register_forward_pre_hook(lambda mod, inp: setattr(mod, "img_size", tuple(inp[0].shape[-2:])))
        return net

    student = utils.MultiCropWrapper(backbone(drop_path_rate=0.1), DINOHead(512, 65536, use_bn=False, norm_last_layer=True))
    teacher = utils.MultiCropWrapper(backbone(), DINOHead(512, 65536, False))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(65536, args.n_local + 2, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    crops = _crops(args.batch, 2, args.global_size, args.n_local, args.local_size, device)

    def step():
        with torch.no_grad():
            teacher_output = teacher(crops[:2])
        loss = dino_loss(student(crops), teacher_output, 0)
        optimizer.zero_grad()
        loss.backward()
        utils.clip_gradients(student, 3.0)
        utils.cancel_gradients_last_layer(0, student, 1)
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(0.996).add_((1 - 0.996) * param_q.detach().data)
        return loss

    return _time(step, args, device, "official", "fp32", {"channels_last": False})


def _time(step, args, device, impl: str, precision: str, extra: dict) -> dict:
    import resource

    import torch

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {
        "impl": impl, "model": args.model, "batch": args.batch,
        "crops": f"2x{args.global_size}+{args.n_local}x{args.local_size}", "precision": precision,
        "device": str(device), "threads": torch.get_num_threads(), **extra,
        "step_s": [round(t, 3) for t in times], "page_faults_per_step": round(faults / max(len(times), 1)),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


_BENCH = {"deepspeed": bench_deepspeed, "eager": bench_eager, "official": bench_official}


def _child(args) -> None:
    base, *mods = args.child.split("/")
    result = _BENCH[base](args, tuple(mods)) if mods else _BENCH[base](args)
    print(json.dumps(result), flush=True)


def _run_child(impl: str, argv: list[str], checkout: Path | None = None) -> dict:
    """One implementation in a fresh process; ``checkout``: the trainer's step as another checkout of this
    repository has it (its own benchmark script and its own ssl_container, first on the path)."""
    if checkout is None:
        cmd, cwd, env = [sys.executable, __file__, *argv, "--child", impl], REPO, None
    else:
        cmd = [sys.executable, str(checkout / "benchmarks" / "train_step.py"), *argv, "--child", "deepspeed"]
        cwd, env = checkout, {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{impl} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="deepspeed path: override model.channels_last (default: the config's, on)")
    parser.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2],
                        help="default: the trainer's (0 for a new run; a --baseline-checkout uses its own default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones' blocks (engine.compile)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"], help="engine.compile_mode")
    parser.add_argument("--profile", action="store_true",
                        help="deepspeed path: torch.profiler over 3 more steps (host share, kernels, syncs per step)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the implementations this many times")
    parser.add_argument("--impl", default="deepspeed,eager",
                        help="comma-separated: deepspeed, eager, official (official needs the two options below)")
    parser.add_argument("--official-dino", help="a checkout of facebookresearch/dino")
    parser.add_argument("--official-container", help="a checkout of allenai/container")
    parser.add_argument("--baseline-checkout", type=Path,
                        help="another checkout of this repository (e.g. `git worktree add /tmp/before REV`): its "
                             "trainer step runs as implementation 'baseline', alternating with this one's")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)

    impls = ["deepspeed", "eager"] if args.impl == "both" else [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = [i for i in impls if i.split("/")[0] not in _BENCH
               or (i.split("/")[1:] and (i.split("/")[0] != "deepspeed" or set(i.split("/")[1:]) - set(_MODS)))]
    if unknown:
        parser.error(f"unknown --impl {unknown}; choose from {sorted(_BENCH)}, or deepspeed/MOD with MOD in {_MODS}")
    if "official" in impls and not (args.official_dino and args.official_container):
        parser.error("--impl official needs --official-dino DIR and --official-container DIR (checkouts of "
                     "facebookresearch/dino and allenai/container)")
    argv = sys.argv[1:]
    baseline_argv = argv
    if args.baseline_checkout:
        i = argv.index("--baseline-checkout") if "--baseline-checkout" in argv else None
        baseline_argv = [a for j, a in enumerate(argv) if i is None or j not in (i, i + 1)]
        baseline_argv = [a for a in baseline_argv if not a.startswith("--baseline-checkout=")]
        impls.append("baseline")
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:
            runs[impl].append(_run_child(impl, baseline_argv, args.baseline_checkout.resolve()) if impl == "baseline"
                              else _run_child(impl, argv))
    results = {}
    for impl, rows in runs.items():
        steps = [t for r in rows for t in r["step_s"]]
        results[impl] = {**rows[-1], "impl": impl, **({"checkout": str(args.baseline_checkout)} if impl == "baseline" else {}),
                         "step_s": round(statistics.median(steps), 3), "min_step_s": round(min(steps), 3),
                         "all_steps_s": steps, "images_per_s": round(args.batch / statistics.median(steps), 3),
                         "rounds": args.rounds}
        print(json.dumps(results[impl]), flush=True)
    ds = results.get("deepspeed", {}).get("step_s")
    if ds:
        summary = {f"speedup_vs_{impl}": round(r["step_s"] / ds, 3) for impl, r in results.items() if impl != "deepspeed"}
        summary.update({f"min_speedup_vs_{impl}": round(r["min_step_s"] / results["deepspeed"]["min_step_s"], 3)
                        for impl, r in results.items() if impl != "deepspeed"})
        if args.model == "container_light":
            summary["speedup_vs_issue_reference_7.5s"] = round(7.5 / ds, 3)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
