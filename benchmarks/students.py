"""Many students from one cache: serial, --jobs 2, and a Dask LocalCluster of 2 one-thread workers.

    python benchmarks/students.py [--workdir DIR] [--epochs 10]

Builds the default pipeline up to extract once (teacher not fitted: step times and agreement do
not need a fitted one), then trains the same 4 students (the default three and a second seed of
the spectral one) three ways, each in a fresh workdir reading that extract through
``--upstream-workdir``:

* serial: ``run distill``, one process, all cores;
* ``run distill --jobs 2``: 2 processes at a time, each pinned to one core with one thread;
* ``distill.scheduler`` = a LocalCluster of 2 workers x 1 thread: one task per student.

It prints the wall time of each (distill only; extract is shared) and the ratios to serial (target
<= 0.85 on 2 cores), then checks that the two one-thread ways give bit-identical metrics (same
seed, same thread count) and prints how far the serial two-thread run's top-1 is from them.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, machine


ENV = dict(os.environ, PYTHONPATH=str(ROOT))  # taken before a LocalCluster adds Dask's worker settings


def pipeline(*args: str) -> float:
    """Run ``python -m pipeline ARGS``; its wall time (fails loudly)."""
    env = ENV
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"python -m pipeline {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    for line in r.stderr.splitlines():
        if "finished" in line and "distill:" in line:
            print("   ", line.split(" INFO ")[-1])
    return time.perf_counter() - t


def config(path: Path, epochs: int) -> Path:
    tree = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    tree["teacher"]["fit"] = None
    tree["distill"]["defaults"]["epochs"] = epochs
    spectral = next(s for s in tree["distill"]["students"] if s["loss"]["kind"] == "spectral")
    tree["distill"]["students"].append(dict(copy.deepcopy(spectral), name=spectral["name"] + "-seed1", seed=1))
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def metrics(workdir: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    return {p.parent.name.rsplit("-", 1)[0]: pq.read_table(p).to_pylist()
            for p in sorted(workdir.glob("distill/students/*/metrics.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-students-"))
    where = machine()  # before a LocalCluster changes this process's thread settings
    conf = config(root / "pipeline.yaml", args.epochs)
    base = root / "base"
    pipeline("run", "extract", "-c", str(conf), "--workdir", str(base))
    ways = {}
    common = ["-c", str(conf), "--upstream-workdir", str(base)]
    ways["serial"] = pipeline("run", "distill", "--workdir", str(root / "serial"), *common)
    ways["--jobs 2"] = pipeline("run", "distill", "--jobs", "2", "--workdir", str(root / "jobs"), *common)
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        ways["dask 2x1"] = pipeline("run", "distill", "--workdir", str(root / "dask"), "--set",
                                    f"distill.scheduler={cluster.scheduler_address}", *common)
    print(f"machine: {where}")
    print(f"4 students x {args.epochs} epochs (default config, teacher not fitted), distill wall time:")
    for k, v in ways.items():
        print(f"  {k:<10} {v:7.1f} s   / serial {v / ways['serial']:.3f}   (target <= 0.85 for the parallel ways)")
    m = {k: metrics(root / d) for k, d in [("serial", "serial"), ("jobs", "jobs"), ("dask", "dask")]}
    assert set(m["jobs"]) == set(m["dask"]) == set(m["serial"]) and len(m["jobs"]) == 4, {k: list(v)
                                                                                          for k, v in m.items()}
    keys = ("loss_total", "loss_spectral", "val_top1", "val_loss")
    same = all(a[k] == b[k] for n in m["jobs"] for a, b in zip(m["jobs"][n], m["dask"][n], strict=True) for k in keys)
    print(f"--jobs 2 and dask (1 thread each): metrics bit-identical for every student and epoch: {same}")
    for n in sorted(m["jobs"]):
        a, b = m["serial"][n][-1]["val_top1"], m["jobs"][n][-1]["val_top1"]
        print(f"  {n:<22} final val top-1: serial (2 threads) {a:.2f}, one thread {b:.2f}")
    if not same:
        raise SystemExit("the one-thread ways disagree")


if __name__ == "__main__":
    main()
