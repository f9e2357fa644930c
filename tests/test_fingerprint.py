"""Fingerprints: stable across processes, changed by every decisive field, staleness flows downstream."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import config_from_dict
from pipeline.fingerprint import diff
from pipeline.graph import STAGES, Runner, downstream_of
from tests.conftest import ROOT, TINY, tiny_tree


def fps(tree) -> dict[str, str]:
    r = Runner(config_from_dict(tree, workdir="/nonexistent"))
    return {s: r.fingerprint_of(s)[0] for s in STAGES}


def test_stable_within_and_across_processes():
    a = fps(TINY)
    assert a == fps(TINY)
    code = (
        "import json,sys; sys.path.insert(0, %r)\n"
        "from tests.conftest import TINY\n"
        "from pipeline.config import config_from_dict\n"
        "from pipeline.graph import Runner, STAGES\n"
        "r = Runner(config_from_dict(TINY, workdir='/nonexistent'))\n"
        "print(json.dumps({s: r.fingerprint_of(s)[0] for s in STAGES}))" % str(ROOT)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == a


# (change, first stage it must invalidate)
DECISIVE = [
    ({"seed": 1}, "prepare"),
    ({"data.image_size": 24}, "prepare"),
    ({"data.val_fraction": 0.3}, "prepare"),
    ({"data.samples_per_shard": 100}, "prepare"),
    ({"data.mean": [0.4, 0.5, 0.5]}, "teacher"),
    ({"data.augment.scale": [0.5, 1.0]}, "teacher"),
    ({"data.augment.hflip": 0.0}, "teacher"),
    ({"teacher.model": "vit_tiny_patch16_224"}, "teacher"),
    ({"teacher.kwargs.embed_dim": 48}, "teacher"),
    ({"teacher.fit.epochs": 2}, "teacher"),
    ({"teacher.fit.lr": 0.001}, "teacher"),
    ({"teacher.pretrained": True}, "teacher"),
    ({"extract.layers": [0, 1]}, "extract"),
    ({"extract.views": 3}, "extract"),
    ({"extract.store": ["logits", "spectra", "features"]}, "extract"),
    ({"extract.rows_per_shard": 128}, "extract"),
    ({"extract.amp": "fp16"}, "extract"),
    ({"distill.defaults.epochs": 2}, "distill"),
    ({"distill.students[1].loss.w_fft": 0.05}, "distill"),
    ({"distill.students[1].layers": [[0, 0]]}, "distill"),
    ({"analyze.radial_bands": 5}, "analyze"),
]


@pytest.mark.parametrize("change,first", DECISIVE, ids=[next(iter(c)) for c, _ in DECISIVE])
def test_every_decisive_field_changes_its_stage_and_downstream(change, first):
    base, new = fps(TINY), fps(tiny_tree(**change))
    i = STAGES.index(first)
    for s in STAGES[:i]:
        assert base[s] == new[s], f"{s} changed by {change}"
    for s in STAGES[i:]:
        assert base[s] != new[s], f"{s} not changed by {change}"


@pytest.mark.parametrize("change", [{"extract.num_workers": 3}, {"teacher.device": "cpu"},
                                    {"analyze.workers": 4}, {"distill.defaults.num_workers": 2},
                                    {"distill.defaults.keep_targets_mb": 0}])
def test_operational_fields_do_not_invalidate(change):
    assert fps(TINY) == fps(tiny_tree(**change))


def test_downstream_order():
    assert downstream_of("teacher") == ["extract", "distill", "analyze"]


def test_status_names_changed_fields_and_propagates(tmp_path):
    wd = str(tmp_path / "w")
    tree = tiny_tree(**{"teacher.fit": None})
    r = Runner(config_from_dict(tree, workdir=wd))
    r.run("teacher")
    assert [s.status for s in r.status()][:2] == ["up to date", "up to date"]
    r2 = Runner(config_from_dict(tree, ["teacher.kwargs.embed_dim=48"], workdir=wd))
    states = {s.stage: s for s in r2.status()}
    assert states["prepare"].status == "up to date"
    assert states["teacher"].status == "stale"
    assert "params.teacher.kwargs.embed_dim" in states["teacher"].reasons
    for s in ("extract", "distill", "analyze"):
        assert states[s].status in ("stale", "missing")
        assert states[s].fingerprint != {x.stage: x for x in r.status()}[s].fingerprint


def test_refit_teacher_makes_the_cache_stale(tmp_path):
    wd = str(tmp_path / "w")
    tree = tiny_tree(**{"teacher.fit": None})
    r = Runner(config_from_dict(tree, workdir=wd))
    r.run("teacher")
    fp_before = r.fingerprint_of("extract")[0]
    # same config, new weights (as a refit gives): the extract fingerprint must change
    import json
    from pathlib import Path

    lock = Path(r.record("teacher").path) / "lock.json"
    data = json.loads(lock.read_text())
    data["summary"]["weights_sha256"] = "0" * 64
    lock.write_text(json.dumps(data))
    r2 = Runner(config_from_dict(tree, workdir=wd))
    assert r2.fingerprint_of("teacher")[0] == r.fingerprint_of("teacher")[0]
    assert r2.fingerprint_of("extract")[0] != fp_before
    assert "identity.teacher_weights_sha256" in diff(r.inputs("extract"), r2.inputs("extract"))


def test_diff_names_the_changed_leaves():
    assert diff({"a": {}}, {"a": {"b": 1}}) == ["a.b"]
    assert diff({"l": []}, {"l": [1]}) == ["l[0]"]
    assert diff({"x": 1, "y": {"z": [2, 3]}}, {"x": 2, "y": {"z": [2, 4]}}) == ["x", "y.z[1]"]
    assert diff({"x": 1}, {"x": 1}) == []
