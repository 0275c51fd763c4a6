"""A wheelhouse for an offline GPU node: the project and everything it needs, as wheels, except PyTorch.

    python -m launch.wheelhouse --out wheelhouse [--python-version 3.12] [--extras cpu] [--skip NAME ...]

Many clusters' compute nodes have no internet, and their PyTorch is a CUDA build the site installed
(or a module provides). On a machine with PyPI, this builds a folder of wheels for the node's Python:

* the project itself (``pip wheel --no-deps .``);
* DeepSpeed, which PyPI ships as a source archive only: built here as a pure-Python wheel with
  ``DS_BUILD_OPS=0`` (its CUDA ops are JIT-built on first use, and the trainer uses none of them);
* every other dependency, resolved from the wheels' own metadata for the target Python and Linux
  x86-64 (binary wheels where the package has them; source-only ones are built into wheels here).

PyTorch, torchvision, Triton and NVIDIA's CUDA wheels are left out on purpose (``--skip`` adds more,
e.g. packages the node's image already has). On the node, install into the environment that holds
its CUDA PyTorch; pip keeps that PyTorch, since it satisfies the project's requirement:

    pip install --no-index --find-links wheelhouse ssl-container

The folder also gets ``requirements.txt`` (what is in it, pinned) and ``INSTALL.txt`` (that command).
"""
from __future__ import annotations

import argparse
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Never packed: the node's own CUDA stack. Names are normalised (PEP 503).
ALWAYS_SKIP = ("torch", "torchvision", "torchaudio", "triton")
SKIP_PREFIXES = ("nvidia-",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"wheelhouse: {' '.join(cmd[3:])} failed:\n{proc.stderr.strip()[-3000:]}")


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def _wheel_name(wheel: Path) -> str:
    return normalize(wheel.name.split("-")[0])


def _environment(python_version: str) -> dict[str, str]:
    major, minor = python_version.split(".")[:2]
    return {"python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _requirements(wheel: Path, extras: set[str], env: dict[str, str]):
    """The wheel's Requires-Dist that apply to the target (its markers evaluated there)."""
    from packaging.requirements import Requirement

    for line in _metadata(wheel).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
            yield req


def _fetch(req: str, out: Path, python_version: str, work: Path) -> Path:
    """One distribution as a wheel for the target: a binary wheel when PyPI has one, else built here."""
    before = set(out.glob("*.whl"))
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    abi = "cp" + python_version.replace(".", "")[:3]
    try:
        _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
             "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms, "-d", str(out), req)
    except SystemExit:
        # Source-only on PyPI (pure Python, e.g. antlr4-python3-runtime): build the wheel here.
        _pip("wheel", "--no-deps", "-w", str(out), req)
    new = set(out.glob("*.whl")) - before
    if not new:  # already there (same file)
        name = normalize(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])
        new = {w for w in out.glob("*.whl") if _wheel_name(w) == name}
    return sorted(new)[0]


def build(out: Path, python_version: str, extras: tuple[str, ...] = (), skip: tuple[str, ...] = (),
          deepspeed: str | None = None, log=print) -> list[Path]:
    """Fill ``out`` with the project's wheel and its dependencies' (see the module doc); returns them."""
    from packaging.requirements import Requirement

    out.mkdir(parents=True, exist_ok=True)
    skipped = {normalize(s) for s in (*ALWAYS_SKIP, *skip)}
    env = _environment(python_version)
    with tempfile.TemporaryDirectory(prefix="wheelhouse_") as tmp:
        work = Path(tmp)
        log(f"wheelhouse: the project ({REPO.name})")
        # Built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
        src = work / "src"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", ".whl",
                                                                 ".gpu_data", "__pycache__", "wheelhouse", "outputs"))
        _pip("wheel", "--no-deps", "-w", str(out), str(src))
        project = next(w for w in out.glob("*.whl") if _wheel_name(w) == "ssl-container")
        queue = [(r, set()) for r in _requirements(project, set(extras), env)]
        have: dict[str, Path] = {"ssl-container": project}
        while queue:
            req, _ = queue.pop(0)
            name = normalize(req.name)
            if name in have or name in skipped or name.startswith(SKIP_PREFIXES):
                continue
            if name == "deepspeed":
                version = deepspeed or _newest("deepspeed", req)
                log(f"wheelhouse: deepspeed {version}, built with DS_BUILD_OPS=0 (pure Python)")
                # Its setup imports torch to read the CUDA version: build without isolation, here.
                _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), f"deepspeed=={version}",
                     env={**os.environ, "DS_BUILD_OPS": "0"})
                wheel = next(w for w in out.glob("*.whl") if _wheel_name(w) == "deepspeed")
            else:
                spec = f"{req.name}{','.join(str(s) for s in req.specifier)}" if req.specifier else req.name
                wheel = _fetch(spec, out, python_version, work)
                log(f"wheelhouse: {wheel.name}")
            have[name] = wheel
            queue += [(r, set()) for r in _requirements(wheel, set(req.extras), env)]
        # Every requirement of every wheel is met by the version chosen for it.
        versions = {n: w.name.split("-")[1] for n, w in have.items()}
        for wheel in have.values():
            for r in _requirements(wheel, set(), env):
                n = normalize(r.name)
                if n in versions and r.specifier and not r.specifier.contains(versions[n], prereleases=True):
                    raise SystemExit(f"wheelhouse: {wheel.name} needs {r}, but {n} {versions[n]} was packed")
    (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(versions.items())))
    (out / "INSTALL.txt").write_text(
        f"# Python {python_version}, Linux x86-64, into the environment that holds the node's CUDA PyTorch:\n"
        f"pip install --no-index --find-links {out.name} ssl-container{'[' + ','.join(extras) + ']' if extras else ''}\n"
        f"# left out (the node's own): {', '.join(sorted(skipped))}, nvidia-*\n")
    _ = Requirement  # imported first so a missing 'packaging' fails before any download
    return sorted(have.values())


def _newest(name: str, req) -> str:
    """The newest release of ``name`` that ``req`` allows (pip's index lookup)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    found = re.search(r"Available versions: (.*)", proc.stdout)
    if not found:
        raise SystemExit(f"wheelhouse: cannot list {name}'s releases (no index reachable?): {proc.stderr.strip()}")
    for version in (v.strip() for v in found.group(1).split(",")):
        if req.specifier.contains(version):
            return version
    raise SystemExit(f"wheelhouse: no release of {name} satisfies {req}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.wheelhouse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="wheelhouse", help="folder for the wheels (default: wheelhouse)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python, e.g. 3.12 (default: this one's)")
    p.add_argument("--extras", default="", help="the project's extras to include, e.g. cpu (faiss-cpu)")
    p.add_argument("--skip", nargs="*", default=[], help="more distributions to leave to the node (its image's)")
    p.add_argument("--deepspeed", help="DeepSpeed version to build (default: the newest the project allows)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wheels = build(Path(args.out), args.python_version, tuple(e for e in args.extras.split(",") if e),
                   tuple(args.skip), args.deepspeed)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"wheelhouse: {len(wheels)} wheels, {size:.1f} MiB in {args.out}; on the node: "
          f"{(Path(args.out) / 'INSTALL.txt').read_text().splitlines()[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
