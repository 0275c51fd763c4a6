"""eval.knn: faiss search + DINO vote against a brute-force reference, the sharded on-disk store, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from conftest import clustered  # noqa: E402
from eval.knn import (  # noqa: E402
    ShardedFeatureStore,
    knn_classify,
    knn_classify_dense,
    knn_search,
    l2_normalize,
    weighted_vote,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def data():
    xtr, ytr = clustered(3000, 48, 7, noise=3.0, seed=0)
    xte, yte = clustered(400, 48, 7, noise=3.0, seed=1)
    return xtr, ytr, xte, yte


def brute_force(xtr, ytr, xte, k, num_classes, T=0.07):
    """The plain definition, one query at a time in float64."""
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    out = []
    for q in b.astype(np.float64):
        sims = a.astype(np.float64) @ q
        nn_idx = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(num_classes)
        np.add.at(scores, ytr[nn_idx], np.exp(sims[nn_idx] / T))
        out.append(int(np.argmax(scores)))
    return np.array(out)


def test_same_predictions_as_dense_reference_and_brute_force(data):
    xtr, ytr, xte, yte = data
    ks = (10, 20, 100, 200)
    fast = knn_classify(xtr, ytr, xte, yte, ks=ks, num_classes=7, use_gpu=False)
    dense = knn_classify_dense(xtr, ytr, xte, yte, ks=ks, num_classes=7)
    dino_loop = knn_classify_dense(xtr, ytr, xte, yte, ks=(20,), num_classes=7, per_k=True, num_chunks=7)
    for k in ks:
        np.testing.assert_array_equal(fast.predictions[k], dense.predictions[k])
        assert fast.top1[k] == dense.top1[k] and fast.top5[k] == dense.top5[k]
    np.testing.assert_array_equal(fast.predictions[20], dino_loop.predictions[20])
    for k in (10, 200):
        np.testing.assert_array_equal(fast.predictions[k][:, 0], brute_force(xtr, ytr, xte, k, 7))
    assert 40 < fast.top1[20] <= 100  # the clusters are learnable: the vote is not noise
    assert fast.top5[20] >= fast.top1[20]


def test_vote_by_hand():
    # one query, 4 neighbours (sorted), classes 0..2
    sims = np.array([[0.9, 0.8, 0.5, 0.4]], np.float32)
    labels = np.array([[2, 1, 1, 0]])
    w = np.exp(sims[0] / 0.07)
    scores = np.array([w[3], w[1] + w[2], w[0]])
    got = weighted_vote(sims, labels, k=4, num_classes=3).numpy()[0]
    assert list(got) == list(np.argsort(-scores))
    # k = 1: only the nearest votes; the others tie at 0 and come in class order
    assert list(weighted_vote(sims, labels, k=1, num_classes=3).numpy()[0]) == [2, 0, 1]
    # missing neighbours (label -1) do not vote
    assert list(weighted_vote(sims, np.array([[-1, 1, -1, -1]]), k=4, num_classes=3).numpy()[0]) == [1, 0, 2]


def test_search_matches_torch_topk_and_chunking(data):
    xtr, _, xte, _ = data
    s, i = knn_search(xte, xtr, 25, chunk_size=64, use_gpu=False)
    s2, i2 = knn_search(xte, xtr, 25, chunk_size=10_000, use_gpu=False)
    np.testing.assert_array_equal(i, i2)
    ref = torch.from_numpy(l2_normalize(xte)) @ torch.from_numpy(l2_normalize(xtr)).t()
    rs, ri = ref.topk(25)
    np.testing.assert_allclose(s, rs.numpy(), atol=1e-5)
    assert (i == ri.numpy()).mean() > 0.999  # equal up to float ties
    assert np.all(np.diff(s, axis=1) <= 1e-7)  # sorted, best first


def test_sharded_store_equals_in_memory(tmp_path, data):
    xtr, ytr, xte, yte = data
    store = ShardedFeatureStore.from_arrays(tmp_path / "store", xtr, ytr, shard_rows=700)
    assert len(store) == 3000 and len(store.shards) == 5 and store.shards[-1]["rows"] == 200
    reopened = ShardedFeatureStore.open(tmp_path / "store")
    np.testing.assert_array_equal(reopened.labels(), ytr)
    np.testing.assert_allclose(reopened.read_all(), l2_normalize(xtr), rtol=1e-6, atol=1e-7)
    a = knn_classify(reopened, None, xte, yte, num_classes=7, chunk_size=128, use_gpu=False)
    b = knn_classify(xtr, ytr, xte, yte, num_classes=7, use_gpu=False)
    c = knn_classify_dense(xtr, ytr, xte, yte, num_classes=7)
    for k in a.ks:
        np.testing.assert_array_equal(a.predictions[k], b.predictions[k])
        np.testing.assert_array_equal(a.predictions[k], c.predictions[k])
    # shards smaller than k: the per-shard lists are padded and merged correctly
    s1, i1 = knn_search(xte, ShardedFeatureStore.from_arrays(tmp_path / "tiny", xtr, ytr, shard_rows=50), 120,
                        use_gpu=False)
    s2, i2 = knn_search(xte, xtr, 120, use_gpu=False)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert (i1 == i2).mean() > 0.999


def test_store_writer_and_combine(tmp_path):
    x, y = clustered(250, 8, 3, 1.0, 0)
    with ShardedFeatureStore.create(tmp_path / "a", 8, shard_rows=100) as st:
        for s in range(0, 150, 40):
            st.add(torch.from_numpy(x[s:min(s + 40, 150)]), torch.from_numpy(y[s:min(s + 40, 150)]))
    ShardedFeatureStore.from_arrays(tmp_path / "b", x[150:], y[150:], shard_rows=100)
    both = ShardedFeatureStore.combine(tmp_path, [tmp_path / "a", tmp_path / "b"])
    both = ShardedFeatureStore.open(tmp_path)
    assert len(both) == 250 and [s["rows"] for s in both.shards] == [100, 50, 100]
    np.testing.assert_array_equal(both.labels(), y)
    offsets = [off for off, _ in both.iter_shards()]
    assert offsets == [0, 100, 150]
    with pytest.raises(FileExistsError):
        ShardedFeatureStore.create(tmp_path / "a", 8)
    with pytest.raises(ValueError, match="shape"):
        ShardedFeatureStore.create(tmp_path / "c", 8).add(np.zeros((2, 9)), [0, 1])


def test_fewer_train_samples_than_k_and_bad_labels():
    xtr, ytr = clustered(30, 16, 3, 0.5, 0)
    xte, yte = clustered(10, 16, 3, 0.5, 1)
    res = knn_classify(xtr, ytr, xte, yte, ks=(10, 200), num_classes=3, use_gpu=False)
    ref = knn_classify_dense(xtr, ytr, xte, yte, ks=(10, 200), num_classes=3)
    np.testing.assert_array_equal(res.predictions[200], ref.predictions[200])
    assert res.predictions[10].shape == (10, 3)  # top-5 of 3 classes = 3
    with pytest.raises(ValueError, match="labels"):
        knn_classify(xtr, np.where(ytr == 0, -1, ytr), xte, yte, use_gpu=False)


def test_result_json_and_best_k(data):
    xtr, ytr, xte, yte = data
    res = knn_classify(xtr, ytr, xte, yte, ks=(20, 10), num_classes=7, use_gpu=False)
    doc = res.to_json()
    assert [r["k"] for r in doc["results"]] == [10, 20]
    assert doc["best"]["top1"] == max(r["top1"] for r in doc["results"])
    assert doc["temperature"] == 0.07 and doc["num_train"] == 3000 and doc["num_test"] == 400
    json.dumps(doc)
    assert all(not math.isnan(v) for v in res.top1.values())


def test_cli_on_precomputed_features(tmp_path, data):
    from eval.knn import main

    xtr, ytr, xte, yte = data
    np.savez(tmp_path / "train.npz", features=xtr, labels=ytr)
    np.savez(tmp_path / "val.npz", features=xte, labels=yte)
    out = tmp_path / "out"
    rc = main(["--train-features", str(tmp_path / "train.npz"), "--val-features", str(tmp_path / "val.npz"),
               "--out", str(out), "--ks", "10", "20", "--gpu", "no", "--save-predictions"])
    assert rc == 0
    doc = json.loads((out / "knn.json").read_text())
    ref = knn_classify_dense(xtr, ytr, xte, yte, ks=(10, 20), num_classes=7)
    assert [r["top1"] for r in doc["results"]] == [ref.top1[10], ref.top1[20]]
    assert (out / "knn.png").stat().st_size > 1000
    assert set(np.load(out / "knn_predictions.npz").files) >= {"k10", "k20", "labels"}


def test_python_m_eval_knn_on_a_feature_store(tmp_path, data):
    """``python -m eval.knn`` in a fresh process, train features from an on-disk sharded store."""
    import subprocess
    import sys
    from pathlib import Path

    xtr, ytr, xte, yte = data
    ShardedFeatureStore.from_arrays(tmp_path / "store", xtr, ytr, shard_rows=1000)
    np.savez(tmp_path / "val.npz", features=xte, labels=yte)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "eval.knn", "--train-features", str(tmp_path / "store"),
                          "--val-features", str(tmp_path / "val.npz"), "--out", str(tmp_path / "o"), "--ks", "20",
                          "--gpu", "no", "--threads", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "o" / "knn.json").read_text())
    ref = knn_classify_dense(xtr, ytr, xte, yte, ks=(20,), num_classes=7)
    assert doc["results"][0]["top1"] == ref.top1[20] and doc["num_train"] == 3000


def test_trainer_monitor_vote_matches_the_dino_reference():
    from ssl_container.trainer.knn_monitor import knn_accuracy

    g = np.random.default_rng(3)
    centers = g.normal(size=(7, 16))
    ytr, yte = g.integers(0, 7, 500), g.integers(0, 7, 120)
    xtr = centers[ytr] + 0.9 * g.normal(size=(500, 16))
    xte = centers[yte] + 0.9 * g.normal(size=(120, 16))
    ref = knn_classify_dense(xtr, ytr, xte, yte, ks=(20,), num_classes=7)
    top1, top5 = knn_accuracy(torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte), k=20,
                              chunk=50)
    assert 30 < ref.top1[20] < 100  # a real separation, not chance
    assert top1 * 100 == pytest.approx(ref.top1[20]) and top5 * 100 == pytest.approx(ref.top5[20])


def test_without_faiss_an_exact_torch_search_gives_the_same_neighbours(tmp_path, data, monkeypatch, caplog):
    """An offline GPU node may have no faiss: the search falls back to torch, says so once, and finds
    the same neighbours, also over a sharded store (merged without faiss's heaps) and in small blocks."""
    import sys

    import eval.knn as knn

    xtr, ytr, xte, yte = data
    with_faiss = knn_classify(xtr, ytr, xte, yte, ks=(10, 20), use_gpu=False)
    s_ref, i_ref = knn_search(xte, xtr, 20, use_gpu=False)
    store = ShardedFeatureStore.from_arrays(tmp_path / "store", xtr, ytr, shard_rows=700)
    monkeypatch.setitem(sys.modules, "faiss", None)  # "import faiss" raises ImportError
    monkeypatch.setattr(knn, "_SAID_FALLBACK", False)
    monkeypatch.setattr(knn, "_TORCH_BLOCK", 400 * 256)  # several train blocks per query chunk
    with caplog.at_level("WARNING", logger="eval.knn"):
        without = knn_classify(xtr, ytr, xte, yte, ks=(10, 20), use_gpu="auto")
        s, i = knn_search(xte, xtr, 20, use_gpu=False)
        s_store, i_store = knn_search(xte, store, 20, use_gpu=False)
    assert without.extra["search"] == ("torch-cuda" if torch.cuda.is_available() else "torch-cpu")
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "faiss is not installed" in caplog.records[0].message
    assert without.top1 == with_faiss.top1 and without.top5 == with_faiss.top5
    # faiss's and torch's sgemm round differently: neighbours at equal similarity may swap places.
    for sims, idx in ((s, i), (s_store, i_store)):
        np.testing.assert_allclose(sims, s_ref, rtol=1e-5, atol=1e-6)
        assert (idx == i_ref).mean() > 0.999, (idx != i_ref).sum()
