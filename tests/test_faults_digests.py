"""Every output another stage reads is checked where it is read: students' files and analyze's outputs
against the sha256 their records hold, the cache's arrays against the codec chain its spec gives them,
and analyze's writes name the file when the disk is full."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from cache.reader import Cache
from cache.verify import recorded_bytes, recorded_file, verify_stage
from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Record, Runner
from tests.conftest import TINY, copy_upstream, run_main, write_config


@pytest.fixture(scope="module")
def analyzed(built, tmp_path_factory) -> Path:
    """A workdir holding the session's upstream outputs, both students and analyze (copy it before damaging)."""
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path_factory.mktemp("analyzed") / "w")
    Runner(config_from_dict(TINY, workdir=str(wd))).run("analyze")
    return wd


def _copy(analyzed: Path, tmp_path: Path):
    wd = tmp_path / "w"
    shutil.copytree(analyzed, wd)
    return config_from_dict(TINY, workdir=str(wd))


def _flip(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


# ----------------------------------------------------------------------------- students' files


def _damage_student(cfg, damage: str) -> Path:
    """Damage student ``none``'s output as ``damage`` says; returns the file at fault."""
    r = Runner(cfg)
    d, other = r.student_dir("none"), r.student_dir("spectral")
    if damage == "swapped final.pt":
        a, b = (d / "final.pt").read_bytes(), (other / "final.pt").read_bytes()
        (d / "final.pt").write_bytes(b)
        (other / "final.pt").write_bytes(a)
    elif damage == "flipped final.pt":
        _flip(d / "final.pt")
    elif damage == "truncated final.pt":
        (d / "final.pt").write_bytes((d / "final.pt").read_bytes()[:-100])
    elif damage == "deleted snapshots.parquet":
        (d / "snapshots.parquet").unlink()
        return d / "snapshots.parquet"
    return d / "final.pt"


@pytest.mark.parametrize("damage", ["swapped final.pt", "flipped final.pt", "truncated final.pt",
                                    "deleted snapshots.parquet"])
def test_a_damaged_student_file_is_stale_named_and_refused_by_analyze(analyzed, tmp_path, damage):
    from stages import models
    from stages.analyze import _snapshots

    cfg = _copy(analyzed, tmp_path)
    f = _damage_student(cfg, damage)
    line = f"output damaged: {f}" + (" is missing" if damage.startswith("deleted") else ": sha256 mismatch")
    st = Runner(cfg).state("distill/none")
    assert st.status == "stale" and any(r.startswith(line) for r in st.reasons), st.reasons
    assert any(line in p for p in verify_stage(Runner(cfg), "distill/none"))
    assert Runner(cfg).state("distill").status == "stale"  # the summary needs every student whole
    # analyze reads final.pt and snapshots.parquet only after checking them
    msg = rf"^distill/none: output damaged: {re.escape(str(f))}"
    with pytest.raises(PipelineError, match=msg):
        models.load_student(Runner(cfg), cfg, "none")
    with pytest.raises(PipelineError, match=msg):
        _snapshots(Runner(cfg))
    if damage == "swapped final.pt":
        assert Runner(cfg).state("distill/spectral").status == "stale"


def test_swapped_weights_fail_verify_and_the_next_run_restores_them(analyzed, tmp_path, capsys):
    cfg = _copy(analyzed, tmp_path)
    r = Runner(cfg)
    want = {n: torch.load(r.student_dir(n) / "final.pt", weights_only=True)["state_dict"] for n in ("none", "spectral")}
    _damage_student(cfg, "swapped final.pt")
    conf = write_config(tmp_path / "p.yaml", TINY)
    v = run_main(capsys, "verify", "distill/none", "-c", str(conf), "--workdir", cfg.workdir)
    assert v.returncode == 1 and f"{r.student_dir('none') / 'final.pt'}: sha256 mismatch" in v.stdout, v.stdout
    Runner(cfg).run("distill")  # each student is rebuilt from its own checkpoint, not trained again
    assert [s.status for s in Runner(cfg).status()][:5] == ["up to date"] * 5
    for n, sd in want.items():
        got = torch.load(r.student_dir(n) / "final.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(got[k], v) for k, v in sd.items()), n


def test_a_student_trained_again_makes_the_summary_stale(analyzed, tmp_path):
    """The summary holds the students' numbers: a student whose files changed with its record (trained
    again after its output was damaged, or not bit-stable) makes it stale, as it makes analyze."""
    from pipeline.fingerprint import file_digest

    cfg = _copy(analyzed, tmp_path)
    rec = Runner(cfg).record("distill/none")
    _flip(rec.path / "metrics.parquet")  # the files of another training of the same student ...
    data = json.loads((rec.path / "lock.json").read_text())
    data["summary"]["sha256"]["metrics.parquet"] = file_digest(rec.path / "metrics.parquet")  # ... recorded
    (rec.path / "lock.json").write_text(json.dumps(data))
    r = Runner(cfg)
    assert r.state("distill/none").status == "up to date"
    st = r.state("distill")
    assert st.status == "stale", st.reasons
    assert "student none changed (trained again, damaged or not built)" in st.reasons, st.reasons
    assert r.state("analyze").status == "stale"
    Runner(cfg).run("distill")
    assert Runner(cfg).state("distill").status == "up to date"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "older record"])
