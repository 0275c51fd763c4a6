"""eval.features: feature kinds, exactly-once extraction over ranks (2 gloo processes), the cache."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval import features as F
from ssl_container.data.augment import EvalTransformConfig

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TRANSFORM = EvalTransformConfig(resize=32, crop=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, num_classes: int = 3, seed: int = 0) -> list[str]:
    """A tiny WebDataset (JPEG + .cls) with a dataset.json, made up here (no data copied)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        path = folder / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"toy_train_{s * per_shard + i:05d}"
                for ext, data in (("jpg", _jpeg(rng, 36 + i % 5, 40)), ("cls", str((s + i) % num_classes).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    meta = {"name": "toy", "classes": [f"c{i}" for i in range(num_classes)],
            "splits": {"train": {"shards": f"train-{{000000..{n_shards - 1:06d}}}.tar", "num_shards": n_shards,
                                 "num_samples": n_shards * per_shard}}}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return urls


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_shards(folder, n_shards=3, per_shard=7)
    return folder


def tiny_model(seed: int = 0):
    """A small Container (same class and API as Container-Light, a fraction of the cost)."""
    from ssl_container.models import Container

    torch.manual_seed(seed)
    return Container(num_classes=0, embed_dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), head_dim=8).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def test_feature_kinds():
    model = F.build_model("container_light", seed=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = F.forward_features(model, x, ("pooled", "concat"))
        ref = model(x)
    assert out["pooled"].shape == (2, 512) and out["concat"].shape == (2, 64 + 128 + 320 + 512)
    torch.testing.assert_close(out["pooled"], ref)
    torch.testing.assert_close(out["concat"][:, -512:], ref)  # concat ends with the pooled feature
    with pytest.raises(ValueError, match="unknown feature kind"):
        F.forward_features(model, x, ("cls",))


def test_weights_digest_and_cache_key(model, toy):
    d0 = F.weights_digest(model)
    assert d0 == F.weights_digest(tiny_model(0))
    assert d0 != F.weights_digest(tiny_model(1))
    src = F.resolve_data(toy, "train")
    assert src.num_samples == 21 and src.num_classes == 3 and len(src.urls) == 3
    k = F.cache_key(d0, src, TRANSFORM, "pooled")
    assert k == F.cache_key(d0, src, EvalTransformConfig(resize=32, crop=32), "pooled")
    assert k != F.cache_key(d0, src, EvalTransformConfig(resize=64, crop=32), "pooled")
    assert k != F.cache_key(d0, src, TRANSFORM, "concat")
    assert k != F.cache_key(d0[::-1], src, TRANSFORM, "pooled")


def test_extract_exactly_once_in_key_order_and_cached(model, toy, tmp_path, monkeypatch):
    src = F.resolve_data(toy, "train")
    ref = F.get_features(model, src, TRANSFORM, ("pooled", "concat"), cache_dir=tmp_path, batch_size=4)
    fs = ref["pooled"]
    assert len(fs) == 21 and fs.keys == sorted(fs.keys) and len(set(fs.keys)) == 21
    assert fs.features.shape == (21, 32) and fs.features.dtype == np.float32
    idx = np.array([int(k[-5:]) for k in fs.keys])
    np.testing.assert_array_equal(fs.labels, (idx // 7 + idx % 7) % 3)  # labels travel with their keys
    assert ref["concat"].features.shape == (21, 16 + 16 + 32 + 32)
    np.testing.assert_allclose(ref["concat"].features[:, -32:], fs.features, rtol=1e-5, atol=1e-6)
    # direct model call on the same images gives the same features
    imgs, labels, keys = [], [], []
    for b in F.make_loader(src, TRANSFORM, batch_size=100):
        imgs.append(b[0]), labels.append(b[1]), keys.extend(b[2])
    order = np.argsort(keys)
    with torch.no_grad():
        direct = model(torch.cat(imgs)).numpy()[order]
    np.testing.assert_allclose(fs.features, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs.labels, torch.cat(labels).numpy()[order])
    # ranks x workers: each sample exactly once, whatever the split (3 shards, 2 ranks x 2 workers)
    parts = [F.extract_features(model, F.make_loader(src, TRANSFORM, 5, rank=r, world_size=2, num_workers=2))
             for r in range(2)]
    got = sorted(k for p in parts for k in p.keys)
    assert got == fs.keys
    # the cache: a second call reads the files instead of extracting
    monkeypatch.setattr(F, "extract_features", lambda *a, **k: pytest.fail("cache miss"))
    again = F.get_features(model, src, TRANSFORM, "pooled", cache_dir=tmp_path, batch_size=4)
    assert isinstance(again.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.features), fs.features)
    assert again.keys == fs.keys and again.meta["weights_digest"] == F.weights_digest(model)


def test_imagefolder_split_over_ranks(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    src = F.resolve_data(tmp_path, "val")
    assert src.classes == ["cat", "dog"] and src.folder is not None
    seen = []
    for r in range(3):
        for imgs, labels, keys in F.make_loader(src, TRANSFORM, batch_size=2, rank=r, world_size=3):
            assert imgs.shape[1:] == (3, 32, 32)
            seen += [(k, int(lab)) for k, lab in zip(keys, labels)]
    assert len(seen) == 10 and len(set(seen)) == 10
    assert all(lab == (0 if k.startswith("cat") else 1) for k, lab in seen)


def _worker(rank: int, world: int, port: int, toy: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model(0)
        src = F.resolve_data(toy, "train")
        fs = F.get_features(model, src, TRANSFORM, "pooled", cache_dir=cache, batch_size=4, num_workers=0)
        np.savez(os.path.join(out, f"rank{rank}.npz"), features=fs.features, labels=fs.labels, keys=np.array(fs.keys))
        # a sharded store written by both ranks while extracting
        store = F.get_feature_store(model, src, os.path.join(out, "store"), TRANSFORM, shard_rows=4, progress=False)
        np.save(os.path.join(out, f"store_labels{rank}.npy"), store.labels())
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_same_as_one(model, toy, tmp_path):
    from ssl_container.distributed import free_port

    single = F.get_features(model, F.resolve_data(toy, "train"), TRANSFORM, "pooled", cache_dir=None, batch_size=4)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(2, free_port(), str(toy), str(tmp_path / "cache"), str(out)), nprocs=2, join=True)
    for r in range(2):
        z = np.load(out / f"rank{r}.npz")
        assert list(z["keys"]) == single.keys
        np.testing.assert_allclose(z["features"], single.features, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(z["labels"], single.labels)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # rank 0 wrote one cache entry
    from eval.knn import ShardedFeatureStore, l2_normalize

    store = ShardedFeatureStore.open(out / "store")
    assert len(store) == 21 and (out / "store" / "rank-00001").is_dir()
    feats, labels = store.read_all(), store.labels()
    # same set of (feature, label) rows as the single-process extraction, in some order
    ref = l2_normalize(single.features)
    match = np.abs(feats @ ref.T - 1).argmin(1)
    assert sorted(match.tolist()) == list(range(21))
    np.testing.assert_array_equal(labels, single.labels[match])


@pytest.mark.data
def test_real_cifar10_shards_read(model):
    root = DATA / "cifar10"
    if not (root / "dataset.json").is_file():
        pytest.skip(f"real data not found at {root.resolve()} (../shared/data relative to the repository)")
    src = F.resolve_data(root, "test")
    assert src.num_samples == 10_000 and src.num_classes == 10
    import itertools

    loader = F.make_loader(src, TRANSFORM, batch_size=32)
    fs = F.extract_features(model, itertools.islice(iter(loader), 2))
    assert fs.features.shape == (64, 32) and np.isfinite(fs.features).all()
    assert fs.labels.min() >= 0 and fs.labels.max() < 10 and all(k.startswith("cifar10_test_") for k in fs.keys)


def test_knn_and_linear_cli_extract_and_share_the_cache(toy, tmp_path):
    """End to end on shards: linear (pooled + concat in one pass), then k-NN from the same cache, then
    k-NN over a sharded on-disk train store: same numbers."""
    from eval import knn, linear

    shards = str(toy / "train-{000000..000002}.tar")
    common = ["--train-shards", shards, "--val-shards", shards, "--model", "container_light", "--resize", "32",
              "--crop", "32", "--num-workers", "0", "--batch-size", "8", "--cache-dir", str(tmp_path / "cache")]
    assert linear.main(common + ["--out", str(tmp_path / "lin"), "--epochs", "2", "--lrs", "0.01", "0.1",
                                 "--linear-batch-size", "10"]) == 0
    lin = json.loads((tmp_path / "lin" / "linear.json").read_text())
    assert {h["feature"] for h in lin["heads"]} == {"pooled", "concat"} and lin["source"]["random_init"]
    assert lin["features"]["train"]["num_samples"] == 21
    entries = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(entries) == 2  # pooled and concat of one split (train and val are the same shards)
    assert knn.main(common + ["--out", str(tmp_path / "knn"), "--ks", "1", "5"]) == 0
    assert {p.name for p in (tmp_path / "cache").iterdir()} == entries  # k-NN reused the cached features
    doc = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert doc["results"][0]["k"] == 1 and doc["results"][0]["top1"] == 100.0  # each sample finds itself
    assert knn.main(common + ["--out", str(tmp_path / "knn_store"), "--ks", "1", "5", "--store-shard-rows", "4"]) == 0
    doc2 = json.loads((tmp_path / "knn_store" / "knn.json").read_text())
    assert doc2["results"] == doc["results"]
    assert (tmp_path / "knn" / "knn.png").is_file() and (tmp_path / "lin" / "linear.png").is_file()


def test_linear_cli_dino_protocol_on_shards(toy, tmp_path):
    from eval import linear

    shards = str(toy / "train-{000000..000002}.tar")
    rc = linear.main(["--mode", "dino", "--train-shards", shards, "--val-shards", shards, "--model", "container_light",
                      "--resize", "32", "--crop", "32", "--num-workers", "0", "--batch-size", "8", "--epochs", "2",
                      "--linear-batch-size", "8", "--out", str(tmp_path / "dino"), "--no-cache"])
    assert rc == 0
    doc = json.loads((tmp_path / "dino" / "linear.json").read_text())
    assert doc["mode"] == "dino" and [h["epoch"] for h in doc["history"]] == [1, 2]
    assert doc["config"]["steps_per_epoch"] == 21 // 8 and doc["best"]["lr"] == pytest.approx(0.001 * 8 / 256)
    assert (tmp_path / "dino" / "linear.png").is_file()


def test_build_model_from_weights_file(tmp_path):
    """--weights goes through ssl_container.export.load_backbone; the digest follows the weights."""
    from safetensors.torch import save_file

    ref = F.build_model("container_light", seed=1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = F.build_model(weights=tmp_path / "w.safetensors")
    assert not loaded.training and F.weights_digest(loaded) == F.weights_digest(ref)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x))


def test_features_cli_writes_feature_folders(toy, tmp_path):
    from eval import knn

    assert F.main(["--data", str(toy), "--split", "train", "--model", "container_light", "--resize", "32",
                   "--crop", "32", "--num-workers", "0", "--batch-size", "8", "--no-cache", "--kinds", "pooled",
                   "concat", "--out", str(tmp_path / "f")]) == 0
    pooled = F.load_feature_file(tmp_path / "f" / "pooled")
    concat = F.load_feature_file(tmp_path / "f" / "concat")
    assert pooled.features.shape == (21, 512) and concat.features.shape == (21, 1024)
    assert pooled.keys == concat.keys and pooled.meta["kind"] == "pooled"
    # the folders are valid --train-features / --val-features
    assert knn.main(["--train-features", str(tmp_path / "f" / "pooled"), "--val-features",
                     str(tmp_path / "f" / "pooled"), "--ks", "1", "--out", str(tmp_path / "k"), "--gpu", "no"]) == 0
    assert json.loads((tmp_path / "k" / "knn.json").read_text())["results"][0]["top1"] == 100.0
