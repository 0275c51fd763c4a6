"""The README check: every command in the README's bash blocks is verified, so none can drift.

Each command is either run for real here (the cheap ones), or its arguments are checked by the very
parser and config loader that would run it (flags, subcommands, config keys and values, extras),
or it is named as run by another test (``COVERED``). A command added to the README that none of
these recognises fails this test until it is given a check.
"""
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Commands another test runs end to end (the command, then the test that runs it).
COVERED = {
    "make demo": "tests/test_demo.py (the demo on Imagenette and on Open Clip Art)",
    "make test": ".ci/run (CI runs it on a clean clone)",
    "python3 -m venv .venv": "make setup (every make target creates the venv this way)",
    ". .venv/bin/activate": "make setup",
    "bash benchmarks/gpu_suite.sh --dry-run": "tests/test_gpu_suite.py",
    "pip install --no-index --find-links wheelhouse ssl-container": "tests/test_wheelhouse.py (into a fresh node)",
}


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks: continuations joined, comments dropped,
    ``a && b`` split in two."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            cmd = []
            for w in words + ["&&"]:
                if w == "&&":
                    if cmd:
                        out.append(shlex.join(cmd) if cmd[0] != "." else " ".join(cmd))
                    cmd = []
                else:
                    cmd.append(w)
    return out


def _quiet(fn, *args):
    with redirect_stdout(io.StringIO()) as out, redirect_stderr(io.StringIO()) as err:
        try:
            code = fn(*args)
        except SystemExit as e:  # argparse's exit on bad arguments
            code = e.code
    return code, out.getvalue() + err.getvalue()


def _check_train_args(args: list[str]) -> None:
    from ssl_container.config import load_config, train_argument_parser

    parsed = train_argument_parser().parse_args(args)
    load_config(REPO / parsed.config if parsed.config else None, parsed.overrides)  # keys, types, ranges


