"""Helpers shared by the benchmarks: a default pipeline in a scratch workdir, timing, machine line, and
the studies' pipeline runs (a config in a workdir, by subprocess or as a runner)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {dev}, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def default_runner(workdir: str, overrides: list[str] | None = None):
    from pipeline.config import load_config
    from pipeline.graph import Runner

    cfg = load_config(ROOT / "pipeline.yaml", overrides or [], workdir)
    runner = Runner(cfg)
    runner.check_models()
    return cfg, runner


def best_of(fn, repeat: int = 3) -> float:
    return min(timeit(fn) for _ in range(repeat))


def median_of(fn, repeat: int = 3) -> float:
    return statistics.median(timeit(fn) for _ in range(repeat))


def timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


OVERRIDES: list[str] = []  # a study's --set values, passed to every pipeline run it makes


def run_pipeline(conf: Path, workdir: Path, upstream: list[Path], *args: str) -> float:
    """Run ``python -m pipeline`` on ``conf`` in ``workdir``; its wall seconds (fails loudly)."""
    cmd = [sys.executable, "-m", "pipeline", "-c", str(conf), "--workdir", str(workdir)]
    for u in upstream:
        cmd += ["--upstream-workdir", str(u)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    cmd += list(args)
    print("$", " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    # the pipeline's log and progress bars (stderr) pass through; its printed summaries (stdout) do not
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd[1:])} (its error is above)")
    return time.perf_counter() - t


def write_yaml(path: Path, tree: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def runner_of(conf: Path, workdir: Path, upstream: list[Path]):
    """The config ``conf`` in ``workdir`` (with the study's overrides and ``upstream`` workdirs) and its runner."""
    from pipeline.config import load_config
    from pipeline.graph import Runner

    cfg = load_config(conf, OVERRIDES, workdir=str(workdir))
    cfg.upstream_workdirs = [str(u) for u in upstream]
    return cfg, Runner(cfg)
