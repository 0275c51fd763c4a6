"""launch.wheelhouse: a wheelhouse built here installs the project on an offline node without touching
its PyTorch.

The "node" is a fresh virtual environment that sees only this environment's PyTorch (and what PyTorch
itself needs), as a cluster's CUDA PyTorch module would provide it; the install runs with
``--no-index``, so anything missing from the wheelhouse fails it.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pypi_reachable() -> bool:
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "braceexpand"], capture_output=True,
                          text=True, timeout=60)
    return proc.returncode == 0


def _closure(name: str, seen: set[str], extras: frozenset[str] = frozenset()) -> set[str]:
    """``name`` and every installed distribution it needs here (markers and extras evaluated)."""
    from packaging.requirements import Requirement

    key = re.sub(r"[-_.]+", "-", name).lower()
    if (key, extras) in seen:
        return seen
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return seen
    seen.add((key, extras))
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
            _closure(req.name, seen, frozenset(req.extras))
    return seen


def _expose(names: set[str], folder: Path) -> None:
    """Link the installed files of these distributions into ``folder`` (the node's PyTorch module)."""
    folder.mkdir()
    for name in {n for n, _ in names}:
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists() and top != "..":
                (folder / top).symlink_to(src)


@pytest.mark.slow
def test_wheelhouse_installs_offline_and_leaves_the_nodes_torch_alone(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here: the wheelhouse is built from it")
    house = tmp_path / "wheelhouse"
    proc = subprocess.run([sys.executable, "-m", "launch.wheelhouse", "--out", str(house)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    wheels = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in house.glob("*.whl")}
    assert {"ssl-container", "deepspeed", "webdataset", "submitit", "omegaconf", "timm", "safetensors"} <= wheels
    assert not wheels & {"torch", "torchvision", "triton"} and not any(w.startswith("nvidia-") for w in wheels)
    deepspeed = next(house.glob("deepspeed-*.whl"))
    assert deepspeed.name.endswith("-py3-none-any.whl")  # pure Python: DS_BUILD_OPS=0
    assert "pip install --no-index --find-links" in (house / "INSTALL.txt").read_text()
    pins = dict(line.split("==") for line in (house / "requirements.txt").read_text().split())
    assert set(pins) == wheels

    # The node: a bare environment whose only packages are the site's torch + torchvision.
    node = tmp_path / "node"
    venv.EnvBuilder(with_pip=True).create(node)
    quiet = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"}  # no local indexes
    # The site's torch comes with its own setuptools (torch needs >= 77): drop the venv's older one.
    subprocess.run([str(node / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=quiet,
                   check=True, capture_output=True)
    site_torch = tmp_path / "site_torch"
    _expose(_closure("torch", set()) | _closure("torchvision", set()), site_torch)
    site = next((node / "lib").glob("python3*/site-packages"))
    (site / "site_torch.pth").write_text(str(site_torch) + "\n")
    py = str(node / "bin" / "python")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(house), "ssl-container"],
                          capture_output=True, text=True, timeout=900, env=quiet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = ("import torch, deepspeed, webdataset, submitit, ssl_container.train, launch.submit; "
             "print('FILES', torch.__file__, ssl_container.__file__)")
    proc = subprocess.run([py, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=quiet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_file, project_file = next(ln for ln in proc.stdout.splitlines() if ln.startswith("FILES ")).split()[1:]
    assert torch_file.startswith(str(site_torch))  # the node's own torch, untouched
    assert project_file.startswith(str(site))  # the project from the wheelhouse
