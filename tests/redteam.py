"""Red-team replay of issue 34's data-loss cases with random timing, N tries each (too slow for the suite).

    python tests/redteam.py [--tries 10] [--cases 1,2,5,9] [--out /tmp/redteam]

1. ``shards write DIR/train-{..}.tar DIR --seed S`` (re-shuffle a set into its own folder): every image
   of the old set is in the new one, verify passes, exit 0.
2. SIGTERM to ``shards write`` rewriting a set with a new seed, at a random moment: afterwards the set
   is either the old one or the new one, whole (verify passes, the same images), or refused in one line
   by training until the command is rerun; never a mix that training accepts.
5. ``kill -9`` of a loader worker at a random step: the trainer saves at the step boundary, says so in one
   line, and the resumed run ends with exactly the losses and teacher of an uninterrupted one.
9. SIGTERM to ``export --onnx --overwrite`` at a random moment: the export folder is the old export or
   the new one, whole (its files match its meta.json), with no temporary file left.

Prints one JSON line per try and a summary line per case (``passed``/``tries``); exit 1 if any failed.
Needs ../shared/data/imagenette for cases 1, 2 and 5 (real JPEGs), like the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
SHARDS = REPO.parent / "shared" / "data" / "imagenette"
PY = sys.executable


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "ssl_container", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _images(folder: Path) -> list[str]:
    """sha256 of every image in the set's train split, sorted (what a set holds, whatever its order)."""
    meta = json.loads((folder / "dataset.json").read_text())
    from ssl_container.data.sources import expand_urls

    out = []
    for url in expand_urls(str(folder / meta["splits"]["train"]["shards"])):
        with tarfile.open(url) as tf:
            out += [hashlib.sha256(tf.extractfile(m).read()).hexdigest() for m in tf if m.name.endswith(".jpg")]
    return sorted(out)


def _source_set(root: Path, n: int = 400) -> Path:
    """A shard set of ``n`` real Imagenette images, written once."""
    src = root / "source"
    if not (src / "dataset.json").is_file():
        from ssl_container.data.shards import write_shards

        write_shards([str(SHARDS / "train-000000.tar")], str(root / "all"), max_count=n)
        first = json.loads((root / "all" / "dataset.json").read_text())["splits"]["train"]
        write_shards([str(root / "all" / "train-000000.tar")], str(src), max_count=25, seed=0)
        assert first["num_samples"] >= n
    return src


def case_1(root: Path, rng: random.Random) -> dict:
    work = root / "c1"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(_source_set(root), work)
    before = _images(work)
    pattern = json.loads((work / "dataset.json").read_text())["splits"]["train"]["shards"]
    proc = _cli("shards", "write", str(work / pattern), str(work), "--seed", str(rng.randrange(1, 10**6)),
                "--max-count", str(rng.choice([10, 25, 40])))
    out, err = proc.communicate(timeout=600)
    from ssl_container.data.shards import verify_shards

    ok = proc.returncode == 0 and _images(work) == before and verify_shards(str(work)).ok
    return {"ok": ok, "exit": proc.returncode}


def case_2(root: Path, rng: random.Random) -> dict:
    from ssl_container.config import ConfigError, check_shards, load_config
    from ssl_container.data.shards import verify_shards

    work = root / "c2"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(_source_set(root), work)
    before = _images(work)
    proc = _cli("shards", "write", str(root / "all" / "train-000000.tar"), str(work), "--seed",
                str(rng.randrange(1, 10**6)), "--max-count", "25")
    time.sleep(rng.uniform(0.2, 6.0))
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=600)
    pattern = json.loads((work / "dataset.json").read_text())["splits"]["train"]["shards"]
    try:
        check_shards(load_config(None, [f"data.urls=[{work / pattern}]"]))
        accepted = True
    except ConfigError as err:
        accepted, refusal = False, str(err)
    if accepted:
        ok = verify_shards(str(work)).ok and _images(work) == before
        state = "old or new set, whole"
    else:
        ok = "incomplete" in refusal
        state = "refused until rerun"
    return {"ok": ok, "exit": proc.returncode, "state": state}