def test_a_damaged_teacher_model_is_stale_and_named(built, tmp_path, damage):
    """The teacher's record holds model.pt's sha256: a truncated or edited file is stale, named by
    status (an older record without the digest stays up to date; loading checks the weights' digest)."""
    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w", stages=("prepare", "teacher"))
    cfg = config_from_dict(TINY, workdir=str(wd))
    rec = Runner(cfg).record("teacher")
    model = rec.path / "model.pt"
    assert set(rec.summary["sha256"]) == {"model.pt"}
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "flipped":
        _flip(model)
    else:
        data = json.loads((rec.path / "lock.json").read_text())
        del data["summary"]["sha256"]
        (rec.path / "lock.json").write_text(json.dumps(data))
    st = Runner(cfg).state("teacher")
    if damage == "older record":
        assert st.status == "up to date"
        return
    assert st.status == "stale" and st.reasons == [f"output damaged: {model}: sha256 mismatch, not the file its "
                                                   f"stage wrote"], st.reasons


def test_a_student_record_without_digests_is_rebuilt(analyzed, tmp_path):
    cfg = _copy(analyzed, tmp_path)
    lock = Runner(cfg).student_dir("none") / "lock.json"
    data = json.loads(lock.read_text())
    assert set(data["summary"]["sha256"]) == {"final.pt", "metrics.parquet", "snapshots.parquet"}
    del data["summary"]["sha256"]
    lock.write_text(json.dumps(data))
    st = Runner(cfg).state("distill/none")
    assert st.status == "stale" and any(f"{lock}: records no sha256 of final.pt" in r for r in st.reasons)


def test_a_reader_checks_the_bytes_it_reads(analyzed, tmp_path):
    """The record was checked, then the file changed: the reader's own check names it."""
    cfg = _copy(analyzed, tmp_path)
    rec = Runner(cfg).record("distill/none")
    assert recorded_file(rec, "final.pt") == rec.path / "final.pt"
    _flip(rec.path / "metrics.parquet")
    _flip(rec.path / "final.pt")
    for read in (recorded_bytes, recorded_file):
        for name in ("metrics.parquet", "final.pt"):
            with pytest.raises(PipelineError, match=rf"^{re.escape(str(rec.path / name))}: sha256 mismatch"):
                read(rec, name)
    bare = Record(rec.stage, rec.path, {"summary": {}})
    with pytest.raises(PipelineError, match=r"lock\.json: records no sha256 of final\.pt"):
        recorded_file(bare, "final.pt")


# ----------------------------------------------------------------------------- analyze's outputs


