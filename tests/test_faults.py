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
from pipeline.locking import LockedError, WorkdirLock
from tests.conftest import ROOT, TINY, cli, copy_upstream, tiny_tree, write_config


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
        assert done["distill"].summary["complete"] and (Path(done["analyze"].path) / "report.md").exists()
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert _snapshot(cdir) == before  # nothing in the cache was written


def test_second_run_names_the_lock_holder_and_stale_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; sys.path.insert(0, %r)\n"
         "from pipeline.locking import WorkdirLock\n"
         "with WorkdirLock(%r, 'run extract'):\n    print('locked', flush=True); time.sleep(60)"
         % (str(ROOT), str(tmp_path))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=rf"pid {holder.pid} on .* since .*\(run extract\)"):
        with WorkdirLock(tmp_path, "second"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # the kernel released the dead holder's lock: the next run takes it over
    with WorkdirLock(tmp_path, "third", wait=5) as lk:
        assert lk.holder()["pid"] == os.getpid() and lk.holder()["what"] == "third"


def test_verify_cli_ok_then_names_flipped_shard(built, tmp_path):
    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)
    conf = write_config(tmp_path / "p.yaml", TINY)
    r = cli("verify", "-c", str(conf), "--workdir", str(wd))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify extract: ok" in r.stdout
    f = next(wd.glob("extract/*/cache.zarr")) / "logits" / "c" / "2" / "0"
    b = bytearray(f.read_bytes())
    b[len(b) // 3] ^= 0x01
    f.write_bytes(bytes(b))
    r = cli("verify", "-c", str(conf), "--workdir", str(wd))
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


def test_truncated_zarr_json_names_the_file(built, tmp_path):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    zj = cdir / "zarr.json"
    zj.write_text(zj.read_text()[:200])
    conf = write_config(tmp_path / "p.yaml", TINY)
    r = cli("verify", "-c", str(conf), "--workdir", cfg2.workdir)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{zj}: cannot read the cache's metadata" in r.stdout and "Traceback" not in r.stderr


def test_runs_from_another_directory_and_a_moved_workdir(built, tmp_path):
    import pyarrow.parquet as pq

    cfg, runner, recs = built
    wd = tmp_path / "w"
    copy_upstream(recs, wd)  # a moved workdir: the copies must read the copied shards
    (tmp_path / "elsewhere").mkdir()
    conf = write_config(tmp_path / "p.yaml", tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}))
    r = cli("run", "distill", "-c", "../p.yaml", "--workdir", "../w", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr[-2000:]
    shards = json.loads(next(wd.glob("prepare/*/shards.json")).read_text())
    assert all(not os.path.isabs(u) for u in shards["train"] + shards["val"])
    urls = set(pq.read_table(next(wd.glob("extract/*/cache.zarr/manifest.parquet"))).column("url").to_pylist())
    assert urls and all(u.startswith("../../../prepare/") for u in urls), urls
    metrics = pq.read_table(next(wd.glob("distill/students/none-*/metrics.parquet"))).to_pylist()
    assert metrics[0]["loss_total"] > 0 and metrics[0]["val_top1"] > 0
    r = cli("status", "-c", str(tmp_path / "p.yaml"), "--workdir", str(wd), cwd=ROOT)
    assert r.returncode == 0 and "distill  up to date" in r.stdout, r.stdout


def test_deleted_source_tar_makes_prepare_stale_and_a_changed_image_stops_distill(built, tmp_path):
    cfg2, cdir = _damaged_copy(built, tmp_path)
    tar = next(Path(cfg2.workdir).glob("prepare/*/train-000001.tar"))
    saved = tar.read_bytes()
    tar.unlink()
    st = {s.stage: s for s in Runner(cfg2).status()}
    assert st["prepare"].status == "stale" and any(f"{tar} is missing" in r for r in st["prepare"].reasons)
    tar.write_bytes(saved)
    assert Runner(cfg2).state("prepare").status == "up to date"
    # same size, one image's bytes changed: status cannot see it, distill must refuse the row
    with tarfile.open(tar) as tf:
        m = [m for m in tf.getmembers() if m.name.endswith(".png")][3]
    with open(tar, "r+b") as f:
        f.seek(m.offset_data)
        f.write(b"X" * m.size)
    with pytest.raises(PipelineError, match=rf"{re.escape(str(tar))}: the image of sample "
                                            rf"{re.escape(m.name[:-4])} \(row \d+\) was read at extract time"):
        Runner(cfg2).run("distill")
