"""Many students: students as graph nodes, per-output locks, concurrent runs, --jobs, sweeps, Dask."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.graph import Runner
from pipeline.nodes import student_node
from pipeline.locking import held_by
from stages.groups import paired_difference, t975
from tests.conftest import ROOT, TINY, cli, copy_upstream, run_main, tiny_tree, write_config


def _metrics(runner: Runner, name: str) -> list[dict]:
    return pq.read_table(runner.student_dir(name) / "metrics.parquet").to_pylist()


def _popen(*args, env=None) -> subprocess.Popen:
    import os

    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_students_train_at_once_and_one_student_is_built_once(built, tmp_path, capsys):
    import os
    import signal

    cfg, runner, recs = built
    tree = tiny_tree(**{"distill.defaults.epochs": 3})
    wd = copy_upstream(recs, tmp_path / "w")
    conf = write_config(tmp_path / "p.yaml", tree)
    common = ["-c", str(conf), "--workdir", str(wd)]
    r2 = Runner(config_from_dict(tree, workdir=str(wd)))
    out = r2.out_dir(student_node("spectral"))
    # another run building a student: status shows it running with its holder, a second run of the
    # same student fails naming it (or waits with --wait)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys,time; sys.path.insert(0, %r)\n"
         "from pipeline.locking import OutputLock\n"
         "with OutputLock(%r, 'run distill/spectral'):\n    print('locked', flush=True); time.sleep(120)"
         % (str(ROOT), str(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        running = r2.state("distill/spectral")
        assert running.status == "running" and re.match(rf"pid {holder.pid} on .*\(run distill/spectral\)",
                                                        running.reasons[0]), running
        assert held_by(out)["pid"] == holder.pid
        dup = run_main(capsys, "run", "distill", "--student", "spectral", *common)
        assert dup.returncode == 2
        assert re.search(rf"error: .*spectral-\w+: pid {holder.pid} on .*\(run distill/spectral\) is building it",
                         dup.stderr), dup.stderr
        assert not (out / "final.pt").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # two processes, two students, one workdir: both train at once
    a = _popen("run", "distill", "--student", "none", *common)
    b = _popen("run", "distill/spectral", *common)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, [o[1][-1500:] for o in outs]
    assert r2.state("distill/none").status == r2.state("distill/spectral").status == "up to date"
    assert r2.state("distill").status == "up to date"  # whichever finished last wrote the summary
    summary = pq.read_table(r2.record("distill").path / "summary.parquet").to_pylist()
    assert {r["model"] for r in summary} >= {"none", "spectral"}
    assert [m["epoch"] for m in _metrics(r2, "spectral")] == [0, 1, 2]
    st = run_main(capsys, "status", *common)
    assert re.search(r"^distill/none +up to date", st.stdout, re.M) and re.search(r"^distill +up to date", st.stdout,
                                                                                 re.M), st.stdout
    assert run_main(capsys, "verify", "distill/spectral", *common).returncode == 0


def test_force_one_student_through_the_graph(built, tmp_path, capsys):
    from pipeline.__main__ import main

    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    conf = write_config(tmp_path / "p.yaml", TINY)
    common = ["-c", str(conf), "--workdir", str(wd)]
    assert main(["run", "distill", *common]) == 0
    r = Runner(config_from_dict(TINY, workdir=str(wd)))
    mtime = {n: (r.student_dir(n) / "final.pt").stat().st_mtime_ns for n in ("none", "spectral")}
    assert main(["run", "distill", "--force", "--student", "spectral", *common]) == 0
    assert (r.student_dir("none") / "final.pt").stat().st_mtime_ns == mtime["none"]
    assert (r.student_dir("spectral") / "final.pt").stat().st_mtime_ns != mtime["spectral"]
    # a damaged student is named by verify and status, and rebuilt by the next run
    (r.student_dir("none") / "metrics.parquet").unlink()
    capsys.readouterr()
    assert main(["verify", "distill/none", *common]) == 1
    assert "metrics.parquet is missing" in capsys.readouterr().out
    assert main(["status", *common]) == 0
    st = capsys.readouterr().out
    assert re.search(r"^distill/none +stale .*metrics.parquet is missing", st, re.M), st
    assert re.search(r"^distill +stale .*student none", st, re.M), st
    assert main(["run", "distill", *common]) == 0
    assert Runner(config_from_dict(TINY, workdir=str(wd))).state("distill").status == "up to date"
    assert main(["run", "distill/nobody", *common]) == 2
    assert "'nobody' is not a student" in capsys.readouterr().err


def _sweep_tree(**changes) -> dict:
    tree = tiny_tree(**changes)
    base = dict(TINY["distill"]["students"][1], name="sw")
    tree["distill"]["students"] = []
    tree["distill"]["sweep"] = [{"base": base, "grid": {"loss.w_fft": [0.05, 0.4], "seed": [0, 1]},
                                 "reference": {"loss.w_fft": 0.05}}]
    return tree


def test_sweep_expands_trains_with_jobs_and_summarizes_groups(built, tmp_path, capsys):
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    tree = _sweep_tree()
    conf = write_config(tmp_path / "p.yaml", tree)
    names = [s.name for s in config_from_dict(tree, workdir=str(wd)).distill.students]
    assert names == ["sw-w_fft=0.05-seed=0", "sw-w_fft=0.05-seed=1", "sw-w_fft=0.4-seed=0", "sw-w_fft=0.4-seed=1"]
    res = run_main(capsys, "run", "distill", "--jobs", "2", "-c", str(conf), "--workdir", str(wd))
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"^\[sw-w_fft=0.4-seed=1\] ", res.stdout, re.M)  # each process's lines carry its name
    r = Runner(config_from_dict(tree, workdir=str(wd)))
    top1 = {n: r.record(student_node(n)).summary["val_top1"] for n in names}
    assert len({str(r.record(student_node(n)).lock["inputs"]["upstream"]) for n in names}) == 1  # one cache
    md = (r.record("distill").path / "summary.md").read_text()
    # every run, and the groups: mean +- sd per value, the paired difference to the reference
    lo = [top1["sw-w_fft=0.05-seed=0"], top1["sw-w_fft=0.05-seed=1"]]
    hi = [top1["sw-w_fft=0.4-seed=0"], top1["sw-w_fft=0.4-seed=1"]]
    assert f"| sw-w_fft=0.05 | 2 | {np.mean(lo):.2f} +- {np.std(lo, ddof=1):.2f} | - | - |" in md, md
    d = np.array(hi) - np.array(lo)
    half = t975(1) * d.std(ddof=1) / math.sqrt(2)
    want = f"| sw-w_fft=0.4 | 2 | {np.mean(hi):.2f} +- {np.std(hi, ddof=1):.2f} | {d.mean():+.2f} " \
           f"[{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] (n=2) | sw-w_fft=0.05 |"
    assert want in md, md
    rows = pq.read_table(r.record("distill").path / "summary.parquet").to_pylist()
    assert {(x["model"], x["group"], x["seed"]) for x in rows if x["kind"] != "teacher"} >= {
        ("sw-w_fft=0.4-seed=1", "sw-w_fft=0.4", 1), ("sw-w_fft=0.05-seed=0", "sw-w_fft=0.05", 0)}
    # --force through the fan-out retrains exactly the chosen student
    mtime = {n: (r.student_dir(n) / "final.pt").stat().st_mtime_ns for n in names}
    res = run_main(capsys, "run", "distill", "--jobs", "2", "--force", "--student", "sw-w_fft=0.4-seed=1",
                   "-c", str(conf), "--workdir", str(wd))
    assert res.returncode == 0, res.stderr[-2000:]
    changed = {n for n in names if (r.student_dir(n) / "final.pt").stat().st_mtime_ns != mtime[n]}
    assert changed == {"sw-w_fft=0.4-seed=1"}


def test_paired_difference_against_numpy():
    rng = np.random.default_rng(3)
    a = {s: float(v) for s, v in enumerate(rng.normal(90, 1, 6))}
    b = {s: float(v) for s, v in enumerate(rng.normal(89, 1, 5))}  # seed 5 has no partner
    got = paired_difference(a, b)
    d = np.array([a[s] - b[s] for s in range(5)])
    assert got["n"] == 5 and got["mean"] == pytest.approx(d.mean()) and got["sd"] == pytest.approx(d.std(ddof=1))
    assert got["high"] - got["mean"] == pytest.approx(2.7764451 * d.std(ddof=1) / math.sqrt(5), rel=1e-6)


def test_dask_students_equal_serial_runs(built, tmp_path):
    from distributed import LocalCluster

    cfg, runner, recs = built
    tree = tiny_tree(**{"distill.defaults.epochs": 1})
    conf = write_config(tmp_path / "p.yaml", tree)
    serial, fanned = copy_upstream(recs, tmp_path / "serial"), copy_upstream(recs, tmp_path / "dask")
    threads = torch.get_num_threads()  # one thread, as each Dask task's process runs
    torch.set_num_threads(1)
    try:
        Runner(config_from_dict(tree, workdir=str(serial))).run("distill")
    finally:
        torch.set_num_threads(threads)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        res = cli("run", "distill", "-c", str(conf), "--workdir", str(fanned), "--set",
                  f"distill.scheduler={cluster.scheduler_address}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "to the Dask scheduler" in res.stderr
    a = Runner(config_from_dict(tree, workdir=str(serial)))
    b = Runner(config_from_dict(tree, workdir=str(fanned)))
    for name in ("none", "spectral"):
        ma, mb = _metrics(a, name), _metrics(b, name)
        for ra, rb in zip(ma, mb, strict=True):
            assert set(ra) == set(rb)
            for k in ("loss_total", "val_top1", "val_loss", *[k for k in ra if k.startswith("loss_")]):
                assert ra[k] == rb[k], (name, ra["epoch"], k)
    assert b.state("distill").status == "up to date"


def test_sweep_config_errors(tmp_path):
    from pipeline.config import ConfigError

    base = dict(TINY["distill"]["students"][1], name="sw")
    cases = [
        ([{"base": base, "grid": {"seed": [0, 1]}}, {"base": dict(base, lr=0.1), "grid": {"seed": [0]}}],
         r"sweep\[1\] makes a student named 'sw-seed=0', but another student has that name"),
        ([{"base": base, "grid": {"loss.w_fft": [0.1], "seed": [0]}, "reference": {"loss.w_fft": 0.2}}],
         r"reference: loss.w_fft=0.2 is not a value of the grid"),
        ([{"base": base, "grid": {"lossx.w_fft": [0.1]}}], r"'lossx.w_fft' is not a student field"),
        ([{"base": base, "grid": {"loss.w_fft": [-1.0]}}], r"distill.students\[2\].loss.w_fft"),
    ]
    for sweep, msg in cases:
        tree = tiny_tree()
        tree["distill"]["sweep"] = sweep
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(tree, workdir=str(tmp_path))
    # a dumped config (its sweep students already listed) loads to the same students
    tree = tiny_tree()
    tree["distill"]["sweep"] = [{"base": base, "grid": {"seed": [0, 1]}}]
    cfg = config_from_dict(tree, workdir=str(tmp_path))
    again = config_from_dict(cfg.model_dump(mode="json"), workdir=str(tmp_path))
    assert [s.name for s in again.distill.students] == [s.name for s in cfg.distill.students] == [
        "none", "spectral", "sw-seed=0", "sw-seed=1"]
