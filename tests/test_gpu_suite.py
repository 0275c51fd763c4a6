"""benchmarks/gpu_suite.sh --dry-run: every step of the GPU suite runs on CPU, tiny, and reports JSON."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "imagenette" / "dataset.json").is_file(),
                                reason="needs ../shared/data/imagenette (the real shards)")


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "suite"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "suite" / "suite.jsonl").read_text().splitlines()]
    ends = {r["bench"]: r for r in rows if "exit_code" in r}
    assert list(ends) == ["train_step", "data_cpu", "data_device", "knn", "pretrain"]
    log = (tmp_path / "suite" / "suite.log").read_text()
    assert all(r["exit_code"] == 0 for r in ends.values()), log[-3000:]
    measured = {r["bench"] for r in rows if "exit_code" not in r}
    assert measured >= {"machine", "train_step", "data_cpu", "data_device", "knn", "pretrain"}
    summary = [r for r in rows if r["bench"] == "pretrain" and r.get("kind") == "summary"]
    assert len(summary) == 1 and summary[0]["final_top1"][0] > 0
