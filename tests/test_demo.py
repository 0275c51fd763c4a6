"""The README's first command end to end: on Imagenette, and on a machine without ../shared."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
CLIPART = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = ("animals", "computer", "food", "people", "recreation", "shapes", "signs_and_symbols", "transportation")
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"


def _demo(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("SSL_CONTAINER_DATA", None)
    proc = subprocess.run([sys.executable, "-m", "ssl_container", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_report(out, proc, data, n_test):
    report = json.loads((out / "demo.json").read_text())
    assert report["data"] == data
    assert set(report["knn_k20_top1"]) == {"random_init", "raw_pixels", "dino_teacher"}
    assert report["knn_test_images"] == n_test
    for name in ("randomly initialised", "raw pixels", "DINO steps (teacher)"):
        assert name in proc.stdout, name
    assert (out / "export" / "backbone.safetensors").is_file()
    from PIL import Image

    with Image.open(out / "pictures.png") as im:  # 4 images x (image, 2 PCA, 4 heads) for 2 models
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]
    assert report["pictures"] == str(out / "pictures.png")  # absolute even when --out was relative
    with Image.open(out / "retrieval.png") as im:  # 8 queries x (1 + 3 x 5 neighbours)
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert report["retrieval"] == str(out / "retrieval.png")
    assert report["export"] == str(out / "export")
    return report


@pytest.mark.skipif(not CLIPART.is_dir(), reason="needs Debian's openclipart-png (.ci/run installs it)")
def test_demo_without_shared_data_from_a_relative_out(tmp_path):
    # What a fresh clone without ../shared gets: Open Clip Art converted to shards under a relative
    # --out (the path that was once joined twice).
    proc = _demo(tmp_path, "--steps", "3", "--out", "runs/demo")
    out = tmp_path / "runs" / "demo"
    meta = json.loads((out / "openclipart" / "dataset.json").read_text())
    assert meta["classes"] == list(CLIPART_CLASSES)
    train, test = meta["splits"]["train"]["num_samples"], meta["splits"]["test"]["num_samples"]
    # 80 / 20 of every category (openclipart-png 0.18: 6,981 drawings, 5,585 + 1,393 read); a drawing Pillow
    # refuses to decode is counted in the skipped line, never lost silently.
    assert 5000 < train < 6000 and 0.19 < test / (train + test) < 0.21
    found = sum(1 for name in CLIPART_CLASSES for _ in (CLIPART / name).rglob("*.png"))
    skipped = re.search(r"\[demo\] (\d+) drawing\(s\) skipped", proc.stdout)
    assert train + test + (int(skipped.group(1)) if skipped else 0) == found
    # The README's figure for what a fresh machine trains on stays true.
    assert f"the {train + test:,} drawings of its 8" in (REPO / "README.md").read_text().replace("\n", " ")
    assert not (out / "openclipart_png").exists()  # the staging PNGs are removed
    _check_report(out, proc, "openclipart", test)


@pytest.mark.skipif(not FASHION.is_file(), reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_the_fashion_mnist_fallback_converts_to_shards(tmp_path, monkeypatch):
    from ssl_container.cli import demo

    # A conversion stopped between its splits (here: the held-out split's writer fails) leaves no
    # dataset.json behind that a later demo would take for a finished conversion.
    def stopped(listing, out_dir, *, split, **kwargs):
        if split == "test":
            raise KeyboardInterrupt
        return real(listing, out_dir, split=split, **kwargs)

    real = demo.write_shards
    monkeypatch.setattr(demo, "write_shards", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.find_data("fashion-mnist", tmp_path)
    assert not (tmp_path / "fashion_mnist").exists()
    assert (tmp_path / "fashion_mnist.partial" / "dataset.json").is_file()  # the unfinished one, set aside
    monkeypatch.setattr(demo, "write_shards", real)

    found = demo.find_data("fashion-mnist", tmp_path)
    meta = json.loads((found["folder"] / "dataset.json").read_text())
    assert (meta["splits"]["train"]["num_samples"], meta["splits"]["test"]["num_samples"]) == (6000, 2000)
    assert meta["classes"][0] == "t-shirt" and len(meta["classes"]) == 10
    assert not (tmp_path / "fashion_mnist_png").exists() and not (tmp_path / "fashion_mnist.partial").exists()
    # A folder of that name the demo did not finish is refused, not overwritten.
    (found["folder"] / "dataset.json").unlink()
    with pytest.raises(SystemExit, match="holds no dataset.json"):
        demo.find_data("fashion-mnist", tmp_path)
    assert (found["folder"] / "train-000000.tar").is_file()


@pytest.mark.skipif(not (IMAGENETTE / "dataset.json").is_file(), reason="needs ../shared/data/imagenette")
def test_demo_on_imagenette_prints_three_rows(tmp_path):
    proc = _demo(REPO, "--data", str(IMAGENETTE), "--steps", "3", "--eval-subset", "--out", str(tmp_path / "demo"))
    report = _check_report(tmp_path / "demo", proc, "imagenette", 982)
    assert report["steps"] == 3 and report["model"] == "container_light_narrow"


def test_the_demo_never_replaces_earlier_outputs_without_overwrite(tmp_path, capsys):
    """A file of the user's in runs/demo/pretrain was deleted without a word; now the demo refuses
    before writing anything, and --overwrite replaces the demo's own outputs only."""
    from ssl_container.cli.demo import _clear_earlier_outputs, main

    out = tmp_path / "demo"
    (out / "pretrain").mkdir(parents=True)
    (out / "pretrain" / "mine.txt").write_text("keep me")
    (out / "notes.md").write_text("mine too")
    assert main(["--out", str(out), "--steps", "2", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} already holds pretrain" in err and "--overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == ["mine.txt", "notes.md", "pretrain"]  # untouched

    (out / "demo.json").write_text("{}")
    _clear_earlier_outputs(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]  # not the user's other files
    assert "replacing" in capsys.readouterr().out


def test_refusals_of_demo_visualize_and_export_answer_before_torch_loads(tmp_path):
    """`ssl-container demo` without --overwrite took 7.3 s to refuse; visualize with missing images and
    export onto an existing folder likewise: each is now one line, exit 2, torch never imported."""
    import subprocess
    import sys
    import time

    (tmp_path / "demo" / "export").mkdir(parents=True)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "meta.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(b"")
    cases = [(["demo", "--out", str(tmp_path / "demo")], "already holds export"),
             (["visualize", "container_light_narrow", "--images", str(tmp_path / "none.jpg")], "no such image"),
             (["export", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "exp")], "already holds meta.json")]
    for argv, said in cases:
        code = ("import sys; from ssl_container.cli import main; rc = main(%r); "
                "print('torch' in sys.modules); sys.exit(rc)" % argv)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert time.perf_counter() - t0 < 5
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, argv
        assert proc.stdout.strip() == "False", argv
