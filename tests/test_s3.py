"""Object storage: input shards and the cache in a bucket of a local S3 endpoint (moto), students
reading from there, and the read contract counted in requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from cache.reader import CACHE_DIR, CACHE_URL, Cache, cache_path, open_cache
from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from pipeline.storage import Location, StoreCalls
from tests.conftest import tiny_tree

SHARDS = "s3://test/shards"
CACHES = "s3://test/caches"


def store(options: dict):
    return fsspec.filesystem("s3", **options)


def bucket_tree(s3: dict, checkpoint: Path, **changes) -> dict:
    """The tiny config with its input shards and its cache in the bucket, the teacher from a checkpoint
    (one view per image and students on 30 images per class: the tests stay quick)."""
    return tiny_tree(**{"extract.views": 1, "distill.defaults.train_per_class": 30, "data.source": "shards",
                        "data.train_shards": f"{SHARDS}/train-{{000000..000003}}.tar",
                        "data.val_shards": f"{SHARDS}/val-000000.tar", "data.storage_options": s3,
                        "teacher.fit": None, "teacher.checkpoint": str(checkpoint), "extract.location": CACHES,
                        **changes})


@pytest.fixture(scope="module")
def remote(built, s3, tmp_path_factory):
    """The session pipeline's shards copied into the bucket, its teacher as a checkpoint, and extract
    run once with the cache in the bucket: (tree, runner, records, tmp)."""
    _, _, recs = built
    fs = store(s3)
    for p in sorted(Path(recs["prepare"].path).glob("*.tar")):
        fs.put_file(str(p), f"{SHARDS[5:]}/{p.name}")
    tmp = tmp_path_factory.mktemp("s3")
    checkpoint = tmp / "teacher.pt"
    shutil.copy(Path(recs["teacher"].path) / "model.pt", checkpoint)
    tree = bucket_tree(s3, checkpoint)
    runner = Runner(config_from_dict(tree, workdir=str(tmp / "a")))
    return tree, runner, runner.run("extract"), tmp


def _arrays(group) -> dict[str, np.ndarray]:
    return {name: group[name][:] for name in ("logits", "valid", *(f"spectra/{la['name']}"
                                                                   for la in group.attrs["layers"]))}


def test_the_cache_is_written_to_the_bucket_and_equals_a_local_one(built, s3, remote):
    _, _, local = built
    tree, runner, recs, tmp = remote
    rec = recs["extract"]
    url = rec.summary[CACHE_URL]
    assert url == f"{CACHES}/{rec.lock['fingerprint'][:12]}/{CACHE_DIR}" and cache_path(rec) == url
    assert [p.name for p in Path(rec.path).iterdir()] == ["lock.json"], "only the record stays in the workdir"
    got = zarr.open_group(url, mode="r", storage_options=s3)
    ref = zarr.open_group(str(cache_path(local["extract"])), mode="r")
    assert got.attrs["complete"] is True
    # the rows of view 0 and of val are laid out as in the session's two-view cache, whose view 1 lies between
    (v0, val), (rv0, rval) = ([(b["start"], b["stop"]) for b in g.attrs["blocks"] if b["view"] == 0]
                              for g in (got, ref))
    have = _arrays(got)
    for name, want in _arrays(ref).items():
        np.testing.assert_array_equal(have[name][v0[0]:v0[1]], want[rv0[0]:rv0[1]], err_msg=name)
        np.testing.assert_array_equal(have[name][val[0]:val[1]], want[rval[0]:rval[1]], err_msg=name)
    # the manifest names the objects the images came from; prepare recorded each object's size and ETag
    cache = open_cache(rec)
    assert set(cache.rows().samples.urls) == {f"{SHARDS}/train-{i:06d}.tar" for i in range(4)} | {
        f"{SHARDS}/val-000000.tar"}
    entries = recs["prepare"].lock["inputs"]["identity"]["shards"]["train"]
    assert all(len(e) == 3 and e[2].strip('"') for e in entries), entries
    # no credential reached a record
    for r in recs.values():
        text = (Path(r.path) / "lock.json").read_text()
        assert "testing-secret" not in text and "testing-key-id" not in text
    assert runner.state("extract").status == "up to date"


def _units(cache: Cache, split: str = "train", view: int = 0) -> list[tuple[int, int]]:
    """The chunk-aligned row ranges of one (split, view) block, as a student reads them."""
    b, c = cache.block(split, view), cache.chunk_rows()
    edges = sorted({b.start, b.stop, *range((b.start // c + 1) * c, b.stop, c)})
    return list(zip(edges[:-1], edges[1:]))


def test_an_epoch_of_target_reads_costs_one_get_per_shard_index_and_one_per_span(built, remote):
    """The one-pass reader's contract over HTTP: per array, one ranged GET of each shard's index (once
    per process) and one per contiguous span of chunks a read needs; no HEAD, no listing."""
    _, _, local = built
    rec = remote[2]["extract"]
    ref = open_cache(local["extract"])
    cache = open_cache(rec)  # opening reads the metadata, the manifest, the shard index, the marker listing
    units = _units(cache)
    order = np.random.default_rng(0).permutation(len(units))
    layers = [la.index for la in cache.spec.layers]
    arrays = ["logits", *(f"spectra/{la.name}" for la in cache.spec.layers)]
    rps = cache.spec.rows_per_shard
    shards = {s for a, b in units for s in range(a // rps, (b - 1) // rps + 1)}
    for epoch in range(2):
        with StoreCalls() as calls:
            for i in order:
                a, b = units[i]
                np.testing.assert_array_equal(cache.read("logits", a, b), ref.read("logits", a, b))
                for t in layers:
                    np.testing.assert_array_equal(cache.read_layer("spectra", t, a, b),
                                                  ref.read_layer("spectra", t, a, b))
        indexes = len(shards) * len(arrays) if epoch == 0 else 0  # an index is read once per process
        assert calls.count("GetObject") == indexes + len(units) * len(arrays), (epoch, calls.calls)
        assert set(calls.calls) == {"GetObject"}, calls.calls
        assert all(r.startswith("bytes=") for r in calls.ranges), "every GET is a ranged one"
    # a second epoch reads exactly the stored chunks again: the spans' bytes are the shard files' less their indexes
    files = Location(cache_path(rec)).files()
    index_bytes = 16 * (rps // cache.chunk_rows()) + 4
    root = len(str(cache.store)) + 1
    want = sum(files[str(cache.shard_file(n, s))[root:]] - index_bytes for n in arrays for s in shards)
    assert calls.get_bytes == want


def _copy_records(runner: Runner, wd: Path, stages=("prepare", "teacher", "extract")) -> Path:
    """A fresh workdir with copies of the records of ``stages`` (a remote cache stays where it is)."""
    for st in stages:
        src = runner.out_dir(st)
        shutil.copytree(src, wd / st / src.name)
    return wd


def _metrics(rec) -> list[dict]:
    rows = pq.read_table(Path(rec.path) / "metrics.parquet").to_pylist()
    return [{k: v for k, v in r.items() if k not in ("step_s", "epoch_s", "data_s")} for r in rows]


def test_a_student_trains_from_the_bucket_as_from_a_local_copy_of_the_cache(s3, remote, tmp_path):
    """Fixed seeds on CPU: a student reading its targets (and images) from the bucket ends with the
    metrics and weights of the same student reading a local copy of the same cache."""
    import torch

    tree, runner, recs, _ = remote
    got = runner.run("distill/spectral")["distill/spectral"]
    # the local reference: the cache downloaded into an extract output of a workdir with the same config
    wd = _copy_records(runner, tmp_path / "local", ("prepare", "teacher"))
    ext = wd / "extract" / runner.out_dir("extract").name
    store(s3).get(cache_path(recs["extract"]).removeprefix("s3://"), str(ext / CACHE_DIR), recursive=True)
    lock = json.loads((runner.out_dir("extract") / "lock.json").read_text())
    del lock["summary"][CACHE_URL]
    (ext / "lock.json").write_text(json.dumps(lock))
    local = Runner(config_from_dict(tree, workdir=str(wd)))
    assert Cache(cache_path(local.record("extract"))).remote is False
    ref = local.run("distill/spectral")["distill/spectral"]
    assert ref.lock["fingerprint"] == got.lock["fingerprint"]
    assert _metrics(got) == _metrics(ref)
    a = torch.load(Path(got.path) / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(Path(ref.path) / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


def _shard_object(rec, array: str, s: int) -> str:
    cache = open_cache(rec)
    return str(cache.shard_file(array, s)).removeprefix("s3://")


@pytest.mark.parametrize("damage", ["deleted", "emptied", "flipped", "marker"])
def test_a_damaged_remote_cache_is_named_and_nothing_trains(s3, remote, tmp_path, damage):
    tree, runner, recs, _ = remote
    fs = store(s3)
    rec = recs["extract"]
    key = _shard_object(rec, "spectra/blocks.3", 2)
    if damage == "marker":
        key = f"{cache_path(rec).removeprefix('s3://')}/_complete/000004.json"
    original = fs.cat_file(key)
    try:
        if damage in ("deleted", "marker"):
            fs.rm_file(key)
        elif damage == "emptied":
            fs.pipe_file(key, b"")
        else:
            flipped = bytearray(original)
            flipped[len(flipped) // 3] ^= 0x10
            fs.pipe_file(key, bytes(flipped))
        wd = _copy_records(runner, tmp_path / "w")
        student = Runner(config_from_dict(tree, workdir=str(wd)))
        why = {"deleted": "shard 2 of spectra/blocks.3 is missing", "emptied": "shard 2 is corrupt .*shorter",
               "flipped": "shard 2 is corrupt .*checksum mismatch", "marker": "shard 4 is not marked complete"}
        with pytest.raises(PipelineError, match=why[damage]) as err:
            student.run("distill/spectral")
        assert key in str(err.value)
        assert not list(wd.glob("distill/students/*/final.pt")), "nothing was trained"
        problems = __import__("cache.verify", fromlist=["verify_stage"]).verify_stage(student, "extract")
        assert problems and any("shard" in p for p in problems), problems
    finally:
        fs.pipe_file(key, original)


def _remote_arrays(url: str, s3: dict) -> dict[str, np.ndarray]:
    return _arrays(zarr.open_group(url, mode="r", storage_options=s3))


def test_an_interrupted_remote_extract_resumes_from_its_committed_shards(s3, remote, tmp_path, monkeypatch, caplog):
    import logging

    from cache.writer import CacheWriter

    tree, runner, recs, _ = remote
    wd = _copy_records(runner, tmp_path / "w", ("prepare", "teacher"))
    cfg = config_from_dict({**tree, "extract": {**tree["extract"], "location": "s3://test/resume", "writers": 0}},
                           workdir=str(wd))
    real = CacheWriter.write_shard
    written = []

    def interrupted(self, s, data, bad):
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C, or a node lost, after three committed shards
        real(self, s, data, bad)
        written.append(s)

    monkeypatch.setattr(CacheWriter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg).run("extract")
    url = f"s3://test/resume/{recs['extract'].lock['fingerprint'][:12]}/{CACHE_DIR}"
    markers = store(s3).ls(url.removeprefix("s3://") + "/_complete", detail=True)
    assert sorted(m["name"].rsplit("/", 1)[1] for m in markers) == [f"{s:06d}.json" for s in written]
    with pytest.raises(PipelineError, match="incomplete"):
        Cache(url)  # nothing uncommitted is read
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        done = Runner(cfg).run("extract")["extract"]
    assert "resuming, 3/" in caplog.text
    rows = done.summary["rows"]
    assert done.summary["rows_computed"] == rows - 3 * cfg.extract.rows_per_shard
    after = {m["name"]: m["LastModified"] for m in store(s3).ls(url.removeprefix("s3://") + "/_complete", detail=True)}
    assert all(after[m["name"]] == m["LastModified"] for m in markers), "committed shards were not written again"
    ref = _remote_arrays(cache_path(recs["extract"]), s3)
    for name, arr in _remote_arrays(url, s3).items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)


def test_two_ranks_on_separate_workdirs_write_the_one_process_cache(s3, remote, tmp_path):
    """torchrun ranks on two 'nodes' that share nothing but the bucket (each its own workdir with its own
    prepare and teacher records) write disjoint shards of one cache, equal to the one-process cache."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, write_config

    tree, runner, recs, _ = remote
    conf = write_config(tmp_path / "p.yaml", {**tree, "extract": {**tree["extract"], "location": "s3://test/ranks"}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = []
    for node in (0, 1):
        wd = _copy_records(runner, tmp_path / f"node{node}", ("prepare", "teacher"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "pipeline", "run", "extract", "-c", str(conf), "--workdir", str(wd)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    url = f"s3://test/ranks/{recs['extract'].lock['fingerprint'][:12]}/{CACHE_DIR}"
    assert (tmp_path / "node0" / "extract").is_dir() and not list((tmp_path / "node1").glob("extract/*/lock.json"))
    ref = _remote_arrays(cache_path(recs["extract"]), s3)
    got = _remote_arrays(url, s3)
    for name, arr in got.items():
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    assert Cache(url).attrs["complete"] is True


def test_students_on_workers_that_share_only_the_bucket(s3, remote, tmp_path, capsys):
    """distill.shared_workdir: false: a Dask worker's student and a --jobs student each train in a
    scratch workdir of their own, reading the bucket; their folders come back, status and verify see
    them and the summary is written here."""
    from distributed import LocalCluster

    from pipeline.__main__ import main
    from tests.conftest import write_config

    tree, runner, recs, _ = remote
    wd = _copy_records(runner, tmp_path / "w")
    conf = write_config(tmp_path / "p.yaml", {**tree, "distill": {**tree["distill"], "shared_workdir": False}})
    base = ["-c", str(conf), "--workdir", str(wd)]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert main(["run", "distill", *base, "--student", "none", "--set",
                     f"distill.scheduler={cluster.scheduler_address}"]) == 0
    assert main(["run", "distill", *base, "--jobs", "2"]) == 0
    assert main(["status", *base]) == 0
    out = capsys.readouterr().out
    for node in ("distill/none", "distill/spectral", "distill"):
        assert any(line.split()[:3] == [node, "up", "to"] for line in out.splitlines()), out
    assert main(["verify", "distill/spectral", *base]) == 0
    check = Runner(config_from_dict(tree, workdir=str(wd)))
    for name in ("none", "spectral"):
        rec = check.record(f"distill/{name}")
        assert rec is not None and rec.path == check.out_dir(f"distill/{name}")
        assert {p.name for p in Path(rec.path).iterdir()} >= {"final.pt", "metrics.parquet", "lock.json"}
    assert not list(wd.glob("distill/students/*.incoming")) and (wd / "distill").glob("*/summary.md")


def test_credentials_in_the_config_are_refused_without_echoing_them():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.storage_options: aws_secret_access_key: credentials never go") as e:
        config_from_dict(tiny_tree(**{"data.storage_options": {"endpoint_url": "http://127.0.0.1:9",
                                                               "aws_secret_access_key": "s3cr3t-value"}}))
    assert "s3cr3t-value" not in str(e.value)
    with pytest.raises(ConfigError, match=r"extract\.location: .*store URL"):
        config_from_dict(tiny_tree(**{"extract.location": "/local/folder"}))


def test_a_missing_store_client_is_one_line_naming_the_extra(monkeypatch):
    import importlib
    import sys

    from pipeline import storage

    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the s3 extra were not installed
    for protocol in ("s3", "s3a"):  # forget the class fsspec registered when s3fs was imported
        monkeypatch.delitem(registry._registry, protocol, raising=False)
    with pytest.raises(PipelineError, match=r"s3://b/x\.tar: reading s3:// needs .*pip install "
                                            r"'spectralkd-pipeline\[s3\]'"):
        storage.Location("s3://b/x.tar").read_range(0, 10)
