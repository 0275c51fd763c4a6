"""`ssl-container shards write|verify`: round trip, reproducibility, re-runs, corrupted shards."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from ssl_container.cli import main
from ssl_container.data.shards import verify_shards, write_shards
from ssl_container.data.sources import expand_urls
from shard_fixtures import real_jpegs, shared_data_dir, synthetic_jpeg


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder of 23 images in 3 classes: real Imagenette JPEGs when ../shared/data is there."""
    real = real_jpegs(23)
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for i in range(23):
        cls = ["apple", "banana", "cherry"][i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        data = real[i][1] if real else synthetic_jpeg(rng, 40 + i, 50)
        (root / cls / f"img{i:03d}.JPEG").write_bytes(data)
    (root / "apple" / "notes.txt").write_text("not an image")
    return root


def _tar_keys(path):
    with tarfile.open(path) as tf:
        return [m.name for m in tf]


def test_folder_round_trip(image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["shards", "write", str(image_folder), str(out), "--max-count", "5", "--seed", "3", "--name", "fruit"])
    assert rc == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["apple", "banana", "cherry"]
    split = meta["splits"]["train"]
    assert split["num_samples"] == 23 and split["num_shards"] == 5 and split["shard_samples"] == [5, 5, 5, 5, 3]
    files = [os.path.basename(u) for u in expand_urls(str(out / split["shards"]))]
    assert sorted(meta["sha256"]) == files
    names = [n for f in files for n in _tar_keys(out / f)]
    assert len(names) == 69 and names[:3] == ["fruit_train_000000.cls", "fruit_train_000000.jpg", "fruit_train_000000.src"]
    # shuffled: the labels (class-major in the folder) are mixed in the first shard
    with tarfile.open(out / files[0]) as tf:
        labels = [int(tf.extractfile(m).read()) for m in tf if m.name.endswith(".cls")]
    assert len(set(labels)) > 1
    capsys.readouterr()
    assert main(["shards", "verify", str(out)]) == 0
    assert "OK: 5 shards, 23 samples, 0 problems" in capsys.readouterr().out


def test_rerun_is_reproducible_and_replaces_stale_shards(image_folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(str(image_folder), str(out), max_count=4, seed=1)
    first = json.loads((out / "dataset.json").read_text())
    (out / ".train-000003.tar.x1y2.tmp").write_bytes(b"half a shard from a killed run")
    write_shards(str(image_folder), str(out), max_count=4, seed=1)  # same inputs: same bytes
    assert not (out / ".train-000003.tar.x1y2.tmp").exists()
    assert json.loads((out / "dataset.json").read_text())["sha256"] == first["sha256"]
    entry = write_shards(str(image_folder), str(out), max_count=10, seed=1)  # fewer shards now
    assert entry["num_shards"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar"]
    # a second split lives beside the first
    write_shards(str(image_folder), str(out), split="val", max_count=100, seed=2)
    meta = json.loads((out / "dataset.json").read_text())
    assert set(meta["splits"]) == {"train", "val"} and len(meta["sha256"]) == 4
    assert verify_shards(str(out)).ok


def test_byte_limit_file_list_and_reshard(image_folder, tmp_path):
    lst = tmp_path / "list.txt"
    paths = sorted(image_folder.glob("*/*.JPEG"))
    lst.write_text("# path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in paths))
    out = tmp_path / "from_list"
    limit = 10240 * (sum(p.stat().st_size for p in paths) // 10240 // 4 + 2)
    entry = write_shards(str(lst), str(out), max_bytes=limit, max_count=1000)
    assert entry["num_shards"] >= 3 and sum(entry["shard_samples"]) == 23
    assert all(f.stat().st_size <= limit for f in out.glob("*.tar"))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["apple", "banana", "cherry"]
    # existing shards -> fewer, reshuffled shards; keys and labels survive
    again = tmp_path / "again"
    write_shards(str(out / entry["shards"]), str(again), max_count=10, seed=5)
    report = verify_shards(str(again))
    assert report.ok and report.to_dict()["num_samples"] == 23
    keys = {n.split(".")[0] for f in sorted(again.glob("*.tar")) for n in _tar_keys(f)}
    assert keys == {n.split(".")[0] for f in sorted(out.glob("*.tar")) for n in _tar_keys(f)}


def test_verify_reports_corruption_by_shard_and_key(image_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    write_shards(str(image_folder), str(out), max_count=8)
    victim = out / "train-000001.tar"
    with tarfile.open(victim) as tf:
        member = next(m for m in tf if m.name.endswith(".jpg"))
    raw = bytearray(victim.read_bytes())
    start = member.offset_data + 200  # overwrite the middle of the JPEG's entropy-coded data
    raw[start:start + member.size - 400] = b"\x00" * (member.size - 400)
    raw[member.offset_data + member.size - 2:member.offset_data + member.size] = b"\x00\x00"  # no EOI marker
    victim.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["shards", "verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert "kind=sha256_mismatch" in text and str(victim) in text
    key = member.name.split(".")[0]
    line = next(ln for ln in text.splitlines() if f"key={key} " in ln)
    assert f"source={image_folder}" in line and "kind=corrupt_image" in line  # names the file it came from
    report = verify_shards(str(out), decode=False)  # digests alone still catch it
    assert [p["kind"] for p in report.problems] == ["sha256_mismatch"]
    # a missing shard and a truncated one
    (out / "train-000002.tar").unlink()
    data = (out / "train-000000.tar").read_bytes()
    (out / "train-000000.tar").write_bytes(data[: len(data) // 2])
    kinds = {p["kind"] for p in verify_shards(str(out)).problems}
    assert {"missing_shard", "truncated_shard", "count_mismatch", "sha256_mismatch"} <= kinds


@pytest.mark.data
def test_verify_shared_cifar_test_split():
    root = shared_data_dir()
    if root is None or not (root / "cifar10" / "dataset.json").exists():
        pytest.skip("../shared/data/cifar10 is absent (set SSL_CONTAINER_DATA or provide ../shared/data)")
    report = verify_shards(str(root / "cifar10" / "test-000001.tar.gz"), decode=False)
    assert report.ok and report.shards[0]["sha256_ok"] is True and report.shards[0]["samples"] == 5000


def test_names_never_leave_the_output_folder(image_folder, tmp_path):
    import io

    out = tmp_path / "deep" / "shards"
    with pytest.raises(ValueError, match="not a plain name"):
        write_shards(str(image_folder), str(out), split="../../x")
    assert not (tmp_path / "x-000000.tar").exists() and not list(tmp_path.rglob("x-*.tar"))
    # a source shard whose member names climb out of the tar's root: the copies are renumbered
    evil = tmp_path / "evil-000000.tar"
    jpeg = synthetic_jpeg(np.random.default_rng(1), 40, 40)
    with tarfile.open(evil, "w") as tf:
        for key in ("../escape", "ok"):
            for ext, data in (("jpg", jpeg), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    write_shards(str(evil), str(out), name="safe")
    names = _tar_keys(out / "train-000000.tar")
    assert len(names) == 4 and all(n.startswith("safe_train_") for n in names)


def test_unreadable_sources_are_skipped_by_path_or_refused_with_strict(image_folder, tmp_path, capsys, caplog):
    """An empty x.jpg and a text file named fake.jpg used to be packed silently (and .txt skipped silently);
    verify then failed later naming no source. Now they are skipped, counted and listed by path, each sample
    records its source, and --strict refuses before a byte is written."""
    (image_folder / "banana" / "x.jpg").write_bytes(b"")
    (image_folder / "cherry" / "fake.jpg").write_text("this is a text file, not a JPEG\n" * 20)
    out = tmp_path / "shards"
    caplog.set_level("WARNING", logger="ssl_container.data.shards")
    assert main(["shards", "write", str(image_folder), str(out), "--max-count", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_samples"] == 23 and printed["skipped"] == 3
    split = json.loads((out / "dataset.json").read_text())["splits"]["train"]
    assert sorted((os.path.basename(s["source"]), s["problem"]) for s in split["skipped"]) == [
        ("fake.jpg", "not an image PIL can identify"), ("notes.txt", "not an image by its extension"),
        ("x.jpg", "empty file")]
    assert sum(split["shard_samples"]) == 23
    logged = caplog.text
    assert "notes.txt" in logged and "not images by their extension" in logged  # the .txt is named, not silent
    assert "skipping" in logged and "x.jpg: empty file" in logged
    # every sample names where it came from, and the shards verify clean
    sources = []
    for url in expand_urls(str(out / split["shards"])):
        with tarfile.open(url) as tf:
            sources += [tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".src")]
    assert len(sources) == 23 and all(os.path.isfile(s) and s.startswith(str(image_folder)) for s in sources)
    assert verify_shards(str(out)).ok

    strict_out = tmp_path / "strict"
    assert main(["shards", "write", str(image_folder), str(strict_out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("x.jpg: empty file" in err or "fake.jpg: not an image" in err)
    assert "--strict" in err and "nothing was written" in err
    assert not strict_out.exists() or not any(strict_out.iterdir())


def _samples(out):
    """{key: image bytes} of every shard of the train split dataset.json lists."""
    meta = json.loads((out / "dataset.json").read_text())
    found = {}
    for url in expand_urls(str(out / meta["splits"]["train"]["shards"])):
        with tarfile.open(url) as tf:
            for m in tf:
                if m.name.endswith((".jpg", ".jpeg", ".JPEG", ".png")):
                    found[m.name.rsplit(".", 1)[0]] = tf.extractfile(m).read()
    return found


def test_reshuffling_a_set_into_its_own_folder_keeps_every_image(image_folder, tmp_path, capsys):
    """`shards write DIR/train-{...}.tar DIR --seed 1` re-shuffles a set in place: it used to overwrite the
    shards it was reading (156 of 400 images lost, garbage recorded as skipped sources, exit 0)."""
    out = tmp_path / "set"
    assert main(["shards", "write", str(image_folder), str(out), "--max-count", "5"]) == 0
    before = _samples(out)
    pattern = str(out / json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"])
    capsys.readouterr()
    assert main(["shards", "write", pattern, str(out), "--max-count", "4", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 0
    after = _samples(out)
    assert sorted(after.values()) == sorted(before.values())  # the same 23 images, none lost or damaged
    assert verify_shards(str(out)).ok
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no staging or temporary file left


def _stopped_mid_swap(monkeypatch, write):
    """Run ``write`` with a stop (KeyboardInterrupt, as SIGINT) raised as the second new shard moves in."""
    from ssl_container.data import shards as shards_mod

    real_replace, moved = os.replace, {"n": 0}

    def stop_mid_swap(src, dst):
        if str(src).endswith(".tar") and ".staging" in str(src):
            moved["n"] += 1
            if moved["n"] == 2:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(shards_mod.os, "replace", stop_mid_swap)
    with pytest.raises(KeyboardInterrupt):
        write()
    monkeypatch.undo()


def test_an_interrupted_rewrite_leaves_the_old_set_or_a_refusal(image_folder, tmp_path, monkeypatch):
    """A rewrite stopped while writing leaves the old set untouched and valid; one stopped while swapping
    marks the split incomplete, which training and eval refuse in one line until the command is rerun."""
    from eval.features import resolve_data
    from ssl_container.config import ConfigError, check_shards, load_config
    from ssl_container.data import shards as shards_mod

    out = tmp_path / "set"
    write_shards(str(image_folder), str(out), max_count=5, seed=0)
    before = {p: p.read_bytes() for p in out.iterdir()}

    calls = {"n": 0}
    real_write = shards_mod._write_tar

    def stop_on_third(path, samples):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as SIGINT would
        return real_write(path, samples)

    monkeypatch.setattr(shards_mod, "_write_tar", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(image_folder), str(out), max_count=5, seed=1)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    assert verify_shards(str(out)).ok

    _stopped_mid_swap(monkeypatch, lambda: write_shards(str(image_folder), str(out), max_count=5, seed=1))
    urls = json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"]
    cfg = load_config(None, [f"data.urls=[{out / urls}]"])
    with pytest.raises(ConfigError, match="split 'train' is incomplete.*run that `shards write` again"):
        check_shards(cfg)
    with pytest.raises(ValueError, match="incomplete"):
        resolve_data(str(out), "train")
    write_shards(str(image_folder), str(out), max_count=5, seed=1)  # the rerun finishes it
    check_shards(cfg)
    assert verify_shards(str(out)).ok and len(_samples(out)) == 23


def test_a_truncated_jpeg_is_skipped_when_writing(image_folder, tmp_path):
    jpeg = next((image_folder / "apple").glob("*.JPEG")).read_bytes()
    (image_folder / "banana" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    out = tmp_path / "set"
    entry = write_shards(str(image_folder), str(out), max_count=50)
    damaged = [s for s in entry["skipped"] if s["problem"] != "not an image by its extension"]
    assert [os.path.basename(s["source"]) for s in damaged] == ["cut.jpg"] and "truncated" in damaged[0]["problem"]
    assert verify_shards(str(out)).ok


def test_a_broken_or_overclaiming_dataset_json_and_a_full_disk_are_one_line_each(image_folder, tmp_path, capsys,
                                                                                   monkeypatch):
    import errno

    from eval.features import resolve_data
    from ssl_container.config import ConfigError, check_shards, load_config
    from ssl_container.data import shards as shards_mod

    out = tmp_path / "set"
    write_shards(str(image_folder), str(out), max_count=10)
    meta_path = out / "dataset.json"
    good = meta_path.read_text()
    urls = f"data.urls=[{out / json.loads(good)['splits']['train']['shards']}]"

    # Full disk while rewriting: one line, exit 2, the old set as it was, no staging left.
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(path, samples):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(shards_mod, "_write_tar", full)
    capsys.readouterr()
    assert main(["shards", "write", str(image_folder), str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing of an existing set" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    # Truncated: training, eval and shards write refuse it in one line naming the file.
    meta_path.write_text(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="not a valid dataset.json"):
        check_shards(load_config(None, [urls]))
    with pytest.raises(ValueError, match="not a valid dataset.json"):
        resolve_data(str(out), "train")
    assert main(["shards", "write", str(image_folder), str(out)]) == 2
    assert "not a valid dataset.json" in capsys.readouterr().err

    # 4.8 million samples claimed for 23 images: refused at start, from the file sizes alone.
    meta = json.loads(good)
    meta["splits"]["train"]["shard_samples"][0] = 4_800_000
    meta["splits"]["train"]["num_samples"] = 4_800_013
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="claims 4,800,000 samples in train-000000.tar"):
        check_shards(load_config(None, [urls]))


def test_an_in_place_reshuffle_stopped_mid_swap_is_finished_by_the_rerun(image_folder, tmp_path, monkeypatch):
    """The rerun of an in-place reshuffle stopped while swapping read the mixed set as its source and removed
    the staging folder that held the missing images."""
    from ssl_container.data import shards as shards_mod

    out = tmp_path / "set"
    write_shards(str(image_folder), str(out), max_count=5, seed=0)
    before = sorted(_samples(out).values())
    pattern = str(out / json.loads((out / "dataset.json").read_text())["splits"]["train"]["shards"])
    _stopped_mid_swap(monkeypatch, lambda: write_shards(pattern, str(out), max_count=4, seed=2))
    with pytest.raises(ValueError, match="incomplete"):  # nobody reads the half-swapped set as a source ...
        shards_mod.items_from_shards(pattern)
    write_shards(pattern, str(out), max_count=4, seed=2)  # ... and the same command finishes it, then reshuffles
    assert sorted(_samples(out).values()) == before and verify_shards(str(out)).ok
    assert not [p for p in os.listdir(out) if p.startswith(".")]
