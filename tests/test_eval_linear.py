"""eval.linear: the head grid equals torch's SGD + cosine, picks on validation, runs on 2 ranks; DINO mode."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import clustered as clustered_features
from eval.linear import (
    GridConfig,
    LinearProtocolConfig,
    holdout_split,
    train_linear_grid,
    train_linear_protocol,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def clustered(n: int, dim: int, num_classes: int, noise: float, seed: int):
    return clustered_features(n, dim, num_classes, noise, seed, centre_seed=99)


@pytest.fixture(scope="module")
def data():
    xtr, ytr = clustered(1200, 24, 5, 2.0, 0)
    xte, yte = clustered(300, 24, 5, 2.0, 1)
    return xtr, ytr, xte, yte


def test_holdout_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    tr, va = holdout_split(len(y), 0.1, seed=3, labels=y)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 200
    assert np.bincount(y[va]).tolist() == [10, 5, 3, 2]
    tr2, va2 = holdout_split(len(y), 0.1, seed=3, labels=y)
    np.testing.assert_array_equal(va, va2)


def test_one_head_equals_torch_sgd_with_cosine(data):
    """Every head of the grid is exactly torch.optim.SGD(momentum 0.9) + CosineAnnealingLR per epoch."""
    xtr, ytr, _, _ = data
    cfg = GridConfig(lrs=(0.05, 0.4), epochs=3, batch_size=64, holdout=0.1, seed=0)
    res = train_linear_grid({"f": xtr}, ytr, cfg=cfg, num_classes=5)
    heads = res["_heads"]["f"]
    tr, _ = holdout_split(len(ytr), 0.1, 0, ytr)
    X, Y = torch.from_numpy(xtr[tr]), torch.from_numpy(ytr[tr])
    gen = torch.Generator().manual_seed(0)
    W0 = torch.empty(24, 2, 5).normal_(0, 0.01, generator=gen)
    for h, base in enumerate(cfg.lrs):
        lin = torch.nn.Linear(24, 5)
        lin.weight.data = W0[:, h, :].t().clone()
        lin.bias.data.zero_()
        opt = torch.optim.SGD(lin.parameters(), lr=base * 64 / 256, momentum=0.9, weight_decay=0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3, eta_min=0)
        for epoch in range(3):
            perm = torch.randperm(len(Y), generator=torch.Generator().manual_seed(epoch))
            for s in range(len(Y) // 64):
                idx = perm[s * 64:(s + 1) * 64]
                loss = torch.nn.functional.cross_entropy(lin(X[idx]), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        torch.testing.assert_close(heads.W[:, h, :], lin.weight.data.t(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(heads.b[h], lin.bias.data, rtol=1e-4, atol=1e-5)


def test_grid_chooses_on_validation_and_reports(data):
    xtr, ytr, xte, yte = data
    feats_tr = {"pooled": xtr, "concat": np.concatenate([xtr, np.abs(xtr)], 1)}
    feats_te = {"pooled": xte, "concat": np.concatenate([xte, np.abs(xte)], 1)}
    cfg = GridConfig(lrs=(1e-5, 1e-3, 0.1, 1.0), epochs=5, batch_size=128)
    res = train_linear_grid(feats_tr, ytr, feats_te, yte, num_classes=5, cfg=cfg)
    rows = res["heads"]
    assert len(rows) == 8 and {r["feature"] for r in rows} == {"pooled", "concat"}
    best = res["best"]
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    assert best["test_top1"] > 60  # clustered data: far above chance (20 %)
    tiny = [r for r in rows if r["base_lr"] == 1e-5]
    assert all(r["val_top1"] < best["val_top1"] for r in tiny)  # lr 1e-5 for 5 epochs barely moves
    assert all(r["test_top5"] >= r["test_top1"] for r in rows)
    assert res["num_train"] + res["num_val"] == 1200 and res["num_test"] == 300
    json.dumps({k: v for k, v in res.items() if not k.startswith("_")})


def _grid_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        xtr, ytr = clustered(600, 12, 4, 2.0, 0)
        cfg = GridConfig(lrs=(0.01, 0.3), epochs=2, batch_size=64)
        res = train_linear_grid({"f": xtr}, ytr, cfg=cfg, num_classes=4)
        h = res["_heads"]["f"]
        np.savez(os.path.join(out, f"r{rank}.npz"), W=h.W.numpy(), b=h.b.numpy())
    finally:
        dist.destroy_process_group()


def test_grid_on_two_ranks_equals_one(tmp_path):
    from ssl_container.distributed import free_port

    mp.spawn(_grid_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    xtr, ytr = clustered(600, 12, 4, 2.0, 0)
    single = train_linear_grid({"f": xtr}, ytr, cfg=GridConfig(lrs=(0.01, 0.3), epochs=2, batch_size=64),
                               num_classes=4)["_heads"]["f"]
    for r in range(2):
        z = np.load(tmp_path / f"r{r}.npz")
        np.testing.assert_allclose(z["W"], single.W.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(z["b"], single.b.numpy(), rtol=1e-4, atol=1e-6)


class TinyBackbone(torch.nn.Module):
    """Conv + BN + pooling, with the timm-style API the eval code uses."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward_features(self, x):
        return self.bn(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        return x.mean(dim=(2, 3))


def test_dino_protocol_frozen_backbone_eval_mode():
    torch.manual_seed(0)
    model = TinyBackbone()
    model.bn.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    # class = which colour channel is bright
    def batch(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
        x[torch.arange(n), y] += 1.0
        return x, y

    val = [batch(32) for _ in range(2)]

    def train_batches(epoch):
        while True:
            yield batch(16)

    cfg = LinearProtocolConfig(epochs=3, batch_size=16, lr=2.0)
    res = train_linear_protocol(model, train_batches, 20, lambda: iter(val), num_classes=3, cfg=cfg)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert res["best"]["test_top1"] == max(h["top1"] for h in res["history"]) and res["best"]["test_top1"] > 60
    assert res["best"]["lr"] == pytest.approx(2.0 * 16 / 256)
    after = model.state_dict()
    for k, v in before.items():  # frozen: weights and BN running statistics untouched
        torch.testing.assert_close(after[k], v)
    assert not model.training


def test_cli_grid_on_precomputed_features(tmp_path, data):
    from eval.linear import main

    xtr, ytr, xte, yte = data
    np.savez(tmp_path / "tr.npz", features=xtr, labels=ytr)
    np.savez(tmp_path / "te.npz", features=xte, labels=yte)
    rc = main(["--train-features", str(tmp_path / "tr.npz"), "--val-features", str(tmp_path / "te.npz"),
               "--out", str(tmp_path / "o"), "--epochs", "3", "--lrs", "0.001", "0.1", "--linear-batch-size", "128"])
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "linear.json").read_text())
    assert doc["mode"] == "grid" and len(doc["heads"]) == 2 and doc["best"]["test_top1"] > 50
    assert (tmp_path / "o" / "linear.png").stat().st_size > 1000


def test_a_best_learning_rate_at_the_edge_of_the_grid_is_said(data, caplog):
    """The grid picked its largest lr while accuracy still rose, without a word."""
    xtr, ytr, _, _ = data
    cfg = GridConfig(lrs=(1e-3, 3e-3, 1e-2), epochs=1, batch_size=64, holdout=0.1, seed=0)
    with caplog.at_level("WARNING", logger="eval.linear"):
        res = train_linear_grid({"f": xtr}, ytr, cfg=cfg, num_classes=5)
    assert res["best"]["base_lr"] == 1e-2, res["heads"]
    assert "largest learning rate of the grid (0.01)" in res["grid_edge_warning"] and "--lrs" in caplog.text
    inner = GridConfig(lrs=(1e-3, 0.4, 100.0), epochs=2, batch_size=64, holdout=0.1, seed=0)
    res = train_linear_grid({"f": xtr}, ytr, cfg=inner, num_classes=5)
    assert res["best"]["base_lr"] == 0.4 and res["grid_edge_warning"] is None
