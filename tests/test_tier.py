"""Tiers: a compact cache derived from the exact one without the teacher, with every guarantee of a
cache, equal to a direct extract with the same encoding, and students that read it by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import cache_path, open_cache
from cache.verify import verify_stage
from pipeline.config import ConfigError, config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from tests.conftest import copy_upstream, tiny_tree

ENCODING = {"quantize": "step", "error": 0.05, "delta": True, "basis": True, "calibrate_rows": 200}
TIER = {"name": "small", "views": 1, "compress": ENCODING}


def _tree(**changes) -> dict:
    """The tiny config with the tier, and its spectral student reading it as a third student."""
    tree = tiny_tree(**{"tiers": [TIER], **changes})
    tree["distill"]["students"].append({**tree["distill"]["students"][1], "name": "spectral-small", "tier": "small"})
    return tree


@pytest.fixture(scope="module")
def tiered(built, tmp_path_factory, monkeypatch_module):
    """The tier built from the session's exact cache with the teacher unloadable, and a direct
    extract of one view with the tier's encoding; a student trained from each."""
    from stages import models

    _, _, recs = built
    wd = copy_upstream(recs, tmp_path_factory.mktemp("tier"))
    runner = Runner(config_from_dict(_tree(), workdir=str(wd)))
    with monkeypatch_module.context() as m:
        m.setattr(models, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher loaded")))
        tier_recs = runner.run("distill/spectral-small")
    direct_wd = copy_upstream(recs, tmp_path_factory.mktemp("direct"), ("prepare", "teacher"))
    direct = Runner(config_from_dict(tiny_tree(**{"extract.views": 1, "extract.compress": ENCODING}),
                                     workdir=str(direct_wd)))
    direct_recs = direct.run("distill/spectral")
    return runner, tier_recs, direct_recs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def test_tier_equals_a_direct_extract_with_its_encoding(tiered):
    _, tier_recs, direct_recs = tiered
    tier, direct = open_cache(tier_recs["tier/small"]), open_cache(direct_recs["extract"])
    assert tier.spec.layers == direct.spec.layers  # the same calibrated tables
    assert tier.blocks == direct.blocks and tier.spec.rows == direct.spec.rows
    assert tier.manifest.drop(["url"]).equals(direct.manifest.drop(["url"]))
    for name in tier.spec.arrays():
        np.testing.assert_array_equal(tier.read(name, 0, tier.spec.rows), direct.read(name, 0, direct.spec.rows))
    assert tier.attrs["derived_from"]["fingerprint"] == open_cache(tier_recs["extract"]).attrs["fingerprint"]
    import spectralkd  # the public API opens it by name, checked as the CLI checks it

    assert str(spectralkd.open_cache(tiered[0].cfg, tier="small").path) == str(tier.path)
    with pytest.raises(ConfigError, match="'large' is not in tiers"):
        spectralkd.open_cache(tiered[0].cfg, tier="large")


def test_a_tier_student_equals_the_direct_caches_student(tiered, built):
    """Bit for bit; and not the exact cache's student (the test could fail)."""
    _, tier_recs, direct_recs = tiered

    def weights(rec):
        return torch.load(Path(rec.path) / "final.pt", weights_only=True)["state_dict"]

    a, b = weights(tier_recs["distill/spectral-small"]), weights(direct_recs["distill/spectral"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    exact = built[1].run("distill/spectral")["distill/spectral"]
    assert not all(torch.equal(a[k], v) for k, v in weights(exact).items())


def test_a_tier_is_a_node_with_its_own_fingerprint_and_checks(tiered):
    runner, tier_recs, _ = tiered
    rec = tier_recs["tier/small"]
    assert rec.path.parent.name == "tier" and rec.lock["fingerprint"] != tier_recs["extract"].lock["fingerprint"]
    assert tier_recs["distill/spectral-small"].lock["inputs"]["upstream"] == {"tier/small": rec.lock["fingerprint"]}
    states = {s.stage: s.status for s in runner.status()}
    assert states["tier/small"] == "up to date"
    assert verify_stage(runner, "tier/small") == []
    shard = next(p for p in sorted((cache_path(rec) / "spectra" / "blocks.0").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:-3])  # a truncated shard: refused by name, a rerun restores it
    assert any(str(shard) in p for p in verify_stage(runner, "tier/small"))
    with pytest.raises(PipelineError, match="shard"):
        open_cache(rec).read_layer("spectra", 0, 0, 10)


def test_tier_changes_make_it_and_its_students_stale_only():
    base = Runner(config_from_dict(_tree()))
    other = Runner(config_from_dict(_tree(**{"tiers[0].compress.error": 0.02})))
    for node in ("extract", "distill/spectral"):
        assert base.fingerprint_of(node) == other.fingerprint_of(node)
    for node in ("tier/small", "distill/spectral-small"):
        assert base.fingerprint_of(node)[0] != other.fingerprint_of(node)[0]
    assert base.plan("distill/spectral-small") == ["prepare", "teacher", "extract", "tier/small",
                                                   "distill/spectral-small", "distill"]


def test_tier_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"tiers\[0\] \(small\): views 5"):
        config_from_dict(tiny_tree(tiers=[{**TIER, "views": 5}]))
    tree = _tree()
    tree["distill"]["students"][2]["tier"] = "missing"
    with pytest.raises(ConfigError, match=r"tier 'missing' is not in tiers \(small\)"):
        config_from_dict(tree)
    with pytest.raises(ConfigError, match="appears twice"):
        config_from_dict(tiny_tree(tiers=[TIER, TIER]))