def check(cmd: str, sandbox: Path | None = None) -> str:
    """Verify one README command; returns how it was verified. Cluster paths (/shared/...) of launch
    examples are mapped under ``sandbox``."""
    if cmd in COVERED:
        return "covered: " + COVERED[cmd]
    words = shlex.split(cmd)
    prog, args = words[0], words[1:]
    if prog == "pip" and args[:2] == ["install", "-e"]:
        extras = re.fullmatch(r"\.\[(.*)\]", args[2]).group(1).split(",")
        declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert set(extras) <= set(declared), f"{cmd}: extras {set(extras) - set(declared)} not in pyproject.toml"
        return "extras exist"
    if prog == "torchrun":
        i = args.index("-m")
        assert args[i + 1] == "ssl_container.train", cmd
        _check_train_args(args[i + 2:])
        return "trainer arguments + config"
    if prog == "python" and args[0] == "-m":
        module, rest = args[1], args[2:]
        if module == "ssl_container.train":
            _check_train_args(rest)
            return "trainer arguments + config"
        if "..." in rest:  # an elided example ("--mode dino ..."): check the flags shown
            rest = rest[:rest.index("...")]
            if module == "eval.linear":
                rest = ["--data", "x", *rest]
        mod = __import__(module, fromlist=["build_parser"])
        mod.build_parser().parse_args(rest)
        return "module's parser"
    if prog == "python" and args[0].startswith("benchmarks/"):
        import importlib.util

        spec = importlib.util.spec_from_file_location(Path(args[0]).stem, REPO / args[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.build_parser().parse_args(args[1:])
        return "the benchmark's parser"
    if prog == "ssl-container":
        from ssl_container.cli import build_parser

        sub = args[0]
        if sub == "train":
            if "--print-config" in args:
                code, text = _quiet(__import__("ssl_container.cli", fromlist=["main"]).main, args)
                assert code == 0 and "model:" in text, text
                return "run"
            _check_train_args(args[1:])
            return "trainer arguments + config"
        if sub == "launch":
            from launch.submit import main as launch_main

            if sandbox is not None:  # the example's cluster file system, with the run folder it names
                args = [a.replace("/shared/", f"{sandbox}/shared/") for a in args]
                if "--checkpoint" in args:
                    (Path(args[args.index("--checkpoint") + 1]) / "checkpoints").mkdir(parents=True)

            cut = args.index("--") if "--" in args else len(args)  # after --: the eval module's arguments
            code, text = _quiet(launch_main, [*args[1:cut], "--dry-run", *args[cut:]])
            assert code == 0, f"{cmd} --dry-run failed:\n{text}"
            assert "#SBATCH" in text, text
            return "--dry-run (the sbatch script rendered, nothing submitted)"
        if sub == "study":
            from study.cli import main as study_main

            rest = [a for a in args[1:] if a != "--dry-run"]
            code, text = _quiet(study_main, [*rest, "--dry-run"])
            assert code == 0, f"{cmd} --dry-run failed:\n{text}"
            return "--dry-run (the plan, or with --slurm the array's sbatch script)"
        build_parser().parse_args(args)
        return "ssl-container's parser"
    raise AssertionError(f"README command without a check: {cmd!r} — run it in a test, check it here, or add it to COVERED")


def test_the_readme_check_finds_the_commands():
    cmds = readme_commands()
    assert "make demo" in cmds and "make test" in cmds
    assert any(c.startswith("ssl-container launch") for c in cmds)
    assert len(cmds) >= 25


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command(cmd, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    how = check(cmd, tmp_path)
    assert how


def test_the_check_catches_drift():
    with pytest.raises(SystemExit):  # a flag that does not exist
        check("ssl-container export runs/x --out y --no-such-flag")
    from ssl_container.config import ConfigError

    with pytest.raises(ConfigError):  # a config key that does not exist
        check("ssl-container train --config configs/demo.yaml optim.no_such_key=1")
    with pytest.raises(AssertionError, match="without a check"):
        check("curl http://example.com")


def test_readme_first_commands_are_the_makefile_targets():
    make = subprocess.run(["make", "-n", "demo", "test"], cwd=REPO, capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    assert "-m ssl_container demo" in make.stdout and "-m pytest" in make.stdout


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"


def _fallback_like_set(root: Path) -> Path:
    """A set shaped like the demo's fallback (runs/demo/openclipart): transparent PNG drawings, splits
    train/test, 8 classes, 3 + 1 shards, written by the project's shard writer."""
    import numpy as np
    from PIL import Image

    from ssl_container.data.shards import write_shards

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("test", 16)):
        for i in range(n):
            folder = root / "png" / split / f"category{i % 8}"
            folder.mkdir(parents=True, exist_ok=True)
            rgba = np.zeros((96, 96, 4), np.uint8)
            rgba[20:76, 20:76] = (*rng.integers(0, 255, 3), 255)
            Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
        write_shards(str(root / "png" / split), str(root / "set"), split=split, max_count=16 if split == "train" else 64)
    return root / "set"


@pytest.mark.parametrize("data", ["imagenette", "fallback-shaped"])
def test_readme_fine_tuning_example_runs(tmp_path, data):
    """The README's Python fine-tuning example, as printed, on an export of the demo's architecture, on
    Imagenette and on a set shaped like the demo's fallback (PNG, train/test, 8 classes, 3 + 1 shards):
    only its length is cut (2 steps, the first shard of each split) and its paths pointed at a fresh export."""
    import torch

    from ssl_container.export import export
    from ssl_container.models import create_model

    if data == "imagenette" and not (IMAGENETTE / "dataset.json").is_file():
        pytest.skip("needs ../shared/data/imagenette")
    root = IMAGENETTE if data == "imagenette" else _fallback_like_set(tmp_path / "fallback")
    blocks = [b for b in readme_python_blocks() if "local-dir:" in b]
    assert len(blocks) == 1, "the README's fine-tuning example is expected once"
    code = blocks[0]
    torch.manual_seed(0)
    model = create_model("container_light_narrow", num_classes=0)
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    out = export(tmp_path / "weights.pth", tmp_path / "export", model_name="container_light_narrow")
    for old, new in [('"runs/demo/export"', repr(str(out))), ('"../shared/data/imagenette"', repr(str(root))),
                     ("step == 199", "step == 1"), ("info.urls(split)", "info.urls(split)[:1]")]:
        assert old in code, f"the README example changed: {old!r} is gone; update this test"
        code = code.replace(old, new)
    script = tmp_path / "finetune.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = "val" if data == "imagenette" else "test"
    top1 = float(re.search(rf"{held} top-1 ([0-9.]+)", proc.stdout).group(1))
    assert 0.0 <= top1 <= 1.0
