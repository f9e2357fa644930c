"""The pipeline from Python: open a checked cache, run stages, read their status."""

from __future__ import annotations

from pathlib import Path

from cache.reader import CACHE_DIR, Cache
from pipeline.storage import is_url
from cache.reader import open_cache as open_extract_record
from pipeline.config import DEFAULT_CONFIG, PipelineConfig, config_from_dict, load_config
from pipeline.errors import PipelineError
from pipeline.graph import Record, Runner, State
from pipeline.nodes import tier_node


def load(config: str | Path | dict | PipelineConfig | None = None, workdir: str | None = None,
         overrides: list[str] | None = None) -> PipelineConfig:
    """A validated config from a pipeline file (default ``./pipeline.yaml``), a dict as the YAML
    would load, or a config already made; ``overrides`` as ``--set`` takes them."""
    if isinstance(config, PipelineConfig):
        if not overrides and workdir is None:
            return config
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        return config_from_dict(config, overrides, workdir)
    return load_config(config or DEFAULT_CONFIG, overrides, workdir)


def open_cache(source: str | Path | dict | PipelineConfig | None = None, workdir: str | None = None,
               overrides: list[str] | None = None, tier: str | None = None) -> Cache:
    """The cache, with every integrity check the CLI makes.

    ``source`` is a cache folder (``.../cache.zarr``) or an extract output folder holding one, or a
    config (file, dict or :class:`~pipeline.config.PipelineConfig`, with ``workdir``/``overrides``):
    then the cache of its up-to-date extract, refused unless it matches the config's fingerprint and
    the teacher's current weights.  A store URL (``s3://bucket/caches/<fp>/cache.zarr``) is opened
    there (endpoint and credentials from the environment, e.g. ``AWS_ENDPOINT_URL``).  With a config,
    ``tier`` names one of its ``tiers``: that derived cache, up to date, instead of the extract's."""
    if isinstance(source, str) and is_url(source):
        return Cache(source)
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        path = Path(source)
        return Cache(path / CACHE_DIR if (path / CACHE_DIR).is_dir() else path)
    cfg = load(source, workdir, overrides)
    runner = Runner(cfg)
    node = "extract" if tier is None else tier_node(cfg.tier(tier).name)
    rec = runner.record(node)
    if rec is None:
        raise PipelineError(f"{node}: no up-to-date cache for this config under {runner.out_dir(node)} "
                            f"({'; '.join(runner.state(node).reasons)}); run `spectralkd run {node}`")
    cache = open_extract_record(rec)
    teacher = runner.record("teacher")
    want = teacher.summary.get("weights_sha256") if teacher else None
    got = cache.attrs.get("teacher", {}).get("weights_sha256")
    if want and got != want:
        raise PipelineError(f"{cache.path}: made by teacher weights {str(got)[:12]}, the teacher is now {want[:12]}; "
                            f"rerun extract")
    return cache


def run(config: str | Path | dict | PipelineConfig | None = None, stage: str = "all", workdir: str | None = None,
        overrides: list[str] | None = None, force: bool = False,
        students: list[str] | None = None) -> dict[str, Record]:
    """``spectralkd run STAGE`` in this process: builds ``stage`` ('all', a stage or 'distill/<name>')
    after whatever it needs; returns the records of every node it visited (``Record.summary`` is
    what the CLI logs)."""
    cfg = load(config, workdir, overrides)
    runner = Runner(cfg, {"students": students})
    if force or any(runner.state(n).status != "up to date" for n in runner.plan(stage)):
        runner.check_models()
    return runner.run(stage, force=force)


def status(config: str | Path | dict | PipelineConfig | None = None, workdir: str | None = None,
           overrides: list[str] | None = None) -> list[State]:
    """``spectralkd status``: each stage and student as ``State(stage, status, fingerprint, reasons)``."""
    return Runner(load(config, workdir, overrides)).status()


def layer_pairs(config: PipelineConfig, student: str) -> tuple[tuple[int, int], ...]:
    """Student ``student``'s (student layer, teacher layer) pairs, negative indices resolved against
    both models (timm's ``forward_intermediates`` numbering, as the pipeline's students use them)."""
    from stages.models import plan_models

    config.student(student)  # an unknown name is named
    return plan_models(config).pairs[student]
