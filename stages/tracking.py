"""Experiment tracking of students: TensorBoard, MLflow and Weights & Biases (offline).

A student with ``track: [...]`` logs each epoch's metrics row (loss terms, val top-1/top-5, lr,
step time) and, with ``track_steps: true``, each step's loss terms and lr; its resolved config and
the cache's fingerprint go in as parameters, its seed group and sweep as tags.  Tracking is
operational: it enters no fingerprint and changes no output.

* tensorboard: event files in the student's folder (``tensorboard/``), read by TensorBoard or
  ``tensorboard.backend.event_processing.event_accumulator.EventAccumulator``.
* mlflow: a run per student in experiment ``spectralkd`` at ``MLFLOW_TRACKING_URI``, or a file store
  ``<workdir>/mlruns``; a resumed student continues its run (its id is kept in the student's folder).
* wandb: an offline run in the student's folder (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path

from pipeline.config import TRACKERS
from pipeline.errors import PipelineError
from pipeline.fingerprint import flatten
from pipeline.fsutil import atomic_write_text

EXPERIMENT = "spectralkd"
MLFLOW_RUN = "mlflow_run_id"  # the student's MLflow run, kept for a resume
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_installed(trackers, where: str) -> None:
    """A tracker whose package is missing is one line naming the extra to install."""
    for name in trackers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = "track" if name != "wandb" else "wandb"
            raise PipelineError(f"{where}: {name!r} needs the {PACKAGES[name]} package; "
                                f"pip install -e '.[{extra}]' (or pip install {PACKAGES[name]})")


class Trackers:
    """The trackers of one student, opened once it starts training; every call is a no-op without any."""

    def __init__(self, names, out: Path, workdir: Path, run_name: str, params: dict, tags: dict):
        self.backends = [_BACKENDS[n](out, workdir, run_name) for n in names if n in TRACKERS]
        flat = {re.sub(r"\[(\d+)\]", r".\1", k): v for k, v in flatten(params).items()}  # a.b[0] -> a.b.0
        for b in self.backends:
            b.start(flat, tags)

    def epoch(self, epoch: int, row: dict) -> None:
        """One epoch's metrics row (numbers only; nan is not logged: an epoch that was not evaluated)."""
        values = {k: float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch" and math.isfinite(v)}
        for b in self.backends:
            b.log(values, epoch, "epoch/")

    def step(self, step: int, values: dict) -> None:
        for b in self.backends:
            b.log({k: float(v) for k, v in values.items()}, step, "step/")

    def close(self) -> None:
        for b in self.backends:
            b.close()


class _TensorBoard:
    def __init__(self, out: Path, workdir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def start(self, params: dict, tags: dict) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted({**params, **tags}.items()))
        self.writer.add_text("config", text, 0)

    def log(self, values: dict, step: int, prefix: str) -> None:
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, workdir: Path, run_name: str):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(workdir).resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database otherwise
        self.client, self.out, self.run_name = MlflowClient(uri), out, run_name
        self.run_id: str | None = None

    def start(self, params: dict, tags: dict) -> None:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(EXPERIMENT)
        kept = self.out / MLFLOW_RUN
        if kept.exists():  # a resumed student continues its run
            self.run_id = kept.read_text().strip()
            return
        run = self.client.create_run(exp_id, run_name=self.run_name, tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        atomic_write_text(kept, self.run_id + "\n")
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, values: dict, step: int, prefix: str) -> None:
        for k, v in values.items():
            self.client.log_metric(self.run_id, prefix + k, v, step=step)

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, out: Path, workdir: Path, run_name: str):
        import wandb

        self.wandb, self.out, self.run_name = wandb, out, run_name
        self.run = None

    def start(self, params: dict, tags: dict) -> None:
        self.run = self.wandb.init(project=EXPERIMENT, name=self.run_name, dir=str(self.out), mode="offline",
                                   config=params, tags=[f"{k}={v}" for k, v in tags.items()], reinit=True)

    def log(self, values: dict, step: int, prefix: str) -> None:
        self.run.log({prefix + k: v for k, v in values.items()})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}
