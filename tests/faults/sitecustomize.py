"""Faults the tests inject into the trainer processes they start. Production code reads no fault
variables: with this folder on PYTHONPATH, Python imports this module at start-up (``sitecustomize``)
in every process, torchrun's ranks included, and it patches the product from outside, driven by
variables only the tests set:

    TEST_FAULT_NAN_CALLS=2,3,4      the DINO loss comes out NaN on these calls (0-based; one call per
                                    micro-step, so with grad_accum_steps=1 call k is the step after k)
    TEST_FAULT_KILL_BEFORE_META=4   rank 0 is SIGKILLed as it is about to write step 4's meta.json: the
                                    checkpoint's files are on disk but the folder is not marked complete
"""
import os


def _nan_calls(calls: set[int]) -> None:
    import itertools

    from ssl_container.dino import loss as dino_loss

    forward, counter = dino_loss.DINOLoss.forward, itertools.count()

    def faulty(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out * float("nan") if next(counter) in calls else out

    dino_loss.DINOLoss.forward = faulty


def _kill_before_meta(step: int) -> None:
    import signal
    from pathlib import Path

    from ssl_container.trainer import checkpoint

    write = checkpoint.atomic_write_text

    def faulty(path, *args, **kwargs):
        p = Path(path)
        if p.name == "meta.json" and p.parent.name == f"step_{step:08d}" and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, *args, **kwargs)

    checkpoint.atomic_write_text = faulty


if os.environ.get("TEST_FAULT_NAN_CALLS"):
    _nan_calls({int(s) for s in os.environ["TEST_FAULT_NAN_CALLS"].split(",") if s.strip()})
if os.environ.get("TEST_FAULT_KILL_BEFORE_META"):
    _kill_before_meta(int(os.environ["TEST_FAULT_KILL_BEFORE_META"]))
