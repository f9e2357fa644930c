"""Fault injection, config and graph: fields that must reach a fingerprint, values refused at load with
one line naming the key, stage failures recorded and retried, the lock's remedy for students."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.errors import PipelineError
from pipeline.fingerprint import diff
from pipeline.graph import Runner
from pipeline.nodes import FAILED
from pipeline.locking import LockedError
from tests.conftest import TINY, copy_upstream, tiny_tree, write_config


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process: it must fail with exit 2 and one line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("change", [{"data.eval.crop_pct": 0.875}, {"data.eval.interpolation": "bicubic"}])
def test_eval_view_settings_make_the_teacher_and_the_cache_stale(built, tmp_path, change):
    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    runner = Runner(config_from_dict(tiny_tree(**change), workdir=str(wd)))
    states = {s.stage: s for s in runner.status()}
    assert states["prepare"].status == "up to date"  # the shards and their index do not depend on it
    for node in ("teacher", "extract"):
        assert states[node].status != "up to date", node
        assert runner.record(node) is None and states[node].fingerprint != recs[node].lock["fingerprint"]
    assert f"params.data.eval.{next(iter(change)).split('.')[-1]}" in diff(recs["teacher"].lock["inputs"],
                                                                          runner.inputs("teacher"))


@pytest.mark.parametrize("override,match", [
    ("distill.students[0].name=teacher", r"distill\.students\[0\]\.name: 'teacher' is not allowed: .*reserved"),
    ("distill.students[0].name=..", r"distill\.students\[0\]\.name: '\.\.' is not allowed: .*cannot start with '\.'"),
    ("distill.students[0].name=.hidden", r"distill\.students\[0\]\.name: .*cannot start with '\.'"),
    ("distill.students[0].name=Teacher", r"distill\.students\[0\]\.name: 'Teacher' is not allowed: .*reserved"),
    ("distill.students[0].name=distance", r"distill\.students\[0\]\.name: .*reserved: .*dynamics_distance\.png"),
    ("distill.students[1].name=NONE", r"distill\.students: .*'none' and 'NONE' differ only in case"),
    ("data.std=[0,0,0]", r"data\.std: \[0, 0, 0\] is not allowed: .*> 0"),
    ("data.mean=[123.675,116.28,103.53]", r"data\.mean: .* is not allowed: pixels are scaled to .*divide 0-255"),
    ("teacher.std=[58.4,57.1,57.4]", r"teacher\.std: .* is not allowed: pixels are scaled to \[0, 1\]"),
    ("seed=-1", r"seed: -1 is not allowed: .*greater than or equal to 0"),
    ("distill.defaults.seed=-2", r"distill\.defaults\.seed: -2"),
    ("seed=18446744073709551616", r"seed: 18446744073709551616 is not allowed: .*less than or equal to 4294967295"),
    ("distill.students[0].seed=4294967296", r"distill\.students\[0\]\.seed: 4294967296 is not allowed"),
    ("analyze.memory_limit=lots", r"analyze\.memory_limit: 'lots' is not allowed: a memory limit is"),
    ("analyze.scheduler=nonsense", r"analyze\.scheduler: 'nonsense' is not allowed: a Dask scheduler address"),
    ("distill.scheduler=nonsense", r"distill\.scheduler: 'nonsense'"),
    ("upstream_workdirs=['']", r"^error: upstream_workdirs: \[''\] is not allowed: an empty upstream workdir"),
])
def test_bad_values_are_one_line_errors_before_any_work(tmp_path, capsys, override, match):
    import re

    conf = write_config(tmp_path / "p.yaml", TINY)
    err = _one_line_error(capsys, ["run", "all", "-c", str(conf), "--workdir", str(tmp_path / "w"),
                                   "--set", override])
    assert re.search(match, err), err
    assert not (tmp_path / "w").exists()  # nothing started


def test_an_empty_workdir_is_refused_not_the_current_directory(tmp_path, capsys, monkeypatch):
    """``--workdir "$UNSET"`` would build every stage in the current directory."""
    conf = write_config(tmp_path / "p.yaml", TINY)
    monkeypatch.chdir(tmp_path)
    for argv in (["--workdir", ""], ["--upstream-workdir", " "]):
        err = _one_line_error(capsys, ["run", "prepare", "-c", str(conf), *argv])
        assert "is not allowed: an empty" in err and "workdir" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_accepted_analyze_settings():
    for limit in ("4GiB", "2 GB", "auto", "0.5", 0.25):
        assert config_from_dict(tiny_tree(**{"analyze.memory_limit": limit})).analyze.memory_limit == str(limit)
    assert config_from_dict(tiny_tree(**{"analyze.scheduler": "tcp://10.0.0.5:8786"})).analyze.scheduler


def test_image_size_other_than_the_models_input_is_refused_before_prepare(tmp_path, capsys):
    conf = write_config(tmp_path / "p.yaml", TINY)
    err = _one_line_error(capsys, ["run", "all", "-c", str(conf), "--workdir", str(tmp_path / "w"),
                                   "--set", "data.image_size=24"])
    assert "data.image_size: 24, but teacher (cait_xxs24_224) takes 16x16 inputs" in err
    assert not (tmp_path / "w").exists()
    err = _one_line_error(capsys, ["run", "all", "-c", str(conf), "--workdir", str(tmp_path / "w"),
                                   "--set", "distill.students[1].kwargs.img_size=32"])
    assert "distill.students[1] (deit_tiny_patch16_224) takes 32x32 inputs" in err


def test_duplicate_yaml_keys_are_refused_naming_the_lines(tmp_path):
    text = "workdir: w\nextract:\n  views: 2\nseed: 0\nextract:\n  views: 3\n"
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"p\.yaml line 5: .*key 'extract' given twice \(lines 2 and 5\)"):
        load_config(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text("teacher:\n  fit: {epochs: 1, epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' given twice"):
        load_config(tmp_path / "q.yaml")
    # YAML merge keys stay allowed: a key given after '<<: *anchor' overrides the merged one
    (tmp_path / "r.yaml").write_text("x: &k {img_size: 16, depth: 2}\nteacher:\n  kwargs: {<<: *k, depth: 4}\n")
    with pytest.raises(ConfigError, match=r"^x: unknown key"):  # the anchor's holder is not a section
        load_config(tmp_path / "r.yaml")
    (tmp_path / "s.yaml").write_text("teacher:\n  kwargs: &k {img_size: 16, depth: 2}\ndistill:\n  students:\n"
                                     "    - {name: a, model: m, loss: {kind: none}, kwargs: {<<: *k, depth: 4}}\n")
    assert load_config(tmp_path / "s.yaml").distill.students[0].kwargs == {"img_size": 16, "depth": 4}


def test_a_config_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "p.yaml").write_bytes(b"seed: 0\n# caf\xe9\n")
    err = _one_line_error(capsys, ["status", "-c", str(tmp_path / "p.yaml")])
    assert "p.yaml line 2: not UTF-8 text (byte 0xe9)" in err


def test_a_failed_stage_is_recorded_shown_and_retried(built, tmp_path, monkeypatch):
    """A stage that raises (a non-finite teacher, bad input) leaves no record and a failed.json that
    status shows; the next run retries it and the failure record goes."""
    import stages.extract

    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w", stages=("prepare", "teacher"))
    cfg = config_from_dict(TINY, workdir=str(wd))

    def fail(ctx):
        raise PipelineError("extract: the teacher's logits are nan in shard 0")

    monkeypatch.setattr(stages.extract, "run", fail)
    with pytest.raises(PipelineError, match="nan in shard 0"):
        Runner(cfg).run("extract")
    runner = Runner(cfg)
    failed = runner.out_dir("extract") / FAILED
    assert json.loads(failed.read_text())["error"] == "extract: the teacher's logits are nan in shard 0"
    state = runner.state("extract")
    assert (state.status, state.reasons[0]) == ("failed", "extract: the teacher's logits are nan in shard 0")
    monkeypatch.undo()
    Runner(cfg).run("extract")
    assert Runner(cfg).state("extract").status == "up to date"
    assert not failed.exists()


def test_the_lock_remedy_of_a_student_names_the_workdir(built, tmp_path):
    """A student's folder sits three levels below the workdir: the remedy names the workdir itself."""
    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    (wd / "distill").write_text("")  # the students' folder cannot be made (as in a workdir one cannot write)
    with pytest.raises(LockedError, match=rf"--upstream-workdir {Path(wd)}$"):
        Runner(config_from_dict(TINY, workdir=str(wd))).run("distill/none")
