"""prepare: deterministic stratified split, byte-reproducible shards readable by webdataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.config import config_from_dict
from pipeline.graph import Runner
from stages.prepare import stratified_split
from tests.conftest import TINY


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_two_prepare_runs_are_byte_identical(tmp_path):
    recs = []
    for name in ("a", "b"):
        r = Runner(config_from_dict(TINY, workdir=str(tmp_path / name)))
        recs.append(r.run("prepare")["prepare"])
    da, db = digests(recs[0].path), digests(recs[1].path)
    assert da and da == db
    # webdataset reads them back: every sample has an image and a label
    n = 0
    for sample in wds.WebDataset(str(Path(recs[0].path) / "val-000000.tar"), shardshuffle=False):
        assert "png" in sample and 0 <= int(sample["cls"]) < 10
        n += 1
    assert n == 359


def test_stratified_split_is_deterministic_and_stratified():
    y = np.repeat(np.arange(5), 40)
    tr1, va1 = stratified_split(y, 0.25, 3)
    tr2, va2 = stratified_split(y, 0.25, 3)
    assert np.array_equal(tr1, tr2) and np.array_equal(va1, va2)
    assert set(tr1).isdisjoint(va1) and len(tr1) + len(va1) == len(y)
    assert np.all(np.bincount(y[va1]) == 10)


def test_imagefolder_source(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    cfg = config_from_dict(TINY, ["data.source=imagefolder", f"data.root={root}", "data.num_classes=2"],
                           workdir=str(tmp_path / "w"))
    rec = Runner(cfg).run("prepare")["prepare"]
    assert rec.summary["classes"] == ["cat", "dog"]
    keys = [s["__key__"] for s in wds.WebDataset(str(Path(rec.path) / "train-000000.tar"), shardshuffle=False)]
    assert len(keys) == 8


def test_damaged_or_stale_shard_index_is_refused_and_rebuilt(tmp_path):
    """index.parquet is never trusted past its digest: a flipped byte, a truncation or a deletion
    makes readers refuse it naming the file and the next run rebuild it; a resized shard makes the
    whole index stale and rebuilt."""
    import pytest

    from pipeline.errors import PipelineError
    from stages.shards import INDEX, load_index

    cfg = config_from_dict(TINY, workdir=str(tmp_path / "w"))
    rec = Runner(cfg).run("prepare")["prepare"]
    index = Path(rec.path) / INDEX
    good = index.read_bytes()
    damages = {
        "flip": lambda p: p.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:]),
        "truncate": lambda p: p.write_bytes(good[: len(good) // 2]),
        "empty": lambda p: p.write_bytes(b""),
        "delete": lambda p: p.unlink(),
    }
    for name, damage in damages.items():
        damage(index)
        with pytest.raises(PipelineError, match="index.parquet"):
            load_index(rec)
        again = Runner(cfg).run("prepare")["prepare"]
        assert (Path(again.path) / INDEX).read_bytes() == good, name
        assert len(load_index(again)[0]) == 1438
    # a shard resized after indexing: the index's byte ranges are stale, so prepare runs again
    tar = Path(rec.path) / "train-000000.tar"
    size = tar.stat().st_size
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    rebuilt = Runner(cfg).run("prepare")["prepare"]
    assert (Path(rebuilt.path) / "train-000000.tar").stat().st_size == size  # rewritten, not trusted
    assert (Path(rebuilt.path) / INDEX).read_bytes() == good
