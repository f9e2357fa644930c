"""Config validation: one clear line naming the key path, the value and what is allowed."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.graph import Runner
from tests.conftest import ROOT, TINY, cli, tiny_tree, write_config


def err(tree, overrides=None, models=False) -> str:
    with pytest.raises(ConfigError) as e:
        cfg = config_from_dict(tree, overrides)
        if models:
            Runner(cfg).check_models()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_default_pipeline_yaml_is_valid():
    cfg = load_config(ROOT / "pipeline.yaml")
    Runner(cfg).check_models()
    assert cfg.data.source == "digits"
    assert {s.loss.kind for s in cfg.distill.students} == {"none", "logits", "spectral"}


def test_unknown_key_names_path_and_allowed_keys():
    msg = err(tiny_tree(**{"teacher.fitt": 3}))
    assert msg.startswith("teacher.fitt: unknown key")
    assert "pretrained" in msg and "checkpoint" in msg


def test_unknown_key_in_student_list():
    tree = tiny_tree()
    tree["distill"]["students"][1]["lossx"] = 1
    assert err(tree).startswith("distill.students[1].lossx: unknown key")


def test_wrong_type_names_value():
    msg = err(tiny_tree(**{"extract.views": "many"}))
    assert msg.startswith("extract.views: 'many'") and "integer" in msg


def test_out_of_range_layer():
    tree = tiny_tree(**{"extract.layers": [0, 1, 30]})
    msg = err(tree, models=True)
    assert msg == "extract.layers[2]: 30 is out of range for cait_xxs24_224 (-4..3)"


def test_student_layer_not_cached_fails_before_work():
    tree = tiny_tree(**{"extract.layers": [0]})
    msg = err(tree, models=True)
    assert msg.startswith("distill.students[1].pairs[1][1]: teacher layer 3 is not in the cache")


def test_unknown_model():
    msg = err(tiny_tree(**{"teacher.model": "no_such_vit"}), models=True)
    assert msg.startswith("teacher.model: 'no_such_vit' is not a timm model")


def test_set_overrides_apply_and_validate():
    cfg = config_from_dict(TINY, ["teacher.fit.epochs=7", "distill.students[0].epochs=3", "extract.layers=[0,1]"])
    assert cfg.teacher.fit.epochs == 7
    assert cfg.distill.students[0].epochs == 3
    assert cfg.extract.layers == [0, 1]
    assert err(TINY, ["teacher.fit.epochs=-1"]).startswith("teacher.fit.epochs: -1")


def test_cli_reports_one_line_and_exit_2(tmp_path):
    p = write_config(tmp_path / "bad.yaml", tiny_tree(**{"extract.layers": [0, 9]}))
    r = cli("run", "extract", "-c", str(p), "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert lines == ["error: extract.layers[1]: 9 is out of range for cait_xxs24_224 (-4..3)"]
    assert not (tmp_path / "w" / "prepare").exists()  # failed before any work


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("data:\n  source: digits\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"p.yaml line \d+: not valid YAML"):
        load_config(p)


# random invalid configs: always a one-line ConfigError, never another exception
_values = st.one_of(st.integers(-5, 50), st.text(max_size=6), st.none(), st.booleans(),
                    st.lists(st.integers(-40, 40), max_size=4), st.floats(allow_nan=False, width=32),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_paths = st.sampled_from([
    "data.source", "data.image_size", "data.augment.scale", "data.val_fraction", "teacher.model", "teacher.fit",
    "teacher.fit.epochs", "teacher.kwargs", "extract.layers", "extract.views", "extract.store",
    "extract.rows_per_shard", "distill.students", "distill.students[0].pairs", "distill.students[1].loss.kind",
    "distill.defaults.lr", "analyze.workers", "analyze.scheduler", "seed", "bogus", "teacher.bogus",
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_paths, _values)
@example("teacher.fit", {"\n": 0})  # an odd key: the message names it on one line
def test_random_configs_never_traceback(path, value):
    try:
        tree = tiny_tree(**{path: value})
    except ConfigError:
        return
    try:
        cfg = config_from_dict(tree)
        Runner(cfg).check_models()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and ":" in msg


def test_yaml_roundtrip_of_tiny():
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(TINY))).model_dump() == config_from_dict(TINY).model_dump()


def test_common_options_mean_the_same_before_or_after_the_command():
    from pipeline.__main__ import parse_args

    a = parse_args(["-c", "X.yaml", "--set", "a=1", "--upstream-workdir", "u", "run", "all", "--set", "b=2"])
    assert (a.config, a.overrides, a.upstream_workdirs) == ("X.yaml", ["a=1", "b=2"], ["u"])
    b = parse_args(["run", "all", "-c", "X.yaml", "--workdir", "w", "--debug"])
    assert (b.config, b.workdir, b.debug, b.overrides) == ("X.yaml", "w", True, [])
    c = parse_args(["status"])
    assert (c.config, c.workdir, c.upstream_workdirs, c.overrides, c.debug) == (None, None, None, [], False)
    assert not any(k.endswith("_after_command") for k in vars(a))


def test_loss_kinds_that_need_layers_or_cached_spectra():
    with pytest.raises(ConfigError, match="'spectral_only' needs pairs"):
        config_from_dict(tiny_tree(**{"distill.students[0].loss.kind": "spectral_only"}))
    cfg = config_from_dict(tiny_tree(**{"distill.students[0].loss.kind": "hard"}))  # hard: layers optional
    assert cfg.student("none").loss.kind == "hard"
    with pytest.raises(ConfigError, match=r"students\[1\] \(spectral\) reads teacher layers \(hard\) but extract"):
        config_from_dict(tiny_tree(**{"distill.students[1].loss.kind": "hard", "extract.store": ["logits"]}))
    with pytest.raises(ConfigError, match="loss.kind"):
        config_from_dict(tiny_tree(**{"distill.students[0].loss.kind": "soft"}))
