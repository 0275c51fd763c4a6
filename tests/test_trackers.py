"""Trackers for real: a short training logged to MLflow (sqlite store) and to W&B (offline mode),
read back with MlflowClient and from W&B's own offline run file; a tracker that fails never stops
a run."""
import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from ssl_container.trainer.metrics import read_metrics
from ssl_container.trainer.trackers import Tracker, Trackers, open_trackers

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SHARDS, _run  # noqa: E402  (the trainer's tiny recipe and runner)

needs_shards = pytest.mark.skipif(not (SHARDS / "dataset.json").is_file(), reason="needs ../shared/data/imagenette")


class _Broken(Tracker):
    name = "broken"

    def scalars(self, values, step):
        raise ConnectionError("server went away")


class _Keep(Tracker):
    name = "keep"

    def __init__(self):
        self.seen = []

    def scalars(self, values, step):
        self.seen.append((step, dict(values)))


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_others_go_on(caplog):
    keep = _Keep()
    trackers = Trackers([_Broken(), keep])
    with caplog.at_level(logging.WARNING, logger="ssl_container.trainer.trackers"):
        trackers.scalars({"loss": 1.0}, 1)
        trackers.scalars({"loss": 0.5}, 2)
    assert keep.seen == [(1, {"loss": 1.0}), (2, {"loss": 0.5})]
    assert trackers.names == ["keep"]
    assert len(caplog.records) == 1 and "broken failed in scalars" in caplog.records[0].getMessage()
    # a backend that cannot start is warned about, not raised
    with caplog.at_level(logging.WARNING, logger="ssl_container.trainer.trackers"):
        assert open_trackers(["mlflow"], "/tmp/unused-run", mlflow_uri="bogus-scheme://nowhere").names == []
    assert "mlflow could not start" in caplog.records[-1].getMessage()


def _wandb_records(path: Path):
    """The records of a W&B transaction log (run-*.wandb): a 7-byte header (':W&B', magic 0xBEE1,
    version 0), then LevelDB's log format: 32 KiB blocks of [crc32 4][length 2][type 1][data]
    chunks (type 1 full, 2 first, 3 middle, 4 last), each record one protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


@needs_shards
def test_training_logs_config_metrics_and_curves_to_mlflow_and_wandb(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = _run(run_dir, "epochs=1", "logging.backends=[mlflow,wandb]", "logging.wandb_mode=offline",
                "logging.experiment=trackers-test", "logging.progress=lines", "logging.every_steps=2")
    assert "eta" in proc.stdout and "elapsed" in proc.stdout  # plain lines carry elapsed time and ETA
    steps = read_metrics(run_dir / "metrics.jsonl")
    losses = {r["step"]: r["loss"] for r in steps}
    assert sorted(losses) == list(range(1, 7))

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trackers-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["schedule.lr"] == "0.0005" and run.data.params["data.batch_size"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train.loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"training_curves.png", "summary.json"}

    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config, files = {}, {}, set()
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            if "train/loss" in items:
                rows[items["_step"]] = items["train/loss"]
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "files":
            files |= {Path(f.path).name for f in rec.files.files}
    assert rows == pytest.approx(losses, rel=1e-6)
    assert config["schedule.lr"] == 0.0005 and config["model.name"] == "container_light"
    assert {"training_curves.png", "summary.json"} <= files


@needs_shards
def test_a_tracker_that_cannot_start_does_not_stop_training(tmp_path):
    proc = _run(tmp_path / "run", "epochs=1", "logging.backends=[mlflow]", "logging.mlflow_uri=bogus-scheme://nowhere")
    assert "mlflow could not start" in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6
