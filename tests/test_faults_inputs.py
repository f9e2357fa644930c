"""Input rules: what prepare refuses in the shards it is given, and what every later read of a
sample, and the teacher's outputs at extract, are checked against."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from tests.conftest import TINY, cli, copy_upstream, tiny_tree, write_config


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key: str, label: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.cls", str(label).encode()), (f"{key}.png", _png(10 * label))]


def _tar(path: Path, members: list[tuple[str, bytes]], **kw) -> Path:
    """A tar of ``members`` (name, bytes) in that order; ``kw`` to tarfile.open (format, encoding)."""
    with tarfile.open(path, "w", **kw) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _samples(*keys: str) -> list[tuple[str, bytes]]:
    return [m for i, k in enumerate(keys) for m in _sample(k, i % 10)]


def _shards_cfg(tmp_path: Path, train, val, **changes):
    tree = tiny_tree(**{"data.source": "shards", "data.train_shards": str(train), "data.val_shards": str(val),
                        "teacher.fit": None, **changes})
    return config_from_dict(tree, workdir=str(tmp_path / "w"))


def _member(tar: Path, suffix: str, n: int = 3) -> tarfile.TarInfo:
    with tarfile.open(tar) as tf:
        return [m for m in tf.getmembers() if m.name.endswith(suffix)][n]


def _overwrite(tar: Path, m: tarfile.TarInfo, data: bytes) -> None:
    assert len(data) == m.size
    with open(tar, "r+b") as f:
        f.seek(m.offset_data)
        f.write(data)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- case 5: labels carry a crc32


def test_a_label_changed_in_place_stops_distill(built, tmp_path):
    """A ``.cls`` member rewritten with the same size: status cannot see it; the label's crc32,
    recorded by prepare, stops the student naming the tar and the key."""
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    tar = next(wd.glob("prepare/*/train-000001.tar"))
    m = _member(tar, ".cls")
    old = tar.read_bytes()[m.offset_data : m.offset_data + m.size]
    _overwrite(tar, m, str((int(old) + 5) % 10).encode())
    cfg2 = config_from_dict(tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}), workdir=str(wd))
    assert Runner(cfg2).state("prepare").status == "up to date"
    key = m.name[: -len(".cls")]
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(tar))}: the label of sample {key} \(row \d+\) was "
                                            r"read at extract time and changed since prepare indexed it \(crc32") as e:
        Runner(cfg2).run("distill")
    _one_line(e)
    assert not list(wd.glob("distill/students/*/lock.json"))


def test_index_and_manifest_record_the_label_member_and_older_ones_read_unchecked(built):
    from cache.manifest import rows_of_manifest
    from cache.reader import open_cache
    from stages.data import ViewDataset
    from stages.shards import load_index

    cfg, runner, recs = built
    train, _, _ = load_index(recs["prepare"])
    assert (train.cls_crc32 >= 0).all() and (train.cls_size == 1).all()
    s = train.sample(7)
    with open(s.url, "rb") as f:
        f.seek(s.cls_offset)
        assert int(f.read(s.cls_size)) == s.label
    cache = open_cache(recs["extract"])
    m = cache.manifest
    assert {"cls_offset", "cls_size", "cls_crc32"} <= set(m.column_names)
    older = m.drop_columns(["cls_offset", "cls_size", "cls_crc32", "crc32"])
    rows = rows_of_manifest(older, cache.path)
    assert set(rows.params) == set(cache.rows().params)  # no recorded column is taken for a view parameter
    assert (rows.samples.cls_crc32 == -1).all() and (rows.samples.crc32 == -1).all()
    # a label that disagrees with the index is not checked when the label member was not recorded
    rows.samples.label = (rows.samples.label + 1) % 10
    x, _, ok, _ = ViewDataset.for_config(rows, cfg.data).batch(range(8))
    assert bool(ok.all()) and int(x.sum()) > 0
    checked = cache.rows()
    checked.samples.label = (checked.samples.label + 1) % 10
    with pytest.raises(PipelineError, match=r"the label of sample \S+ \(row 0\) was read at extract time and says"):
        ViewDataset.for_config(checked, cfg.data).batch([0])


# ----------------------------------------------------------------------------- case 7: a changed image is an error


@pytest.mark.parametrize("stage", ["teacher", "extract"])
def test_an_image_changed_before_a_stage_is_one_line_naming_tar_and_key(built, tmp_path, stage):
    """Changed after prepare indexed it (crc32 mismatch): never a skipped row, and the error made in a
    DataLoader worker arrives as one line."""
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w", ("prepare",) if stage == "teacher" else ("prepare", "teacher"))
    tar = next(wd.glob("prepare/*/train-000002.tar"))
    m = _member(tar, ".png")
    _overwrite(tar, m, b"X" * m.size)
    cfg2 = config_from_dict(TINY, ["teacher.fit.num_workers=1", "extract.num_workers=1"], workdir=str(wd))
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(tar))}: the image of sample {m.name[:-4]} \(row \d+\) "
                                            r"changed since prepare indexed it \(crc32 mismatch\)") as e:
        Runner(cfg2).run(stage)
    _one_line(e)
    assert Runner(cfg2).state(stage).status != "up to date"
    assert not list(wd.glob(f"{stage}/*/lock.json"))


def test_a_missing_source_tar_is_an_error_not_bad_rows(built, tmp_path):
    from stages.data import SourceChanged, ViewDataset
    from cache.reader import open_cache

    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg2 = config_from_dict(TINY, workdir=str(wd))
    cache = open_cache(Runner(cfg2).record("extract"))
    ds = ViewDataset.for_config(cache.rows(), cfg2.data)
    url = cache.rows().source(0).url
    Path(url).unlink()
    with pytest.raises(SourceChanged, match=rf"^{re.escape(url)}: the image of sample \S+ \(row 0\) was read at "
                                            r"extract time and cannot be read now"):
        ds.batch([0])


# ----------------------------------------------------------------------------- case 6: a key names one sample


def test_a_key_repeated_in_one_tar_is_refused_naming_both_members(tmp_path):
    train = _tar(tmp_path / "train.tar", _samples("a", "b") + _sample("a", 3))
    val = _tar(tmp_path / "val.tar", _samples("v"))
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(train))}: sample key 'a' is repeated: label members "
                                            r"a\.cls \(byte 0\) and a\.cls \(byte \d+\)") as e:
        Runner(_shards_cfg(tmp_path, train, val)).run("prepare")
    _one_line(e)
    # two images of one key, adjacent: one would replace the other as well
    _tar(train, _samples("a", "b") + [("b.jpg", _png(1))])
    with pytest.raises(PipelineError, match=r"sample key 'b' is repeated: image members b\.png \(byte \d+\) and "
                                            r"b\.jpg"):
        Runner(_shards_cfg(tmp_path, train, val)).run("prepare")


def test_a_key_in_two_tars_is_refused_naming_both(tmp_path):
    t0 = _tar(tmp_path / "train-0.tar", _samples("a", "b"))
    t1 = _tar(tmp_path / "train-1.tar", _samples("c", "b"))
    val = _tar(tmp_path / "val.tar", _samples("v"))
    with pytest.raises(PipelineError, match=rf"^sample key 'b' is in {re.escape(str(t0))} \(members b\.cls, b\.png\) "
                                            rf"and in {re.escape(str(t1))} \(members b\.cls, b\.png\)") as e:
        Runner(_shards_cfg(tmp_path, tmp_path / "train-{0..1}.tar", val)).run("prepare")
    _one_line(e)
    # the same key in train and val
    _tar(t1, _samples("c", "d"))
    _tar(val, _samples("a"))
    with pytest.raises(PipelineError, match=rf"sample key 'a' is in {re.escape(str(t0))} .* and in "
                                            rf"{re.escape(str(val))}"):
        Runner(_shards_cfg(tmp_path, tmp_path / "train-{0..1}.tar", val)).run("prepare")
    _tar(val, _samples("v"))
    rec = Runner(_shards_cfg(tmp_path, tmp_path / "train-{0..1}.tar", val)).run("prepare")["prepare"]
    assert rec.summary["skipped_samples"] == 0


# ----------------------------------------------------------------------------- case 14: only regular files


def test_a_fifo_in_the_shard_list_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "train-000000.tar"
    os.mkfifo(fifo)
    val = _tar(tmp_path / "val.tar", _samples("v"))
    conf = write_config(tmp_path / "p.yaml", tiny_tree(**{"data.source": "shards", "data.train_shards": str(fifo),
                                                          "data.val_shards": str(val), "teacher.fit": None}))
    r = cli("run", "prepare", "-c", str(conf), "--workdir", str(tmp_path / "w"), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (f"error: data.train_shards: {fifo} is a FIFO (named pipe), not a regular file; "
                                f"list only tar files"), r.stderr


def test_a_directory_in_the_shard_list_is_refused(tmp_path):
    from stages.shards import scan_shard

    d = tmp_path / "val.tar"
    d.mkdir()
    train = _tar(tmp_path / "train.tar", _samples("a"))
    with pytest.raises(PipelineError, match=rf"^data\.val_shards: {re.escape(str(d))} is a directory, not a regular"):
        Runner(_shards_cfg(tmp_path, train, d)).run("prepare")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(d))} is a directory"):
        scan_shard(str(d))


# ----------------------------------------------------------------------------- case 15: a member name not UTF-8


def test_a_latin1_member_name_is_a_skipped_sample_or_one_line_naming_the_tar(tmp_path):
    members = _samples("a", "b") + [("caf\xe9.cls", b"1"), ("caf\xe9.png", _png(3))]
    train = _tar(tmp_path / "train.tar", members, format=tarfile.USTAR_FORMAT, encoding="latin-1")
    with tarfile.open(train, encoding="latin-1") as tf:  # the name really is latin-1 bytes
        assert "caf\xe9.png" in tf.getnames()
    val = _tar(tmp_path / "val.tar", _samples("v"))
    rec = Runner(_shards_cfg(tmp_path, train, val)).run("prepare")["prepare"]
    skipped = json.loads((Path(rec.path) / "shards.json").read_text())["skipped"]
    assert [(s["key"], s["error"]) for s in skipped] == [("caf\\xe9", "member name caf\\xe9.cls is not UTF-8; "
                                                          "rename it")]
    assert skipped[0]["url"] == str(train)
    cfg = _shards_cfg(tmp_path, train, val, **{"data.on_bad_sample": "fail"})
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(train))}: bad sample caf\\xe9: member name "
                                            r"caf\\xe9\.cls is not UTF-8; rename it \(data\.on_bad_sample: fail\)$"):
        Runner(cfg).run("teacher")


# ----------------------------------------------------------------------------- case 16: a split with no samples


@pytest.mark.parametrize("empty", ["no members", "zero bytes"])
def test_a_split_without_samples_is_refused_at_prepare(tmp_path, empty):
    train = _tar(tmp_path / "train.tar", _samples("a", "b"))
    val = tmp_path / "val-000000.tar"
    if empty == "no members":
        _tar(val, [])
    else:
        val.write_bytes(b"")
    with pytest.raises(PipelineError, match=rf"^data\.val_shards: the val split has no samples \(shards: "
                                            rf"{re.escape(str(val))}.*\); list shards that hold samples$") as e:
        Runner(_shards_cfg(tmp_path, train, val)).run("prepare")
    _one_line(e)
    assert not list((tmp_path / "w").glob("prepare/*/lock.json"))
    with pytest.raises(PipelineError, match=r"^data\.train_shards: the train split has no samples"):
        Runner(_shards_cfg(tmp_path, val, train)).run("prepare")


# ----------------------------------------------------------------------------- case 8: a non-finite teacher at extract


def test_a_non_finite_teacher_is_not_written_as_a_complete_cache(built, tmp_path, monkeypatch):
    import zarr

    from stages import models

    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w", ("prepare", "teacher"))
    real = models.intermediates

    def nan_last_layer(model, x, indices):
        logits, feats = real(model, x, indices)
        return logits, feats[:-1] + [feats[-1] * float("nan")]

    monkeypatch.setattr(models, "intermediates", nan_last_layer)
    cfg2 = config_from_dict(TINY, workdir=str(wd))
    with pytest.raises(PipelineError, match=r"cache\.zarr: spectra/blocks\.3 is not finite \(nan or inf in "
                                            r"torch\.float16\) on 64 of rows 0\.\.63 of shard 0 \(first: row 0\)") as e:
        Runner(cfg2).run("extract")
    _one_line(e)
    assert Runner(cfg2).state("extract").status != "up to date"
    assert not list(wd.glob("extract/*/lock.json"))
    g = zarr.open_group(str(next(wd.glob("extract/*/cache.zarr"))), mode="r")
    assert g.attrs.get("complete") is not True
    assert not list(next(wd.glob("extract/*/cache.zarr")).glob("_complete/*.json"))


def test_teacher_layers_listed_in_any_order_are_each_cached_under_their_own_name(built, tmp_path):
    """extract.layers [-1, 0] (layer 3 first): each cached array holds its own layer's spectra, as in
    the session's cache made from [0, -1] (timm hands layers back in block order, whatever the ask)."""
    import numpy as np

    from cache.reader import Cache, cache_path

    _, _, recs = built
    wd = copy_upstream(recs, tmp_path / "w", ("prepare", "teacher"))
    rec = Runner(config_from_dict(tiny_tree(**{"extract.layers": [-1, 0]}), workdir=str(wd))).run("extract")["extract"]
    mine, session = Cache(cache_path(rec)), Cache(cache_path(recs["extract"]))
    assert [(layer.index, layer.name) for layer in mine.spec.layers] == [(3, "blocks.3"), (0, "blocks.0")]
    for index in (0, 3):
        np.testing.assert_array_equal(mine.read_layer("spectra", index, 0, 64),
                                      session.read_layer("spectra", index, 0, 64))


class _Failing:
    """A map-style dataset whose item 3 raises ``error`` (as a damaged shard or a changed sample does)."""

    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        if i == 3:
            raise self.error
        return i


@pytest.mark.parametrize("error", ["PipelineError", "SourceChanged", "ConfigError"])
def test_an_error_raised_in_a_dataloader_worker_keeps_its_one_line(error):
    """torch re-raises a worker's exception made anew from "Caught ... Original Traceback ..."; a
    PipelineError (and each subclass) comes back as the line the CLI prints, not that traceback."""
    import torch

    from pipeline.config import ConfigError
    from stages.data import SourceChanged

    cls = {"PipelineError": PipelineError, "SourceChanged": SourceChanged, "ConfigError": ConfigError}[error]
    line = "/data/cache.zarr/logits: shard 0 is corrupt (chunk 0 checksum mismatch, reading rows 0..63)"
    with pytest.raises(cls) as caught:
        list(torch.utils.data.DataLoader(_Failing(cls(line)), batch_size=2, num_workers=1))
    assert str(caught.value) == line
    assert str(cls("Caught nothing: a message of its own")) == "Caught nothing: a message of its own"
