"""Training stream (determinism, resume, equal steps per rank, mixing) and evaluation stream (exactly once)."""
from __future__ import annotations

import collections

import pytest
import torch

from ssl_container.data import (
    EvalTransformConfig,
    MultiCropConfig,
    TrainDataConfig,
    make_eval_loader,
    make_train_loader,
    steps_per_epoch,
)
from ssl_container.data.stream import shard_order, stream_positions
from shard_fixtures import shared_data_dir, write_synthetic_shards

SMALL_CROPS = MultiCropConfig(global_size=32, local_size=16, n_local=4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("synth"), n_shards=5, per_shard=12)


def _cfg(urls, **kw):
    base = dict(urls=urls, batch_size=4, num_workers=2, shuffle_buffer=8, samples_per_epoch=32, seed=7,
                crops=SMALL_CROPS)
    base.update(kw)
    return TrainDataConfig(**base)


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["step"] == y["step"] and x["keys"] == y["keys"]
        assert len(x["crops"]) == len(y["crops"]) == SMALL_CROPS.n_crops
        for cx, cy in zip(x["crops"], y["crops"]):
            assert torch.equal(cx, cy)


def test_resume_two_ranks_two_workers(shards):
    cfg = _cfg(shards)
    assert steps_per_epoch(cfg, world_size=2) == 8
    full = {r: list(make_train_loader(cfg, rank=r, world_size=2, epoch=1)) for r in (0, 1)}
    assert len(full[0]) == len(full[1]) == 8  # every rank yields the same number of batches
    b = full[0][0]
    assert [tuple(c.shape) for c in b["crops"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
    assert b["crops"][0].dtype == torch.float32 and abs(float(b["crops"][0].mean())) < 3
    assert [x["keys"] for x in full[0]] != [x["keys"] for x in full[1]]  # ranks read different data
    for k in (3, 6):  # odd k: DataLoader worker 0 must play stream 1
        for r in (0, 1):
            resumed = make_train_loader(cfg, rank=r, world_size=2, epoch=1, start_step=k)
            assert len(resumed) == 8 - k
            _assert_same_batches(list(resumed), full[r][k:])
    again = list(make_train_loader(cfg, rank=0, world_size=2, epoch=2))
    assert [x["keys"] for x in again] != [x["keys"] for x in full[0]]  # a new epoch reshuffles


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_one_loader_over_epochs_gives_each_epochs_own_batches(shards, workers):
    """The trainer keeps one set of workers for the whole run: its batches across epoch boundaries
    (7 steps an epoch, taken 6 at a time as with 2 micro-steps per optimizer step; from step 3, an
    odd resume) are exactly those of one loader per epoch."""
    cfg = _cfg(shards, num_workers=workers, samples_per_epoch=28)  # 7 steps of 4 per epoch
    assert steps_per_epoch(cfg, 1) == 7
    per_epoch = list(make_train_loader(cfg, 0, 1, epoch=1, start_step=3, steps=6))
    per_epoch += [b for e in (2, 3) for b in make_train_loader(cfg, 0, 1, epoch=e, steps=6)]
    loader = make_train_loader(cfg, 0, 1, epoch=1, start_step=3, epochs=None, steps=6)
    batches = iter(loader)
    through = [next(batches) for _ in range(len(per_epoch))]
    batches.close()
    assert [(b["epoch"], b["step"]) for b in through] == [(1, s) for s in range(3, 6)] + [
        (e, s) for e in (2, 3) for s in range(6)]
    _assert_same_batches(through, per_epoch)
    with pytest.raises(TypeError, match="no length"):
        len(loader)


def test_stream_positions_by_hand():
    # 3 streams, batch 4: steps 0..6 are served by streams 0,1,2,0,1,2,0
    assert stream_positions(7, 3, 4) == [12, 8, 8]
    assert stream_positions(0, 3, 4) == [0, 0, 0]
    # the epoch went on at step 5 with the streams at [20, 8, 8], batch 2 since: steps 5 (stream 2), 6 (0), 7 (1), 8 (2)
    assert stream_positions(9, 3, 2, (5, [20, 8, 8])) == [22, 10, 12]
    with pytest.raises(ValueError, match="does not fit"):
        stream_positions(4, 3, 2, (5, [20, 8, 8]))


def test_batch_size_change_mid_epoch_skips_and_repeats_nothing(shards):
    """3 steps of batch 4, then batch 2 from each stream's position (as a resume with
    checkpoint.allow_changes=[data.batch_size] does): every stream reads on exactly where it was."""
    def per_stream(batches):
        out = collections.defaultdict(list)
        for b in batches:
            out[b["step"] % 2].extend(b["keys"])
        return out

    # A stream's raw order does not depend on the batch size: batch 2 over a long epoch is the reference.
    ref = per_stream(make_train_loader(_cfg(shards, batch_size=2, samples_per_epoch=64), 0, 1, epoch=1))
    before = per_stream(list(make_train_loader(_cfg(shards), 0, 1, epoch=1))[:3])
    positions = stream_positions(3, 2, 4)
    assert positions == [len(before[0]), len(before[1])] == [8, 4]
    # 32 - 12 samples left in the epoch = 10 steps of 2, so the epoch of 16 steps goes on at step 6
    after = per_stream(make_train_loader(_cfg(shards, batch_size=2), 0, 1, epoch=1, start_step=6, base=(6, positions)))
    for v in (0, 1):
        seen = before[v] + after[v]
        assert seen == ref[v][:len(seen)]
    assert len(after[0]) + len(after[1]) == 20  # the rest of the epoch, nothing more


def test_in_process_and_counters(shards):
    cfg = _cfg(shards, num_workers=0, samples_per_epoch=None)
    assert steps_per_epoch(cfg, 2) == 60 // 2 // 4  # from dataset.json
    loader = make_train_loader(cfg, rank=1, world_size=2, epoch=0)
    batches = list(loader)
    assert len(batches) == 7
    _assert_same_batches(list(make_train_loader(cfg, rank=1, world_size=2, epoch=0, start_step=2)), batches[2:])
    assert loader.counters["seen"] == 28 and loader.counters["bad"] == 0


def test_shard_order_splits_each_round():
    G, n = 4, 10
    per_stream = [(n - g + G - 1) // G for g in range(G)]  # stream g takes positions g, g+G, ... of a round
    first_round = []
    for g in range(G):
        order = shard_order(n, 0, 0, 0, g, G)
        first_round += [next(order) for _ in range(per_stream[g])]
    assert sorted(first_round) == list(range(n))  # each shard goes to exactly one stream
    order = shard_order(2, 0, 0, 0, 3, 4)  # fewer shards than streams: still never runs dry
    assert all(0 <= next(order) < 2 for _ in range(5))


def test_mixing_weights(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", n_shards=2, per_shard=10, name="a")
    b = write_synthetic_shards(tmp_path / "b", n_shards=2, per_shard=10, name="b", seed=1)
    cfg = _cfg([a, b], weights=[3, 1], num_workers=0, samples_per_epoch=240, batch_size=8, shuffle_buffer=1,
               crops=MultiCropConfig(global_size=8, local_size=8, n_local=0, n_global=1))
    keys = [k for batch in make_train_loader(cfg, 0, 1, 0) for k in batch["keys"]]
    frac_a = sum(k.startswith("a_") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.09, frac_a  # 240 draws: 3 sigma = 0.084
    with pytest.raises(ValueError, match="weights"):
        make_train_loader(_cfg([a, b], weights=[1]), 0, 1, 0)


def test_device_path_same_keys_close_crops(shards):
    cfg = _cfg(shards, num_workers=0, samples_per_epoch=8)
    cpu = list(make_train_loader(cfg, 0, 1, 0))
    dev = list(make_train_loader(_cfg(shards, num_workers=0, samples_per_epoch=8, augment_on="device"), 0, 1, 0,
                                 device="cpu"))
    assert [b["keys"] for b in cpu] == [b["keys"] for b in dev]
    for x, y in zip(cpu, dev):
        for cx, cy in zip(x["crops"], y["crops"]):
            assert cx.shape == cy.shape
            # same parameters; the paths differ only numerically (and in where colour is applied)
            assert float((cx - cy).abs().mean()) < 0.12


@pytest.mark.parametrize("n_shards", [5, 3])  # 5 >= 2x2 streams: shards dealt; 3: samples dealt
def test_eval_every_sample_exactly_once(tmp_path, n_shards):
    urls = write_synthetic_shards(tmp_path, n_shards=n_shards, per_shard=7, split="val")
    tf = EvalTransformConfig(resize=36, crop=32)
    keys, labels = [], {}
    for rank in (0, 1):
        for images, lab, k in make_eval_loader(urls, batch_size=4, rank=rank, world_size=2, num_workers=2,
                                               transform=tf):
            assert images.shape[1:] == (3, 32, 32) and len(k) == len(lab) == images.shape[0]
            keys += k
            labels.update(zip(k, lab.tolist()))
    expected = [f"synth_val_{i:06d}" for i in range(n_shards * 7)]
    assert sorted(keys) == expected and not [k for k, n in collections.Counter(keys).items() if n > 1]
    assert all(labels[k] == int(k[-6:]) % 3 for k in keys)


@pytest.mark.data
def test_shared_imagenette_resume_and_eval():
    root = shared_data_dir()
    if root is None or not (root / "imagenette" / "dataset.json").exists():
        pytest.skip("../shared/data/imagenette is absent (set SSL_CONTAINER_DATA or provide ../shared/data)")
    urls = str(root / "imagenette" / "train-{000000..000009}.tar")
    cfg = _cfg(urls, samples_per_epoch=None, shuffle_buffer=20, batch_size=4)
    assert steps_per_epoch(cfg, 2) == 9469 // 2 // 4
    cfg.samples_per_epoch = 24
    full = list(make_train_loader(cfg, 1, 2, 3))
    _assert_same_batches(list(make_train_loader(cfg, 1, 2, 3, start_step=3)), full[3:])
    assert all(k.startswith("imagenette_train_") for b in full for k in b["keys"])
    images, labels, keys = next(iter(make_eval_loader(str(root / "imagenette" / "val-000000.tar"), 8)))
    assert images.shape == (8, 3, 224, 224) and labels.min() >= 0 and labels.max() < 10
