"""Experiment trackers beside metrics.jsonl: TensorBoard, MLflow and Weights & Biases.

``logging.backends`` names the trackers of a run (``logging.tensorboard=true`` is the same as listing
``tensorboard``). Each gets the resolved config as parameters once, every metric of metrics.jsonl
as it is written, and the curves PNG (and summary.json) as artifacts at the end. Only rank 0 opens
trackers (the metrics logger exists only there). A tracker is a convenience, never the record:
metrics.jsonl is. So a tracker that cannot start or fails later is warned about once, dropped, and
training goes on.

MLflow writes to ``logging.mlflow_uri`` (default: ``sqlite:///RUN/mlflow.db`` with artifacts in
``RUN/mlflow-artifacts``; any MLflow URI, ``http://host:5000`` for a server, works); ``mlflow ui
--backend-store-uri sqlite:///RUN/mlflow.db`` shows it. W&B follows its own settings (``wandb
login``, ``WANDB_MODE=offline``, …); ``logging.wandb_mode`` overrides the mode and the run folder
is ``RUN/wandb``. Extras: ``pip install -e .[mlflow]`` / ``.[wandb]``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from ssl_container.config import BACKENDS

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Tracker", "Trackers", "open_trackers"]


class Tracker:
    """One tracker; each method may raise (the :class:`Trackers` fan-out catches it)."""

    name = "tracker"

    def params(self, config: Mapping[str, Any]) -> None:
        pass

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events after its checkpoint, as metrics.jsonl's readers do
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)

    def params(self, config: Mapping[str, Any]) -> None:
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(dict(config), sort_keys=False) + "\n```")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, experiment: str, run_name: str, uri: str | None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:
            location = (run_dir / "mlflow-artifacts").resolve().as_uri() if uri is None else None
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id = self._resumed(exp_id, run_name) or self.client.create_run(
            exp_id, run_name=run_name, tags={"ssl_container.run_dir": str(run_dir.resolve())}).info.run_id
        self._mlflow = mlflow

    def _resumed(self, exp_id: str, run_name: str) -> str | None:
        """A resumed run continues its MLflow run (same name, still open) instead of starting another."""
        runs = self.client.search_runs([exp_id], filter_string=f"attributes.run_name = '{run_name}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        if runs and runs[0].info.status in ("RUNNING", "FAILED", "KILLED"):
            self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        return None

    def params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in config.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "."), float(v), now, step)
                                                    for k, v in values.items()])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, experiment: str, run_name: str, mode: str | None) -> None:
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        # id = the run folder's name: a resumed run continues the same W&B run
        self.run = wandb.init(project=experiment, name=run_name, id=_wandb_id(run_dir), resume="allow",
                              dir=str(run_dir), mode=mode, reinit="create_new")

    def params(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def artifact(self, path: Path) -> None:
        import wandb

        if path.suffix == ".png":
            self.run.log({f"artifacts/{path.stem}": wandb.Image(str(path))})
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


class Trackers:
    """Every call goes to each tracker; one that raises is warned about once and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def _each(self, what: str, *args: Any) -> None:
        for t in list(self.trackers):
            try:
                getattr(t, what)(*args)
            except Exception as err:  # a tracker must never stop training
                log.warning("tracker %s failed in %s (%s: %s); it is switched off for the rest of the run, "
                            "metrics.jsonl keeps every value", t.name, what, type(err).__name__, err)
                self.trackers.remove(t)

    def params(self, config: Mapping[str, Any]) -> None:
        self._each("params", config)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if values:
            self._each("scalars", values, step)

    def artifact(self, path: str | Path) -> None:
        if path and Path(path).is_file():
            self._each("artifact", Path(path))

    def close(self, ok: bool = True) -> None:
        self._each("close", ok)
        self.trackers = []


def open_trackers(backends: list[str], run_dir: str | Path, start_step: int = 0, experiment: str = "ssl_container",
                  run_name: str | None = None, mlflow_uri: str | None = None, wandb_mode: str | None = None) -> Trackers:
    """The trackers named in ``backends`` (in that order); one that cannot start is warned about."""
    run_dir = Path(run_dir)
    name = run_name or run_dir.name
    makers = {
        "tensorboard": lambda: TensorBoardTracker(run_dir, start_step),
        "mlflow": lambda: MLflowTracker(run_dir, experiment, name, mlflow_uri),
        "wandb": lambda: WandbTracker(run_dir, experiment, name, wandb_mode),
    }
    extras = {"tensorboard": "tensorboard", "mlflow": ".[mlflow]", "wandb": ".[wandb]"}
    out: list[Tracker] = []
    for backend in dict.fromkeys(backends):
        try:
            out.append(makers[backend]())
        except ImportError as err:
            log.warning("logging backend %s is not installed (%s): pip install -e '%s'; training goes on without it",
                        backend, err, extras[backend])
        except Exception as err:
            log.warning("logging backend %s could not start (%s: %s); training goes on without it",
                        backend, type(err).__name__, err)
    return Trackers(out)