def _damage_analyze(out: Path, damage: str) -> str:
    """Damage analyze's output ``out``; returns what status must say of it."""
    if damage == "deleted intensity.parquet":
        (out / "intensity.parquet").unlink()
        return f"{out / 'intensity.parquet'} is missing"
    if damage == "edited report.md":
        (out / "report.md").write_text((out / "report.md").read_text().replace("0", "1"))
        return f"{out / 'report.md'}: sha256 mismatch"
    if damage == "deleted features.zarr":
        shutil.rmtree(out / "features.zarr")
        return f"{out / 'features.zarr'} is missing"
    arr = out / "features.zarr" / "none" / "blocks.1"
    if damage == "deleted feature shard":
        next(p for p in (arr / "c").rglob("*") if p.is_file()).unlink()
    else:  # a feature array's crc32c removed
        meta = json.loads((arr / "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["codecs"]
        meta["codecs"][0]["configuration"]["codecs"] = [c for c in inner if c["name"] != "crc32c"]
        (arr / "zarr.json").write_text(json.dumps(meta))
    return f"{arr}: its zarr.json or shard files changed since analyze wrote them"


@pytest.mark.parametrize("damage", ["deleted intensity.parquet", "edited report.md", "deleted features.zarr",
                                    "deleted feature shard", "feature crc32c removed"])
def test_a_damaged_analyze_output_is_stale_and_named(analyzed, tmp_path, damage):
    cfg = _copy(analyzed, tmp_path)
    out = Runner(cfg).out_dir("analyze")
    line = "output damaged: " + _damage_analyze(out, damage)
    st = Runner(cfg).state("analyze")
    assert st.status == "stale" and any(r.startswith(line) for r in st.reasons), st.reasons


def test_select_layers_after_deleted_analyze_outputs_reruns_analyze(analyzed, tmp_path):
    from stages.analyze import select_layers_cli

    cfg = _copy(analyzed, tmp_path)
    r = Runner(cfg)
    out = r.out_dir("analyze")
    want = select_layers_cli(r, 2, "top", 2)
    (out / "intensity.parquet").unlink()
    shutil.rmtree(out / "features.zarr")
    assert [p.stage for p in Runner(cfg).status() if p.status != "up to date"] == ["analyze"]
    assert select_layers_cli(Runner(cfg), 2, "top", 2) == want  # analyze was rebuilt first
    assert Runner(cfg).state("analyze").status == "up to date"
    assert (out / "intensity.parquet").exists() and (out / "features.zarr" / "teacher").is_dir()


# ----------------------------------------------------------------------------- the cache's codec chains


def _edit_chain(cdir: Path, edit: str) -> Path:
    zj = cdir / "logits" / "zarr.json"
    meta = json.loads(zj.read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    if edit == "crc32c removed":
        meta["codecs"][0]["configuration"]["codecs"] = [c for c in inner if c["name"] != "crc32c"]
    elif edit == "index crc32c removed":
        conf = meta["codecs"][0]["configuration"]
        conf["index_codecs"] = [c for c in conf["index_codecs"] if c["name"] != "crc32c"]
    else:  # the compressor's level
        comp = inner[1]["configuration"]
        key = "level" if "level" in comp else "clevel"
        comp[key] = comp[key] + 2
    zj.write_text(json.dumps(meta))
    return zj


def test_damaged_shards_of_a_cache_to_resume_are_written_again_in_one_run(built, tmp_path):
    """Shard files truncated or deleted after extract marked them complete, in a cache that is resumed
    (its shard index gone): the rerun writes those shards again, to the session's bytes, instead of
    failing once and leaving the rewrite to a second run."""
    import numpy as np
    import zarr

    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cdir = next(wd.glob("extract/*/cache.zarr"))
    (cdir / "shards.parquet").unlink()
    truncated = cdir / "logits" / "c" / "3" / "0"
    truncated.write_bytes(truncated.read_bytes()[:100])
    next(p for p in (cdir / "spectra" / "blocks.0" / "c" / "1").rglob("*") if p.is_file()).unlink()
    cfg = config_from_dict(TINY, workdir=str(wd))
    assert Runner(cfg).state("extract").status == "stale"
    done = Runner(cfg).run("extract")
    assert done["extract"].summary["rows_computed"] == 2 * 256  # shards 1 and 3 only
    ref, got = zarr.open_group(str(Path(recs["extract"].path) / "cache.zarr"), mode="r"), zarr.open_group(str(cdir))
    for name in ("logits", "spectra/blocks.0", "spectra/blocks.3", "valid"):
        np.testing.assert_array_equal(got[name][:], ref[name][:], err_msg=name)
    assert verify_stage(Runner(cfg), "extract") == []


@pytest.mark.parametrize("edit", ["crc32c removed", "index crc32c removed", "compressor level"])
def test_an_edited_codec_chain_is_refused(built, tmp_path, edit):
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg2 = config_from_dict(TINY, workdir=str(wd))
    cdir = next(wd.glob("extract/*/cache.zarr"))
    zj = _edit_chain(cdir, edit)
    if edit == "crc32c removed":  # and then a changed byte in a shard, which its checksum no longer covers
        _flip(cdir / "logits" / "c" / "1" / "0")
    match = rf"^{re.escape(str(zj))}: the array's metadata is not what the cache's spec gives it \(differs in: codecs"
    with pytest.raises(PipelineError, match=match):
        Cache(cdir)
    with pytest.raises(PipelineError, match=match):
        Runner(cfg2).run("distill")
    problems = verify_stage(Runner(cfg2), "extract")
    assert any(re.search(match, p) for p in problems), problems
    assert not list(wd.glob("distill/students/*/lock.json")), "no student may be recorded"


# ----------------------------------------------------------------------------- a full disk while analyze writes


def test_disk_full_while_analyze_writes_features_names_the_file(analyzed, tmp_path, monkeypatch):
    cfg = _copy(analyzed, tmp_path)
    real_writev = os.writev

    def full_disk(fd, buffers):
        if "/features.zarr/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full_disk)
    with pytest.raises(PipelineError, match=r"^\S+/features\.zarr/teacher/blocks\.\d+/c/0/0/0/0: cannot write "
                                            r"\(disk full\)$"):
        Runner(cfg).run("analyze", force=True)
    assert not list(Path(cfg.workdir).glob("analyze/*/features.zarr/**/.*.tmp"))
    assert Runner(cfg).state("analyze").status == "up to date"  # the old output stays


def test_disk_full_while_saving_a_plot_names_the_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from stages.dynamics import save_figure

    def full_disk(self, f, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    fig = plt.figure()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(tmp_path / 'intensity.png'))}: cannot write "
                                            r"\(disk full\)$"):
        save_figure(fig, tmp_path / "intensity.png")
    plt.close(fig)
    assert not list(tmp_path.iterdir())
