"""Evaluation commands refuse data they cannot use in one line before any work, and never cache an
empty extraction: a missing --data path, a missing shard, a split the set does not have."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_synthetic_shards, write_tar

REPO = Path(__file__).resolve().parents[1]


def _eval(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def train_test_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets") / "tt"
    write_synthetic_shards(root, n_shards=1, per_shard=6, split="train")
    write_synthetic_shards(root, n_shards=1, per_shard=6, split="test", seed=1)
    return root


@pytest.mark.parametrize("module", ["eval.knn", "eval.linear"])
def test_a_missing_data_path_is_refused_in_one_line_and_nothing_is_cached(tmp_path, module):
    cache = tmp_path / "cache"
    proc = _eval(module, "--data", str(tmp_path / "no_such_set"), "--model", "container_light_narrow",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no such dataset folder" in proc.stderr
    assert not cache.exists() and not (tmp_path / "out").exists()


def test_a_split_the_set_lacks_is_refused_before_any_extraction(tmp_path, train_test_set):
    cache = tmp_path / "cache"
    proc = _eval("eval.knn", "--data", str(train_test_set), "--val-split", "val", "--model", "container_light_narrow",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "no split 'val'; its dataset.json lists ['test', 'train']" in proc.stderr
    assert not cache.exists()  # the train split was not extracted first


def test_one_held_out_rule_for_every_eval_command(train_test_set, tmp_path):
    from eval.features import held_out_split

    assert held_out_split(train_test_set) == "test"
    write_synthetic_shards(tmp_path / "tv", n_shards=1, per_shard=4, split="train")
    write_synthetic_shards(tmp_path / "tv", n_shards=1, per_shard=4, split="val")
    assert held_out_split(tmp_path / "tv") == "val"
    missing = _eval("eval.protocol", str(tmp_path / "none"), "--data", str(tmp_path / "none"))
    assert missing.returncode == 2 and "no such dataset folder" in missing.stderr


def test_missing_shards_and_empty_extractions(tmp_path):
    from eval.features import get_features, resolve_data

    with pytest.raises(FileNotFoundError, match="1 of 2 shards do not exist"):
        write_synthetic_shards(tmp_path / "a", n_shards=1, per_shard=2)
        resolve_data(str(tmp_path / "a" / "train-{000000..000001}.tar"))
    write_tar(tmp_path / "empty-000000.tar", [("k0", {"txt": b"not an image"})])
    src = resolve_data(str(tmp_path / "empty-000000.tar"), "train")
    with pytest.raises(ValueError, match="no readable sample"):
        get_features(torch.nn.Flatten(), src, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("meta.json"))


def test_the_feature_cache_keys_on_the_shards_on_disk(tmp_path):
    """A shard rewritten under an old dataset.json (same names, same recorded digests) is not a cache hit."""
    from eval.features import cache_key, resolve_data

    root = tmp_path / "set"
    write_synthetic_shards(root, n_shards=1, per_shard=4, split="train", seed=0)
    before = cache_key("w", resolve_data(str(root), "train"), None, "pooled")
    meta = (root / "dataset.json").read_text()
    write_synthetic_shards(root, n_shards=1, per_shard=5, split="train", seed=3, dataset_json=False)
    assert (root / "dataset.json").read_text() == meta
    assert cache_key("w", resolve_data(str(root), "train"), None, "pooled") != before


def test_a_truncated_image_in_a_folder_is_skipped_and_a_read_only_run_folder_still_gets_results(tmp_path, monkeypatch):
    """One truncated JPEG in --train-folder was a traceback naming no file; --weights on a read-only run
    folder computed everything, then failed writing RUN/eval."""
    import io
    import os

    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from eval.knn import main
    from ssl_container.export import export
    from ssl_container.models import create_model

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="JPEG")
                (d / f"{i}.jpg").write_bytes(buf.getvalue())
    good = (tmp_path / "imgs" / "train" / "a" / "0.jpg").read_bytes()
    (tmp_path / "imgs" / "train" / "a" / "cut.jpg").write_bytes(good[: len(good) // 3])
    model = create_model("container_light_narrow", num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    exported = export(tmp_path / "w.safetensors", tmp_path / "ro" / "export", model_name="container_light_narrow")
    # The folder read-only as a colleague sees it (root may write anywhere, so its access check is faked).
    real_access = os.access
    ro = str(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(ro) and mode & os.W_OK
                        else real_access(p, mode))
    monkeypatch.chdir(tmp_path)
    rc = main(["--weights", str(exported), "--train-folder", str(tmp_path / "imgs" / "train"),
               "--val-folder", str(tmp_path / "imgs" / "val"), "--no-cache", "--ks", "1", "--resize", "64",
               "--crop", "64"])
    assert rc == 0
    doc = json.loads((tmp_path / "eval_outputs" / "export" / "knn.json").read_text())
    assert doc["num_train"] == 6 and doc["num_test"] == 6, doc  # the truncated one skipped, the rest kept
    assert not (exported / "eval").exists()  # an export folder (uploaded whole) never receives results
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["--weights", str(exported), "--train-folder", str(tmp_path / "imgs" / "train"), "--val-folder",
                 str(tmp_path / "imgs" / "val"), "--no-cache", "--ks", "1", "--resize", "64", "--crop", "64"]) == 0
    assert (tmp_path / "ro" / "export_eval" / "knn.json").is_file() and not (exported / "eval").exists()
