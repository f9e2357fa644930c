"""Fault injection: bad input shards, full disks, read-only caches, concurrent runs, corrupt chunks."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from pipeline.locking import LockedError, OutputLock
from tests.conftest import ROOT, TINY, copy_upstream, run_main, tiny_tree, write_config


def _bad_shards(recs, tmp: Path) -> tuple[str, str, str]:
    """Copies of the prepared shards with one undecodable image (train) and a truncated tar (val)."""
    src = Path(recs["prepare"].path)
    d = tmp / "shards"
    d.mkdir()
    for p in src.glob("*.tar"):
        shutil.copy(p, d / p.name)
    with tarfile.open(d / "train-000001.tar") as tf:
        m = [m for m in tf.getmembers() if m.name.endswith(".png")][5]
    bad_key = m.name.rsplit(".", 1)[0]
    with open(d / "train-000001.tar", "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"X" * m.size)
    v = d / "val-000000.tar"
    v.write_bytes(v.read_bytes()[: v.stat().st_size // 2 + 100])
    return str(d / "train-{000000..000003}.tar"), str(v), bad_key


def _shard_cfg(recs, tmp: Path, **changes):
    train, val, bad_key = _bad_shards(recs, tmp)
    tree = tiny_tree(**{"data.source": "shards", "data.train_shards": train, "data.val_shards": val,
                        "teacher.fit": None, "extract.store": ["logits", "spectra"], **changes})
    return config_from_dict(tree, workdir=str(tmp / "w")), bad_key


@pytest.mark.slow
def test_bad_image_and_truncated_tar_are_skipped_and_recorded(built, tmp_path):
    cfg, runner, recs = built
    cfg2, bad_key = _shard_cfg(recs, tmp_path)
    done = Runner(cfg2).run("extract")
    g = zarr.open_group(str(Path(done["extract"].path) / "cache.zarr"), mode="r")
    bad_rows = g.attrs["bad_rows"]
    assert {b["key"] for b in bad_rows} == {bad_key}
    assert len(bad_rows) == cfg2.extract.views  # one row per view of that sample
    valid = g["valid"][:]
    assert sorted(np.flatnonzero(valid == 0).tolist()) == sorted(b["row"] for b in bad_rows)
    skipped = g.attrs["skipped_samples"]
    assert skipped and all("truncated" in s["error"] or "no" in s["error"] for s in skipped)
    assert skipped[0]["url"].endswith("val-000000.tar")
    # all else intact: every train sample present, val has the samples before the cut
    assert g.attrs["blocks"][0]["stop"] == 1438
    val_rows = g.attrs["blocks"][-1]["stop"] - g.attrs["blocks"][-1]["start"]
    assert 100 < val_rows < 359
    assert np.isfinite(g["logits"][:].astype(np.float32)).all()
    assert np.abs(g["logits"][:][valid == 1]).sum() > 0


@pytest.mark.slow
def test_strict_mode_fails_naming_the_key(built, tmp_path):
    cfg, runner, recs = built
    cfg2, bad_key = _shard_cfg(recs, tmp_path, **{"data.on_bad_sample": "fail"})
    with pytest.raises(PipelineError, match=r"val-000000\.tar: bad sample .*truncated"):
        Runner(cfg2).run("extract")
    # with an intact val shard, the undecodable image is named
    shutil.copy(Path(recs["prepare"].path) / "val-000000.tar", tmp_path / "shards" / "val-000000.tar")
    with pytest.raises(PipelineError, match=rf"train-000001\.tar: cannot decode image of sample {bad_key}"):
        Runner(cfg2).run("extract")


def test_disk_full_keeps_completed_shards_and_rerun_completes(built, tmp_path, monkeypatch):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd, ("prepare", "teacher"))
    cfg2 = config_from_dict(TINY, workdir=str(wd))
    real_writev = os.writev

    def full_disk(fd, buffers):  # the disk fills while shard 3 of logits is being written
        if "/logits/c/3/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full_disk)
    with pytest.raises(PipelineError, match=r"cannot write shard 3 \(disk full\); completed shards are kept"):
        Runner(cfg2).run("extract")
    cdir = next(wd.glob("extract/*/cache.zarr"))
    assert sorted(p.name for p in (cdir / "_complete").glob("*.json")) == ["000000.json", "000001.json",
                                                                           "000002.json"]
    assert not list(cdir.rglob("*.tmp")), "a failed shard write leaves no temporary file"
    monkeypatch.setattr(os, "writev", real_writev)
    done = Runner(cfg2).run("extract")
    ref = zarr.open_group(str(Path(recs["extract"].path) / "cache.zarr"), mode="r")
    got = zarr.open_group(str(cdir), mode="r")
    assert got.attrs["complete"] is True
    for name in ("logits", "spectra/blocks.0", "spectra/blocks.3", "valid"):
        np.testing.assert_array_equal(got[name][:], ref[name][:], err_msg=name)
    assert done["extract"].summary["rows_computed"] == ref.attrs["spec"]["rows"] - 3 * 256


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_read_only_cache_serves_distill_and_analyze(built, tmp_path):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cdir = next(wd.glob("extract/*"))
    before = _snapshot(cdir)
    modes = {}
    for p in [cdir, *cdir.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cfg2 = config_from_dict(TINY, workdir=str(wd))
        done = Runner(cfg2).run("analyze")
        assert done["distill"].lock["complete"] and (Path(done["analyze"].path) / "report.md").exists()
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert _snapshot(cdir) == before  # nothing in the cache was written


def test_second_run_names_the_lock_holder_and_stale_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; sys.path.insert(0, %r)\n"
         "from pipeline.locking import OutputLock\n"
         "with OutputLock(%r, 'run extract'):\n    print('locked', flush=True); time.sleep(60)"
         % (str(ROOT), str(tmp_path / "out"))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=rf"pid {holder.pid} on .* since .*\(run extract\)"):
        with OutputLock(tmp_path / "out", "second"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # the kernel released the dead holder's lock: the next run takes it over
    with OutputLock(tmp_path / "out", "third", wait=5) as lk:
        assert lk.holder()["pid"] == os.getpid() and lk.holder()["what"] == "third"


def test_verify_cli_ok_then_names_flipped_shard(built, tmp_path, capsys):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    conf = write_config(tmp_path / "p.yaml", TINY)
    r = run_main(capsys, "verify", "-c", str(conf), "--workdir", str(wd))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify extract: ok" in r.stdout
    f = next(wd.glob("extract/*/cache.zarr")) / "logits" / "c" / "2" / "0"
    b = bytearray(f.read_bytes())
    b[len(b) // 3] ^= 0x01
    f.write_bytes(bytes(b))
    r = run_main(capsys, "verify", "-c", str(conf), "--workdir", str(wd))
    assert r.returncode == 1
    assert "logits: shard 2 (rows 512..767) is corrupt (checksum mismatch)" in r.stdout


# ----------------------------------------------------------------------------- integrity (nothing trains on
# missing or wrong data): each damage below is refused by distill and named by verify


def _damaged_copy(built, tmp_path) -> tuple:
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    return config_from_dict(TINY, workdir=str(wd)), next(wd.glob("extract/*/cache.zarr"))


def _refused(cfg2, match: str) -> None:
    from cache.verify import verify_stage

    with pytest.raises(PipelineError, match=match):
        Runner(cfg2).run("distill")
    problems = verify_stage(Runner(cfg2), "extract")
    assert any(re.search(match, p) for p in problems), problems
    assert not list(Path(cfg2.workdir).glob("distill/*/lock.json")), "no distill output may be recorded"


@pytest.mark.parametrize("array,shard,damage", [("logits", 3, "empty"), ("spectra/blocks.3", 1, "deleted"),
                                                ("valid", 0, "truncated")])
def test_missing_empty_or_truncated_shard_file_is_refused(built, tmp_path, array, shard, damage):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    f = cdir / array / "c" / str(shard)
    while f.is_dir():  # c/<shard>/0/0/... : one key part per further axis
        f = f / "0"
    assert f.exists()
    if damage == "empty":
        f.write_bytes(b"")
    elif damage == "deleted":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[:-10])
    what = "is missing" if damage == "deleted" else r"is \d+ bytes, extract wrote \d+"
    _refused(cfg2, rf"{re.escape(str(f))}: shard {shard} of {re.escape(array)} {what}")


@pytest.mark.parametrize("edit", ["flipped byte", "shifted labels", "dropped row"])
def test_edited_manifest_is_refused(built, tmp_path, edit):
    import pyarrow.parquet as pq

    cfg2, cdir = _damaged_copy(built, tmp_path)
    m = cdir / "manifest.parquet"
    if edit == "flipped byte":
        b = bytearray(m.read_bytes())
        b[len(b) // 2] ^= 0x10
        m.write_bytes(bytes(b))
    else:
        t = pq.read_table(m)
        if edit == "shifted labels":
            lab = t.column("label").to_numpy()
            t = t.set_column(t.column_names.index("label"), "label", pa.array((lab + 1) % 10))
        else:
            t = t.slice(0, t.num_rows - 1)
        pq.write_table(t, m)
    _refused(cfg2, r"manifest\.parquet: the manifest is not the one extract wrote")


def test_edited_zarr_metadata_is_refused(built, tmp_path):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    root = json.loads((cdir / "zarr.json").read_text())
    original = (cdir / "zarr.json").read_text()
    layers = root["attributes"]["layers"]
    layers[0]["name"], layers[1]["name"] = layers[1]["name"], layers[0]["name"]
    (cdir / "zarr.json").write_text(json.dumps(root))
    _refused(cfg2, r"zarr\.json: the attributes that decide meaning .* were changed")
    (cdir / "zarr.json").write_text(original)
    arr = json.loads((cdir / "logits" / "zarr.json").read_text())
    arr["shape"][0] -= 1
    (cdir / "logits" / "zarr.json").write_text(json.dumps(arr))
    _refused(cfg2, r"logits/zarr\.json: array is \(\d+, 10\) float16 .* the cache records")


def test_truncated_zarr_json_names_the_file(built, tmp_path, capsys):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    zj = cdir / "zarr.json"
    zj.write_text(zj.read_text()[:200])
    conf = write_config(tmp_path / "p.yaml", TINY)
    r = run_main(capsys, "verify", "-c", str(conf), "--workdir", cfg2.workdir)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{zj}: cannot read the cache's metadata" in r.stdout and "Traceback" not in r.stderr


def test_runs_from_another_directory_and_a_moved_workdir(built, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)  # a moved workdir: the copies must read the copied shards
    (tmp_path / "elsewhere").mkdir()
    write_config(tmp_path / "p.yaml", tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = run_main(capsys, "run", "distill", "-c", "../p.yaml", "--workdir", "../w")
    assert r.returncode == 0, r.stderr[-2000:]
    shards = json.loads(next(wd.glob("prepare/*/shards.json")).read_text())
    assert all(not os.path.isabs(u) for u in shards["train"] + shards["val"])
    urls = set(pq.read_table(next(wd.glob("extract/*/cache.zarr/manifest.parquet"))).column("url").to_pylist())
    assert urls and all(u.startswith("../../../prepare/") for u in urls), urls
    metrics = pq.read_table(next(wd.glob("distill/students/none-*/metrics.parquet"))).to_pylist()
    assert metrics[0]["loss_total"] > 0 and metrics[0]["val_top1"] > 0
    monkeypatch.chdir(ROOT)
    r = run_main(capsys, "status", "-c", str(tmp_path / "p.yaml"), "--workdir", str(wd))
    assert r.returncode == 0 and re.search(r"^distill +up to date", r.stdout, re.M), r.stdout


def test_deleted_source_tar_makes_prepare_stale_and_a_changed_image_stops_distill(built, tmp_path):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    tar = next(Path(cfg2.workdir).glob("prepare/*/train-000001.tar"))
    saved = tar.read_bytes()
    tar.unlink()
    st = {s.stage: s for s in Runner(cfg2).status()}
    assert st["prepare"].status == "stale" and any(f"{tar} is missing" in r for r in st["prepare"].reasons)
    tar.write_bytes(saved)
    assert Runner(cfg2).state("prepare").status == "up to date"
    listing = tar.parent / "shards.json"
    original = listing.read_text()
    listing.write_text(original.replace("train-000001.tar", "train-000000.tar"))
    st = Runner(cfg2).state("prepare")
    assert st.status == "stale" and any("shards.json is not the one prepare wrote" in r for r in st.reasons)
    listing.write_text(original)
    # same size, one image's bytes changed: status cannot see it, distill must refuse the row
    with tarfile.open(tar) as tf:
        m = [m for m in tf.getmembers() if m.name.endswith(".png")][3]
    with open(tar, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"X" * m.size)
    with pytest.raises(PipelineError, match=rf"{re.escape(str(tar))}: the image of sample "
                                            rf"{re.escape(m.name[:-4])} \(row \d+\) was read at extract time"):
        Runner(cfg2).run("distill")


def test_interrupted_force_keeps_the_old_output(built, tmp_path, monkeypatch):
    from cache.writer import CacheWriter
    from stages import distill as distill_stage
    from cache.reader import open_cache

    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cfg2 = config_from_dict(tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}), workdir=str(wd))
    Runner(cfg2).run("distill")
    real = CacheWriter.write_shard

    def crash_at_shard_2(self, s, *a):
        if s == 2:
            raise KeyboardInterrupt  # stands for a kill: nothing cleans up
        return real(self, s, *a)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg2).run("extract", force=True)
    st = Runner(cfg2).state("extract")
    assert st.status == "up to date"
    open_cache(Runner(cfg2).record("extract"))  # the old cache, whole
    monkeypatch.setattr(CacheWriter, "write_shard", real)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_stage, "_train_into", crash)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg2).run("distill", force=True)
    assert [s.status for s in Runner(cfg2).status()][:4] == ["up to date"] * 4
    monkeypatch.undo()
    assert list(wd.glob("extract/*.force")) and list(wd.glob("distill/students/*.force"))  # until the next --force
    done = Runner(cfg2).run("extract", force=True)
    assert done["extract"].path == Runner(cfg2).out_dir("extract")
    open_cache(Runner(cfg2).record("extract"))
    Runner(cfg2).run("distill", force=True)
    assert not list(wd.rglob("*.force")) and not list(wd.rglob("*.old"))
    assert Runner(cfg2).state("distill").status == "up to date"


def test_non_finite_training_fails_the_student_and_is_retried(built, tmp_path):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cfg2 = config_from_dict(tiny_tree(**{"distill.students": TINY["distill"]["students"][1:],
                                         "distill.defaults.lr": 1e6}), workdir=str(wd))
    with pytest.raises(PipelineError, match=r"1 student\(s\) failed .* spectral: the \w+ loss is (nan|inf) .* "
                                            r"at epoch 1 step \d+"):
        Runner(cfg2).run("distill")
    d = Runner(cfg2).student_dir("spectral")
    assert "loss is" in json.loads((d / "failed.json").read_text())["error"]
    assert not (d / "lock.json").exists() and not (d / "final.pt").exists()
    st = Runner(cfg2).state("distill")
    assert st.status != "up to date" and any("student spectral failed (spectral: the" in r for r in st.reasons)
    with pytest.raises(PipelineError, match="failed"):  # retried, not taken as done
        Runner(cfg2).run("distill")


def test_yaml_anchor_override_changes_one_student_only(tmp_path):
    from pipeline.graph import student_params

    p = tmp_path / "p.yaml"
    p.write_text((ROOT / "pipeline.yaml").read_text())
    from pipeline.config import load_config

    base = load_config(p)
    cfg = load_config(p, ["distill.students[2].kwargs.embed_dim=16"])
    assert cfg.student("deit-spectral").kwargs["embed_dim"] == 16
    for name in ("deit-none", "deit-logits"):
        assert student_params(cfg, name) == student_params(base, name), name


@pytest.mark.parametrize("key,value,match", [
    ("distill.defaults.lr", ".inf", "finite"), ("distill.students[1].loss.tau", ".inf", "finite"),
    ("distill.defaults.weight_decay", ".nan", "finite"), ("teacher.fit.epochs", "true", "true/false"),
])
def test_numeric_fields_refuse_inf_nan_and_booleans(key, value, match):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{match}"):
        config_from_dict(TINY, [f"{key}={value}"])


def test_disk_full_during_a_checkpoint_names_the_file(built, tmp_path, monkeypatch):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cfg2 = config_from_dict(tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}), workdir=str(wd))
    real_writev = os.writev

    def full_disk(fd, buffers):
        if ".ckpt.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full_disk)
    d = Runner(cfg2).student_dir("none")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(d / 'ckpt.pt'))}: cannot write \(disk full\)$"):
        Runner(cfg2).run("distill")
    assert not list(d.glob(".*.tmp"))


def test_labels_beyond_num_classes_on_an_existing_workdir(built, tmp_path):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    cfg2 = config_from_dict(TINY, ["data.num_classes=5"], workdir=str(wd))
    assert Runner(cfg2).state("prepare").status == "up to date"
    with pytest.raises(PipelineError, match=r"^data\.num_classes: 5, but sample digits_\d+ in .*train-00000\d\.tar "
                                            r"has label [5-9] \(labels must be 0\.\.4\)"):
        Runner(cfg2).run("teacher")


def _png(path: Path, value: int, mode: str = "RGB") -> None:
    from PIL import Image

    arr = np.full((12, 12, 3), value, np.uint8) if mode == "RGB" else np.full((12, 12), value, np.uint16)
    Image.fromarray(arr).save(path)


def test_imagefolder_two_files_one_key_is_refused_and_one_class_warns(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(3):
            _png(tmp_path / "img" / c / f"{i}.png", 40 * i)
    _png(tmp_path / "img" / "b" / "x.y.png", 10)
    _png(tmp_path / "img" / "b" / "x_y.png", 20)
    tree = tiny_tree(**{"data.source": "imagefolder", "data.root": str(tmp_path / "img")})
    with pytest.raises(PipelineError, match=r"x\.y\.png and .*x_y\.png both become sample key 'b_x_y'"):
        Runner(config_from_dict(tree, workdir=str(tmp_path / "w"))).run("prepare")
    shutil.rmtree(tmp_path / "img" / "b")
    with caplog.at_level("WARNING", logger="pipeline"):
        Runner(config_from_dict(tree, workdir=str(tmp_path / "w2"))).run("prepare")
    assert any("has one class folder (a)" in r.message for r in caplog.records)


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    import io

    from PIL import Image

    from stages.data import decode_image

    a = (np.arange(16 * 16).reshape(16, 16) * 200).astype(np.uint16)  # 0..51000 over 16 bits
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    got = np.asarray(decode_image(buf.getvalue()))
    np.testing.assert_array_equal(got[..., 0], (a >> 8).astype(np.uint8))
    assert got.max() < 255  # not saturated to white


def test_cli_refuses_bad_select_layers_arguments_and_unknown_students(built, tmp_path, capsys):
    from pipeline.__main__ import main

    cfg, runner, recs = built
    conf = write_config(tmp_path / "p.yaml", TINY)
    wd = str(cfg.workdir)
    assert main(["run", "extract", "--student", "nosuch", "-c", str(conf), "--workdir", wd]) == 2
    assert "--student: 'nosuch' is not a student" in capsys.readouterr().err
    for args, match in ((["--k", "0"], "--k: 0"), (["--student-depth", "-3"], "--student-depth: -3")):
        assert main(["select-layers", *args, "-c", str(conf), "--workdir", wd]) == 2
        assert match in capsys.readouterr().err


def test_outputs_follow_the_umask(built):
    cfg, runner, recs = built
    files = [p for st in ("prepare", "teacher", "extract") for p in Path(recs[st].path).rglob("*") if p.is_file()]
    assert len(files) > 20
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    wrong = [(str(p), oct(stat.S_IMODE(p.stat().st_mode))) for p in files if stat.S_IMODE(p.stat().st_mode) != want]
    assert not wrong, wrong[:5]


def test_own_workdir_builds_on_a_shared_read_only_one(built, tmp_path, capsys):
    from pipeline.__main__ import main

    cfg, runner, recs = built
    shared = copy_upstream(recs, tmp_path / "shared")
    before = _snapshot(shared)
    tree = tiny_tree(**{"distill.students": TINY["distill"]["students"][1:]})
    conf = write_config(tmp_path / "p.yaml", tree)
    # up to date in the shared workdir: answered without any lock or write
    assert main(["run", "extract", "-c", str(conf), "--workdir", str(shared)]) == 0
    assert _snapshot(shared) == before
    mine = tmp_path / "mine"
    cfg2 = config_from_dict(tree, [f"upstream_workdirs=[{shared}]"], workdir=str(mine))
    done = Runner(cfg2).run("distill")
    assert done["extract"].path.parent.parent == shared and done["distill"].path.parent.parent == mine
    assert (Runner(cfg2).student_dir("spectral") / "final.pt").exists()
    assert _snapshot(shared) == before  # nothing written there
    assert not (mine / "prepare").exists() and not (mine / "extract").exists()
    assert main(["status", "-c", str(conf), "--workdir", str(mine), "--upstream-workdir", str(shared)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"extract +up to date +\w+ +in {re.escape(str(shared))}/extract/", out), out
    assert re.search(r"distill +up to date +\w+\n", out), out
    # a shared workdir's finished student is used as it is; --force retrains in this workdir only
    shutil.copytree(mine / "distill" / "students", shared / "distill" / "students")
    shutil.rmtree(mine / "distill")
    before = _snapshot(shared)
    assert Runner(cfg2).student_dir("spectral").parent.parent.parent == shared
    Runner(cfg2).run("distill", force=True)
    assert _snapshot(shared) == before
    assert Runner(cfg2).student_dir("spectral").parent.parent.parent == mine


def test_unwritable_workdir_lock_says_what_to_do(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(LockedError, match=r"cannot take the lock of .* --upstream-workdir"):
        with OutputLock(tmp_path / "afile" / "w" / "extract" / "abc"):
            pass


def test_an_image_replaced_by_another_valid_image_stops_distill(built, tmp_path):
    """Same tar, same size, every image decodable: two equal-size images swapped in place. Only the
    crc32 recorded when prepare indexed the shard tells; distill must refuse the row, naming it."""
    cfg2, _ = _damaged_copy(built, tmp_path)
    tar = next(Path(cfg2.workdir).glob("prepare/*/train-000002.tar"))
    with tarfile.open(tar) as tf:
        pngs = [m for m in tf.getmembers() if m.name.endswith(".png")]
    by_size: dict[int, list] = {}
    for m in pngs:
        by_size.setdefault(m.size, []).append(m)
    a, b = next(v for v in by_size.values() if len(v) >= 2)[:2]
    data = tar.read_bytes()
    pa_, pb = data[a.offset_data : a.offset_data + a.size], data[b.offset_data : b.offset_data + b.size]
    assert pa_ != pb
    with open(tar, "r+b") as f:
        f.seek(a.offset_data)
        f.write(pb)
        f.seek(b.offset_data)
        f.write(pa_)
    assert Runner(cfg2).state("prepare").status == "up to date"  # sizes unchanged: status cannot see it
    with pytest.raises(PipelineError, match=rf"{re.escape(str(tar))}: the image of sample "
                                            rf"({re.escape(a.name[:-4])}|{re.escape(b.name[:-4])}) \(row \d+\)"):
        Runner(cfg2).run("distill")
