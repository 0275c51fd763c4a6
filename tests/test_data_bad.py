"""Bad data is skipped, counted and reported (rate-limited, naming shard and key); a ceiling stops the run."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_container.data import (
    BadDataError,
    EvalTransformConfig,
    MultiCropConfig,
    TrainDataConfig,
    make_eval_loader,
    make_train_loader,
)
from ssl_container.data.augment import BadImageError, MultiCropAugment, open_image
from ssl_container.data.sources import BadDataCounter, iter_tar_samples
from shard_fixtures import synthetic_jpeg, write_tar

CROPS = MultiCropConfig(global_size=16, local_size=8, n_local=2)


def _good(rng, prefix, n):
    return [(f"{prefix}_{i:03d}", {"jpg": synthetic_jpeg(rng), "cls": b"1"}) for i in range(n)]


@pytest.fixture
def broken(tmp_path):
    """good.tar; bad.tar (a corrupt JPEG, a sample without image); truncated.tar; garbage.tar; a missing path."""
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "good.tar", _good(rng, "good", 10))
    corrupt = synthetic_jpeg(rng)
    corrupt = corrupt[:200] + b"\x00" * (len(corrupt) - 202)  # header intact, scan data zeroed, no EOI
    write_tar(tmp_path / "bad.tar", _good(rng, "badA", 4) + [("bad_corrupt", {"jpg": corrupt, "cls": b"0"}),
                                                         ("bad_noimage", {"cls": b"2", "txt": b"hello"})]
              + _good(rng, "badB", 4))
    write_tar(tmp_path / "full.tar", _good(rng, "trunc", 10))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "garbage.tar").write_bytes(rng.bytes(5000))
    return tmp_path


def _urls(d):
    return [str(d / "good.tar"), str(d / "bad.tar"), str(d / "truncated.tar"), str(d / "garbage.tar"),
            str(d / "missing.tar"), "pipe:cat /nonexistent/shard.tar"]


def test_each_kind_is_skipped_counted_and_named(broken, caplog):
    caplog.set_level(logging.WARNING, logger="ssl_container.data")
    cfg = TrainDataConfig(urls=_urls(broken), batch_size=4, num_workers=0, shuffle_buffer=1, samples_per_epoch=48,
                          max_bad_fraction=1.0, crops=CROPS)
    loader = make_train_loader(cfg, 0, 1, 0)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 48 and not {"bad_corrupt", "bad_noimage"} & set(keys)
    c = loader.counters
    for kind in ("corrupt_image", "missing_image", "truncated_shard", "unreadable_shard"):
        assert c[kind] > 0, (kind, c)
    assert c["bad"] == sum(c[k] for k in ("corrupt_image", "image_too_large", "missing_image", "truncated_shard",
                                          "unreadable_shard"))
    text = caplog.text
    assert f"corrupt_image in shard {broken / 'bad.tar'} key bad_corrupt" in text
    assert f"missing_image in shard {broken / 'bad.tar'} key bad_noimage" in text
    assert "truncated_shard in shard" in text and "unreadable_shard in shard pipe:cat" in text


def test_ceiling_stops_with_a_clear_message(broken):
    cfg = TrainDataConfig(urls=_urls(broken), batch_size=4, num_workers=2, shuffle_buffer=1, samples_per_epoch=64,
                          max_bad_fraction=0.05, bad_check_min_samples=8, crops=CROPS)
    with pytest.raises(Exception) as info:  # raised in a worker, re-raised by the DataLoader
        list(make_train_loader(cfg, 0, 1, 0))
    msg = str(info.value)
    assert "above the ceiling data.max_bad_fraction=0.05" in msg and "shards verify" in msg


def test_all_shards_unreadable(tmp_path):
    cfg = TrainDataConfig(urls=[str(tmp_path / "nope-1.tar"), str(tmp_path / "nope-2.tar")], batch_size=2,
                          num_workers=0, samples_per_epoch=4, max_bad_fraction=1.0, crops=CROPS)
    with pytest.raises(BadDataError, match="no readable sample"):
        list(make_train_loader(cfg, 0, 1, 0))


def test_whole_bad_block_is_replaced_deterministically(tmp_path):
    rng = np.random.default_rng(1)
    bad = [(f"x{i}", {"jpg": b"not a jpeg at all"}) for i in range(5)]
    write_tar(tmp_path / "s.tar", bad + _good(rng, "ok", 11))
    cfg = TrainDataConfig(urls=str(tmp_path / "s.tar"), batch_size=4, num_workers=0, shuffle_buffer=1,
                          samples_per_epoch=12, max_bad_fraction=1.0, crops=CROPS)
    full = list(make_train_loader(cfg, 0, 1, 0))
    assert full[0]["keys"] == ["ok_000"] * 4 and full[1]["keys"][0] == "ok_000"  # 4 bad, then 1 bad + 3 good
    resumed = list(make_train_loader(cfg, 0, 1, 0, start_step=1))
    for a, b in zip(full[1:], resumed):
        assert a["keys"] == b["keys"] and all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))


def test_decompression_bombs_are_refused(monkeypatch):
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's limit stays on
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(buf, format="PNG")
    with pytest.raises(BadImageError) as info:
        MultiCropAugment(MultiCropConfig(max_image_pixels=10_000))(buf.getvalue(), np.random.default_rng(0))
    assert info.value.kind == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL's own check (DecompressionBombError)
    with pytest.raises(BadImageError) as info:
        open_image(buf.getvalue())
    assert info.value.kind == "image_too_large"


def test_log_is_rate_limited(caplog):
    caplog.set_level(logging.WARNING, logger="ssl_container.data")
    counter = BadDataCounter(max_bad_fraction=1.0, log_first=3, log_interval_s=3600)
    for i in range(20):
        counter.record("corrupt_image", "s.tar", f"k{i}", "boom")
    assert counter.counts["corrupt_image"] == 20
    assert len(caplog.records) == 3 and "key k2" in caplog.records[-1].getMessage()


def test_truncated_tar_keeps_the_samples_before_the_break(broken):
    counter = BadDataCounter(1.0)
    keys = [s["__key__"] for s in iter_tar_samples(str(broken / "truncated.tar"), counter)]
    assert 0 < len(keys) < 10 and keys == [f"trunc_{i:03d}" for i in range(len(keys))]
    assert counter.counts["truncated_shard"] == 1


def test_eval_skips_and_counts(broken):
    loader = make_eval_loader([str(broken / "good.tar"), str(broken / "bad.tar")], batch_size=5,
                              transform=EvalTransformConfig(resize=32, crop=32), max_bad_fraction=1.0)
    keys = [k for _, _, ks in loader for k in ks]
    assert len(keys) == 18 and "bad_corrupt" not in keys
    assert loader.counters["corrupt_image"] == 1 and loader.counters["missing_image"] == 1
