"""benchmarks/learning.py end to end on real shards: floors, curve points, the PNG, every held-out image."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "imagenette"
pytestmark = pytest.mark.skipif(not (DATA / "dataset.json").is_file(),
                                reason="needs ../shared/data/imagenette (the real shards)")


def test_learning_benchmark_rows_and_plot(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "benchmarks/learning.py", "--config", "configs/small_budget.yaml", "--steps", "4",
           "--evals", "2", "--data", str(DATA), "--max-shards", "1", "--out", str(out),
           f"data.urls=[{DATA}/train-{{000000..000009}}.tar]", "data.batch_size=8", "data.crops.n_local=2",
           "data.samples_per_epoch=16", "epochs=2", "head.out_dim=256", "head.hidden_dim=128"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["floor", "floor", "point", "point", "summary"]
    floors = {r["name"]: r for r in rows if r["kind"] == "floor"}
    assert set(floors) == {"raw_pixels", "random_init"}
    points = [r for r in rows if r["kind"] == "point"]
    assert [p["step"] for p in points] == [2, 4] and [p["images_seen"] for p in points] == [16, 32]
    # One protocol for every row: the same images, all of them (the first shard of each split here).
    sizes = {(r["num_reference"], r["num_held_out"]) for r in rows if r["kind"] in ("floor", "point")}
    assert len(sizes) == 1
    n_ref, n_held = sizes.pop()
    with tarfile.open(DATA / "val-000000.tar") as tar:
        assert n_held == sum(1 for m in tar if m.name.endswith(".cls"))
    for r in rows[:4]:
        assert 0 < r["top1"] <= r["top5"] <= 100
        assert "teacher_entropy" in r or r["kind"] == "floor"
    assert points[1]["seconds"] > points[0]["seconds"] > 0
    summary = rows[-1]
    assert summary["margin_over_raw"] == [round(points[-1]["top1"] - floors["raw_pixels"]["top1"], 2)]
    assert (out / "learning.png").stat().st_size > 10_000
    assert len((out / "learning.jsonl").read_text().splitlines()) == 5
