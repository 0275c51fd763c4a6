"""The trainer's step, run 20 times on fixed synthetic crops: losses and the final teacher.

    python tests/step_reference.py --zero-stage N --out FILE.safetensors
    python -m torch.distributed.run --nproc-per-node 2 tests/step_reference.py --zero-stage N --out F --steps 5

``tests/fixtures/step_reference_zero{0,1,2}.safetensors`` were written with this script by the
trainer as it was before the step's bookkeeping moved to flat storage (commit 2006469);
tests/test_step_equality.py runs the same steps with today's trainer and compares. Regenerate only
on purpose (a change that is meant to change the numbers), and say so in the commit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = 20
OVERRIDES = [
    "model.name=container_light", "model.kwargs={embed_dims: [16,32,64,128], depths: [1,1,1,1]}",
    "model.drop_path_rate=0.1", "head.out_dim=256", "head.hidden_dim=128", "head.bottleneck_dim=64",
    "data.batch_size=4", "data.crops.global_size=64", "data.crops.local_size=32", "data.crops.n_local=2",
    "data.urls=[unused]", "data.samples_per_epoch=400", "data.num_workers=0", "epochs=1",
    "schedule.warmup_epochs=0", "optim.clip_grad=0.3", "engine.precision=fp32", "engine.device=cpu",
    "logging.tensorboard=false",
]


def batches(cfg, rank: int = 0):
    """Different crops every step and rank, the same for every run."""
    c = cfg.data.crops
    for step in range(10 ** 6):
        g = torch.Generator().manual_seed(1000 + step + 7919 * rank)
        crops = [torch.randn(cfg.data.batch_size, 3, c.global_size, c.global_size, generator=g) for _ in range(2)]
        crops += [torch.randn(cfg.data.batch_size, 3, c.local_size, c.local_size, generator=g) for _ in range(c.n_local)]
        yield {"crops": crops}


def run_steps(zero_stage: int, extra: list[str] = (), steps: int = STEPS, save_to: str | None = None,
              run_dir: str | None = None) -> dict[str, torch.Tensor]:
    """``steps`` trainer steps on this process's rank (torchrun sets the ranks; one process without);
    rank 0 writes the result to ``save_to`` when given. ``run_dir``: the run folder all ranks share
    (default: a temporary one, for one process)."""
    from ssl_container.config import load_config
    from ssl_container.distributed import cleanup, init_distributed, resolve_env
    from ssl_container.trainer.run import build_run, train_step

    torch.set_num_threads(1)
    cfg = load_config(None, [*OVERRIDES, f"engine.zero_stage={zero_stage}", *extra])
    device = torch.device("cpu")
    env = init_distributed(device, resolve_env())
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg.run_dir = run_dir or d
            run = build_run(cfg, env, device, resume=False)
            it = batches(cfg, env.rank)
            losses = [train_step(run, it).metrics["loss"] for _ in range(steps)]
            out = {f"teacher.{k}": v.detach().clone().contiguous() for k, v in run.teacher.state_dict().items()}
            out["center"] = run.method.loss.center.detach().clone()
            out["losses"] = torch.tensor(losses, dtype=torch.float64)
            run.close()
            if save_to and env.is_main:
                save_file(out, save_to)
            return out
    finally:
        cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zero-stage", type=int, required=True)
    p.add_argument("--out", required=True, help="written by rank 0")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--run-dir", default=None, help="a new run folder, shared by the ranks (default: a temporary one)")
    args = p.parse_args()
    run_steps(args.zero_stage, steps=args.steps, save_to=args.out, run_dir=args.run_dir)


if __name__ == "__main__":
    main()
