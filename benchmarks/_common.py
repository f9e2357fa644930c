"""Helpers shared by the benchmarks: a default pipeline in a scratch workdir, timing, machine line."""

from __future__ import annotations

import os
import platform
import statistics
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
