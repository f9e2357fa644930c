"""Experiment tracking: TensorBoard event files and MLflow runs read back with the trackers' own
readers; tracking changes no fingerprint; a missing tracker package is one line naming the extra."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from tests.conftest import copy_upstream, tiny_tree

TRACKED = {"distill.defaults.track": ["tensorboard", "mlflow"], "distill.defaults.track_steps": True,
           "distill.defaults.epochs": 2}


def _fingerprints(tree) -> dict[str, str]:
    r = Runner(config_from_dict(tree, workdir="/nonexistent"))
    return {n: r.fingerprint_of(n)[0] for n in r.nodes()}


def test_tracking_changes_no_fingerprint():
    assert _fingerprints(tiny_tree(**TRACKED)) == _fingerprints(tiny_tree(**{"distill.defaults.epochs": 2}))


@pytest.mark.slow
def test_a_tracked_student_writes_readable_tensorboard_and_mlflow_runs(built, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg = config_from_dict(tiny_tree(**TRACKED), workdir=str(wd))
    rec = Runner(cfg).run("distill/spectral")["distill/spectral"]
    events = EventAccumulator(str(Path(rec.path) / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"epoch/loss_total", "epoch/val_top1", "epoch/lr", "step/loss_total", "step/lr"} <= set(scalars)
    epochs = [e.value for e in events.Scalars("epoch/val_top1")]
    assert len(epochs) == 2 and epochs[-1] == pytest.approx(rec.summary["val_top1"])
    steps = events.Scalars("step/loss_total")
    assert [e.step for e in steps] == list(range(len(steps))) and len(steps) > 2  # every step of both epochs

    client = MlflowClient((wd / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("spectralkd")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "spectral" and run.data.tags["group"] == "spectral" and run.data.tags["seed"] == "0"
    assert run.data.params["student.loss.kind"] == "spectral"
    assert run.data.params["cache_fingerprint"] == recs["extract"].lock["fingerprint"]
    history = client.get_metric_history(run.info.run_id, "epoch/val_top1")
    assert [m.step for m in history] == [0, 1] and history[-1].value == pytest.approx(rec.summary["val_top1"])
    # tracked and untracked students train to the same record
    plain = Runner(config_from_dict(tiny_tree(**{"distill.defaults.epochs": 2}), workdir=str(wd)))
    assert plain.fingerprint_of("distill/spectral")[0] == rec.lock["fingerprint"]


def test_a_missing_tracker_package_names_the_extra(monkeypatch):
    import importlib.util

    from stages import tracking
    from stages.models import plan_models

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    cfg = config_from_dict(tiny_tree(**{"distill.defaults.track": ["mlflow"]}))
    with pytest.raises(PipelineError, match=r"distill\.defaults\.track: 'mlflow' needs the mlflow package; "
                                            r"pip install -e '\.\[track\]'"):
        plan_models(cfg)
