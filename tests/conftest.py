"""Shared fixtures: a tiny pipeline (digits, a 4-block CaiT, 2-block students) built once per session."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "workdir": "work",
    "seed": 0,
    "data": {"source": "digits", "image_size": 16, "samples_per_shard": 400,
             "augment": {"scale": [0.7, 1.0], "ratio": [0.8, 1.25], "hflip": 0.5}},
    "teacher": {
        "model": "cait_xxs24_224",
        "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2,
                   "depth_token_only": 1},
        "fit": {"epochs": 1, "batch_size": 64, "lr": 0.002},
    },
    "extract": {"layers": [0, -1], "views": 2, "store": ["logits", "spectra"], "batch_size": 64,
                "rows_per_shard": 256, "num_workers": 0},
    "distill": {
        "defaults": {"epochs": 1, "batch_size": 64, "lr": 0.002, "num_workers": 0, "snapshot_every": 1},
        "students": [
            {"name": "none", "model": "deit_tiny_patch16_224",
             "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
             "loss": {"kind": "none"}},
            {"name": "spectral", "model": "deit_tiny_patch16_224",
             "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
             "pairs": [[0, 0], [1, 3]], "loss": {"kind": "spectral"}},
        ],
    },
    "analyze": {"workers": 1, "memory_limit": "2GiB", "radial_bands": 3},
}


def tiny_tree(**changes) -> dict:
    """The tiny config as a dict, with dotted-path changes applied."""
    from pipeline.config import _set_path

    tree = copy.deepcopy(TINY)
    for k, v in changes.items():
        _set_path(tree, k.replace("__", "."), v)
    return tree


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def copy_upstream(recs, wd: Path, stages=("prepare", "teacher", "extract")) -> Path:
    """A fresh workdir holding copies of the given stage outputs of the session pipeline.

    Outputs record paths inside the workdir relative to themselves, so the copies read the copied shards.
    """
    import shutil

    for st in stages:
        shutil.copytree(Path(recs[st].path), wd / st / Path(recs[st].path).name)
    return wd


def assert_reproduces_cached_targets(cache, rows, logits, feats) -> None:
    """A teacher's ``logits`` and layer features ``feats`` (one per cached layer) on cache rows ``rows``
    equal the cached logits and spectra within float16 tolerance."""
    import numpy as np

    from stages.spectral import spectrum

    got = np.stack([cache.read("logits", r, r + 1)[0] for r in rows]).astype(np.float32)
    np.testing.assert_allclose(got, logits.numpy(), rtol=2e-3, atol=2e-3)
    for layer, f in zip(cache.spec.layers, feats):
        cached = np.stack([cache.read_layer("spectra", layer.index, r, r + 1)[0] for r in rows]).astype(np.float32)
        want = spectrum(f).numpy()
        np.testing.assert_allclose(cached, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env=e)


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI called in this process (as ``cli`` runs it in another): exit code, stdout and stderr
    (log records go to pytest's handler, not to stderr)."""
    from pipeline.__main__ import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out, err)


def trainer_batch(tr, rows):
    """The trainer's own batch of cache rows ``rows`` (in that order), as its loader gives it."""
    import numpy as np

    from stages.batches import CachedBatches

    b = tr.cache.block("train", 0)
    keep = np.zeros(tr.cache.spec.rows, dtype=bool)
    keep[rows] = True
    batches = CachedBatches(tr.targets, tr.dataset, (b.start, b.stop), len(rows), seed=0, shuffle=False,
                            train_mask=keep)
    x, y, got_rows, targets = next(iter(batches))
    assert got_rows.tolist() == sorted(rows.tolist())
    return x, tr.dataset.label_targets(y, got_rows, tr.cfg.data.num_classes), got_rows, targets


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """prepare -> teacher -> extract on the tiny config, once; returns (cfg, runner, records)."""
    from pipeline.config import config_from_dict
    from pipeline.graph import Runner

    wd = tmp_path_factory.mktemp("built")
    cfg = config_from_dict(TINY, workdir=str(wd / "work"))
    runner = Runner(cfg)
    recs = runner.run("extract")
    return cfg, runner, recs


@pytest.fixture(scope="session")
def s3():
    """An S3 endpoint on 127.0.0.1 (moto's standalone server, as s3fs and zarr-python test against) with
    a bucket ``test``; fake credentials come from the environment, as a real client's do.  Returns the
    config's ``data.storage_options`` for it."""
    import logging
    import socket

    pytest.importorskip("s3fs", reason="object storage needs the s3 extra (pip install -e '.[dev]')")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    fake = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    import fsspec

    fsspec.filesystem("s3", **options).mkdir("test")
    try:
        yield options
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