def case_5(root: Path, rng: random.Random) -> dict:
    from test_stop_signals import COMMON, _children, _latest, _logged_steps
    from test_train import TINY, _env, _losses, _teacher

    ref = root / "c5_reference"
    if not (ref / "summary.json").is_file():
        subprocess.run([PY, "-m", "ssl_container", "train", f"run_dir={ref}", *TINY, *COMMON], cwd=REPO, env=_env(),
                       check=True, capture_output=True)
    run = root / "c5"
    shutil.rmtree(run, ignore_errors=True)
    args = [f"run_dir={run}", *TINY, *COMMON]
    proc = subprocess.Popen([PY, "-m", "ssl_container", "train", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    at = rng.randint(1, 8)
    while _logged_steps(run) < at and proc.poll() is None:
        time.sleep(0.02)
    workers = _children(proc.pid)
    if workers:
        os.kill(rng.choice(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    lines = [ln for ln in err.splitlines() if ln.startswith("ssl-container train: ")]
    saved = _latest(run) if (run / "checkpoints" / "latest").is_file() else None
    subprocess.run([PY, "-m", "ssl_container", "train", *args], cwd=REPO, env=_env(), check=True, capture_output=True)
    a, b = _teacher(ref, 10), _teacher(run, 10)
    exact = _losses(run) == _losses(ref) and all((a[k] == b[k]).all() for k in a)
    clean = proc.returncode == 0 or (proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err)
    return {"ok": exact and clean, "exit": proc.returncode, "killed_after_step": at, "saved": saved,
            **({} if clean else {"stderr_tail": err.strip().splitlines()[-6:]})}


def case_9(root: Path, rng: random.Random) -> dict:
    import torch
    from safetensors.torch import save_file

    from ssl_container.export import export, read_checkpoint
    from ssl_container.models import create_model

    work = root / "c9"
    if not (work / "b.safetensors").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for name, seed in (("a", 0), ("b", 1)):
            torch.manual_seed(seed)
            save_file(create_model("container_light", num_classes=0).state_dict(), str(work / f"{name}.safetensors"))
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    export(work / "a.safetensors", out)
    proc = _cli("export", str(work / "b.safetensors"), "--out", str(out), "--overwrite", "--onnx")
    time.sleep(rng.uniform(0.5, 25.0))
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    meta = json.loads((out / "meta.json").read_text())
    whole = hashlib.sha256((out / "backbone.safetensors").read_bytes()).hexdigest() == meta["weights"]["sha256"]
    whole = whole and (out / "model.safetensors").read_bytes() == (out / "backbone.safetensors").read_bytes()
    whole = whole and ((out / "model.onnx").is_file() == bool(meta.get("onnx")))
    read_checkpoint(out)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")] + \
        [p.name for p in work.iterdir() if p.name.startswith(".")]
    said = [ln for ln in err.splitlines() if ln.startswith("ssl-container export: ")]
    # 0: finished; 128+15 with one line: stopped; -15 with nothing said: killed while Python was still
    # starting, before the command ran (nothing of it written).
    one_line = proc.returncode == 0 or (proc.returncode == 143 and len(said) == 1 and "Traceback" not in err) or \
        (proc.returncode == -15 and not err.strip())
    return {"ok": whole and not leftovers and one_line, "exit": proc.returncode,
            "state": "new" if meta.get("onnx") else "old", "leftovers": leftovers}


CASES = {"1": case_1, "2": case_2, "5": case_5, "9": case_9}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--cases", default="1,2,5,9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/redteam")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    failed = False
    for case in args.cases.split(","):
        passed = 0
        for i in range(args.tries):
            result = CASES[case](root, rng)
            passed += bool(result["ok"])
            print(json.dumps({"case": int(case), "try": i + 1, **result}), flush=True)
        print(json.dumps({"case": int(case), "passed": passed, "tries": args.tries}), flush=True)
        failed |= passed != args.tries
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
