"""Fingerprints: stable across processes, changed by every decisive field, staleness flows downstream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    ({"distill.students[1].pairs": [[0, 0]]}, "distill"),
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


# ----------------------------------------------------------------------------- every leaf of the schema

# a sweep in the base config, so that its fields are leaves to change too
SWEEP = {"base": {"name": "sw", "model": "deit_tiny_patch16_224", "loss": {"kind": "none"},
                  "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}},
         "grid": {"seed": [0, 1]}, "reference": {"seed": 0}}

# a tier in the base config, so that its fields are leaves to change too
TIER = {"name": "t"}

# new valid values for the leaves the generic rule (numbers, booleans, choices) cannot make
VALUES = {
    "workdir": "elsewhere",
    "upstream_workdirs": ["/somewhere/shared"],
    "data.root": "/data/images",
    "data.train_shards": "/data/train-{000000..000003}.tar",
    "data.val_shards": "/data/val-000000.tar",
    "data.mean": [0.4, 0.5, 0.5],
    "data.std": [0.25, 0.5, 0.5],
    "data.augment.scale": [0.5, 1.0],
    "data.augment.ratio": [0.75, 1.25],
    "data.augment.auto_augment": "rand-m9-mstd0.5-inc1",
    "data.augment.color_jitter": 0.4,
    "data.eval.crop_pct": 0.875,
    "data.storage_options": {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}},
    "extract.location": "s3://bucket/caches",
    "teacher.model": "vit_tiny_patch16_224",
    "teacher.kwargs": {**TINY["teacher"]["kwargs"], "embed_dim": 48},
    "teacher.mean": [0.4, 0.4, 0.4],
    "teacher.std": [0.3, 0.3, 0.3],
    "teacher.fit.optimizer": "sgd",
    "teacher.fit.warmup_lr": 1e-5,
    "extract.layers": [0, 1],
    "extract.store": ["logits", "spectra", "features"],
    "extract.num_workers": 1,
    "extract.compress.pool": 8,
    "distill.defaults.optimizer": "sgd",
    "distill.defaults.num_workers": 1,
    "distill.defaults.warmup_lr": 1e-5,
    "distill.defaults.views": 1,
    "distill.defaults.train_per_class": 5,
    "distill.defaults.track": ["tensorboard", "mlflow"],
    "distill.students[0].name": "renamed",
    "distill.students[0].model": "vit_tiny_patch16_224",
    "distill.students[0].kwargs": {**TINY["distill"]["students"][0]["kwargs"], "embed_dim": 24},
    "distill.students[0].pairs": [[1, 0]],
    "distill.students[0].loss": {"kind": "logits"},  # its kind; each method's fields: test_every_loss_field_...
    "distill.students[0].optimizer": "sgd",
    "distill.students[0].mode": "online",
    "distill.students[0].views": 1,
    "distill.students[0].repeated_aug": 2,
    "distill.sweep[0].base": {**SWEEP["base"], "epochs": 3},
    "distill.sweep[0].grid": {"seed": [0, 2]},
    "distill.sweep[0].reference": None,
    "distill.students[0].tier": "t",
    "tiers[0].name": "t2",
    "tiers[0].views": 1,
    "tiers[0].compress.pool": 8,
    "distill.scheduler": "tcp://127.0.0.1:8786",
    "analyze.scheduler": "tcp://127.0.0.1:8786",
    "analyze.memory_limit": "1GiB",
}
# leaves that need a file to exist: the prepare's shard list and the teacher's checkpoint are read
FILE_VALUES = ("data.source", "teacher.checkpoint")


def schema_leaves(model, prefix: str = ""):
    """(dotted path, field) of every leaf of a config model; a list of models is walked at [0], an
    optional model as the model.  A
    union of models (a loss's config, tagged by its kind) is one leaf here: each of its models'
    fields is walked by ``test_every_loss_field_changes_its_students_fingerprint``."""
    import typing

    from pydantic import BaseModel

    def bare(ann):
        return typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann

    def is_model(ann) -> bool:
        return isinstance(ann, type) and issubclass(ann, BaseModel)

    def models_in(ann) -> tuple[list, str]:
        ann = bare(ann)
        if is_model(ann):
            return [ann], ""
        args = [bare(a) for a in typing.get_args(ann)]
        if typing.get_origin(ann) is list and args and is_model(args[0]):
            return [args[0]], "[0]"
        models = [a for a in args if is_model(a)]
        return (models, "") if len(models) == 1 else ([], "")  # a model or None; a tagged union is a leaf

    seen = set()
    for name, f in model.model_fields.items():
        subs, index = models_in(f.annotation)
        leaves = [(prefix + name, f)] if not subs else [
            leaf for sub in subs for leaf in schema_leaves(sub, f"{prefix}{name}{index}.")]
        for path, leaf in leaves:
            if path not in seen:
                seen.add(path)
                yield path, leaf


def _generic_value(field, current):
    """Another valid value of a plain number, boolean or choice field, or None when there is no rule."""
    import typing

    import annotated_types as at

    if isinstance(current, bool):
        return not current
    choices = [a for a in typing.get_args(field.annotation) if isinstance(a, str)]
    if typing.get_origin(field.annotation) is typing.Literal and len(choices) > 1:
        return next(c for c in choices if c != current)
    highs = [m.le for m in field.metadata if isinstance(m, at.Le)] + [m.lt for m in field.metadata
                                                                      if isinstance(m, at.Lt)]
    hi = min(highs, default=float("inf"))
    if isinstance(current, int):
        return current + 1 if current + 1 <= hi else current - 1
    if isinstance(current, float):
        return current / 2 if current > 0 else min(0.1, hi / 2)
    if current is None and field.annotation in (int | None, typing.Optional[int]):
        return 3
    if current is None and field.annotation in (float | None, typing.Optional[float]):
        return 0.5
    return None


def _leaf_value(path: str, field, current, tmp_path):
    if path == "data.source":  # shards: files whose sizes prepare's identity reads
        for name in ("train.tar", "val.tar"):
            (tmp_path / name).write_bytes(b"x")
        return {"data.source": "shards", "data.train_shards": str(tmp_path / "train.tar"),
                "data.val_shards": str(tmp_path / "val.tar")}
    if path == "teacher.checkpoint":
        (tmp_path / "teacher.pt").write_bytes(b"weights")
        return {path: str(tmp_path / "teacher.pt")}
    value = VALUES[path] if path in VALUES else _generic_value(field, current)
    assert value is not None or path in VALUES, f"{path}: no new value for this field; add one to VALUES"
    if path in ("teacher.mean", "teacher.std"):  # they go together
        return {"teacher.mean": VALUES["teacher.mean"], "teacher.std": VALUES["teacher.std"]}
    if path.endswith(("compress.delta", "compress.basis")):  # they need the step encoding
        return {path: value, path.rsplit(".", 1)[0] + ".quantize": "step"}
    return {path: value}


def _current(tree: dict, path: str):
    import re

    cur = tree
    for part in [p for p in re.split(r"\.|\[(\d+)\]", path) if p]:
        cur = cur[int(part)] if isinstance(cur, list) else cur.get(part) if isinstance(cur, dict) else None
    return cur


def node_fingerprints(tree: dict) -> dict[str, str]:
    r = Runner(config_from_dict(tree))
    return {n: r.fingerprint_of(n)[0] for n in r.nodes()}


# The first node that reads each part of the config (the longest matching prefix wins), stated here
# independently of pipeline/graph.py: a decisive leaf must change that node's own fingerprint.  A
# later reader's fingerprint would change anyway through its upstream fingerprints, so "some node
# changed" cannot tell a field that was dropped from the stage that first uses it (data.eval dropped
# from the teacher's parameters would reuse a teacher whose best epoch was chosen on other eval views).
FIRST_READER = {
    "seed": "prepare",
    "data": "prepare",  # the source, split and shard layout
    "data.num_classes": "teacher",
    "data.mean": "teacher",
    "data.std": "teacher",
    "data.augment": "teacher",
    "data.eval": "teacher",
    "data.on_bad_sample": "teacher",
    "teacher": "teacher",
    "extract": "extract",
    "distill.defaults": "distill/none",  # TINY's first student, which sets none of the defaults itself
    "distill.students": "distill/none",
    "distill.sweep": "distill",  # the summary: grids make students, references decide comparisons
    "tiers": "tier/t",  # TIER; a renamed tier is another node, counted as a change
    "analyze": "analyze",
}


def first_reader(path: str) -> str:
    import re

    plain = re.sub(r"\[\d+\]", "", path)
    prefixes = [p for p in FIRST_READER if plain == p or plain.startswith(p + ".")]
    assert prefixes, f"{path}: no entry in FIRST_READER; say which stage first reads it"
    return FIRST_READER[max(prefixes, key=len)]


def test_every_schema_leaf_changes_a_fingerprint_unless_operational(tmp_path):
    """Each leaf of the config schema, set to another valid value, changes the fingerprint of the
    first node that reads it, and an operational one changes none: no field drops out of the
    fingerprint of a stage that reads it."""
    from pipeline.config import PipelineConfig
    from pipeline.schema import is_operational

    import copy

    def tree_with(change: dict) -> dict:
        return tiny_tree(**{"distill.sweep": [copy.deepcopy(SWEEP)], "tiers": [copy.deepcopy(TIER)],
                            "workdir": str(tmp_path / "w"), **change})

    base_tree = tree_with({})
    base_cfg = config_from_dict(base_tree).model_dump(mode="json")
    base = node_fingerprints(base_tree)
    missed, moved = [], []
    leaves = list(schema_leaves(PipelineConfig))
    assert len(leaves) > 100
    for path, field in leaves:
        change = _leaf_value(path, field, _current(base_cfg, path), tmp_path)
        got = node_fingerprints(tree_with(change))
        if is_operational(field):
            if got != base:
                moved.append(path)
            continue
        reader = first_reader(path)
        assert reader in base, f"{path}: FIRST_READER names {reader}, not a node of the test config"
        if got.get(reader) == base[reader]:
            missed.append(f"{path} ({reader})")
    assert not missed, (f"fields that do not change the fingerprint of the first node reading them (declare "
                        f"them operational, or put them in that stage's parameters): {missed}")
    assert not moved, f"operational fields that change fingerprints: {moved}"


@pytest.mark.slow
def test_operational_settings_change_no_output(built, tmp_path):
    """A student trained with loader workers 0 or 1, its targets held in memory or read every epoch,
    ends with the same weights and losses, bit for bit: operational fields decide no output."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from tests.conftest import copy_upstream

    _, _, recs = built
    outputs = []
    for i, change in enumerate([{}, {"distill.defaults.num_workers": 1},
                                {"distill.defaults.keep_targets_mb": 0, "data.decoded_cache_mb": 0}]):
        wd = copy_upstream(recs, tmp_path / f"w{i}")
        r = Runner(config_from_dict(tiny_tree(**change), workdir=str(wd)))
        rec = r.run("distill/spectral")["distill/spectral"]
        state = torch.load(Path(rec.path) / "final.pt", weights_only=True)["state_dict"]
        losses = pq.read_table(Path(rec.path) / "metrics.parquet").select(["loss_total", "loss_spectral"]).to_pylist()
        outputs.append((rec.lock["fingerprint"], state, losses))
    fp0, state0, losses0 = outputs[0]
    for fp, state, losses in outputs[1:]:
        assert fp == fp0
        assert losses == losses0
        assert state.keys() == state0.keys()
        assert all(np.array_equal(state[k].numpy(), state0[k].numpy()) for k in state0)


def test_every_loss_field_changes_its_students_fingerprint():
    """Each field of each registered loss config (the schema's union by ``loss.kind``), set to another
    valid value, changes the fingerprint of its student's node and of no other student."""
    import losses

    def fingerprints(kind: str, **fields) -> dict[str, str]:
        change = {"distill.students[1].loss": {"kind": kind, **fields}}
        if kind == "distill_token":  # a student with a distillation head
            change["distill.students[1].model"] = "deit_tiny_distilled_patch16_224"
        return node_fingerprints(tiny_tree(**change))

    missed = []
    for kind, cls in losses.REGISTRY.items():
        base = fingerprints(kind)
        for name, field in cls.Config.model_fields.items():
            if name == "kind":
                continue
            value = _generic_value(field, getattr(cls.Config(kind=kind), name))
            assert value is not None, f"{kind}.{name}: no rule makes another value"
            got = fingerprints(kind, **{name: value})
            if got["distill/spectral"] == base["distill/spectral"]:
                missed.append(f"{kind}.{name}")
            assert got["distill/none"] == base["distill/none"], f"{kind}.{name} changed another student"
    assert not missed, f"loss fields that change no fingerprint: {missed}"
