"""Interrupts and lost work: Ctrl-C and SIGTERM stop fanned-out students, the teacher fit resumes,
unreadable checkpoints are set aside, a non-finite teacher fit stops its stage."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict
from pipeline.errors import PipelineError
from pipeline.graph import Runner
from pipeline.nodes import student_node
from tests.conftest import ROOT, TINY, copy_upstream, tiny_tree, write_config


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _popen(args: list[str], own_group: bool = False) -> subprocess.Popen:
    """``python -m pipeline ARGS`` with Ctrl-C's default action (a test runner may ignore SIGINT);
    ``own_group``: in a process group of its own, so that a signal to the group reaches it and its
    students, as a Ctrl-C at the terminal does."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            start_new_session=own_group)


def _wait_for(p: subprocess.Popen, found, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not found():
        time.sleep(0.02)
    assert p.poll() is None, f"the run ended before it could be interrupted: {p.communicate()[1][-2000:]}"
    assert found(), "timed out waiting for the run to get going"


def _processes_naming(text: str) -> list[str]:
    """The command lines of the live processes whose arguments contain ``text``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                argv = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in argv:
                found.append(argv.replace(b"\0", b" ").decode(errors="replace"))
    return found


# ----------------------------------------------------------------------------- case 11: --jobs 2


def _three_students(tmp_path: Path, recs) -> tuple[Path, list[str]]:
    students = [*TINY["distill"]["students"], dict(TINY["distill"]["students"][0], name="third", seed=1)]
    tree = tiny_tree(**{"distill.students": students, "distill.defaults.epochs": 50})
    wd = copy_upstream(recs, tmp_path / "w")
    return wd, ["run", "distill", "--jobs", "2", "-c", str(write_config(tmp_path / "p.yaml", tree)),
                "--workdir", str(wd)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_stops_jobs_and_starts_no_new_student(built, tmp_path, how):
    cfg, runner, recs = built
    wd, args = _three_students(tmp_path, recs)
    students = wd / "distill" / "students"
    p = _popen(args, own_group=how == "ctrl-c")
    try:
        if how == "ctrl-c":  # the terminal's Ctrl-C: SIGINT to the parent and both students
            _wait_for(p, lambda: len(list(students.glob("*/ckpt.pt"))) >= 1)
            t0 = time.time()
            os.killpg(p.pid, signal.SIGINT)
        else:  # SIGTERM to the parent alone (kill, a batch system's time limit)
            _wait_for(p, lambda: len(list(students.glob("*-*/"))) >= 2)
            t0 = time.time()
            p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=60)[1]
        took = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL) if how == "ctrl-c" else p.kill()
            p.wait()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: completed work is kept; rerun to resume" in err
    assert took < 45, f"the run took {took:.1f}s to stop"  # its students had 50 epochs to go
    assert _processes_naming(str(wd)) == []  # no student left training
    assert not list(students.glob("third-*")), "the third student started after the interrupt"
    assert not list(students.glob("*/lock.json"))  # the stopped students are not recorded done
    if how == "ctrl-c":  # resumable: the last finished epoch's checkpoint is kept
        assert list(students.glob("*/ckpt.pt"))


def test_dask_stop_ends_the_running_task_process(tmp_path, monkeypatch):
    """run_dask, interrupted: no new task is submitted and the running task's process is stopped."""
    import distributed
    from distributed import LocalCluster

    from pipeline import fanout

    started = tmp_path / "started"
    sleeper = [sys.executable, "-c", "import os, sys, time\n"
               "open(sys.argv[1] + '-' + sys.argv[2], 'w').write(str(os.getpid()))\ntime.sleep(120)", str(started)]
    monkeypatch.setattr(fanout, "student_argv", lambda args, name, force: [*sleeper, name])
    real_wait, interrupts = distributed.wait, []

    def wait_then_interrupt(*a, **k):  # Ctrl-C once, when the first student's process runs
        if not interrupts and list(tmp_path.glob("started-*")):
            interrupts.append(time.time())
            raise KeyboardInterrupt
        return real_wait(*a, **k)

    monkeypatch.setattr(distributed, "wait", wait_then_interrupt)
    monkeypatch.setattr(fanout, "DASK_POLL_S", 0.2, raising=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(KeyboardInterrupt):
            fanout.run_dask(None, ["a", "b"], cluster.scheduler_address, {"a": False, "b": False})
        took = time.time() - interrupts[0]
    pid = int(next(tmp_path.glob("started-*")).read_text())
    assert [p.name for p in tmp_path.glob("started-*")] == ["started-a"]  # b was never submitted
    assert not Path(f"/proc/{pid}").exists() or b"time.sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert took < 60, f"the task took {took:.1f}s to stop"  # the task sleeps 120 s


# ----------------------------------------------------------------------------- the teacher fit


def _small_shards(recs, tmp: Path, train: int = 160, val: int = 64) -> tuple[str, str]:
    """Tars of the first ``train`` train and ``val`` val samples of the session's prepared shards."""
    src = Path(recs["prepare"].path)
    out = []
    for name, n in (("train-000000.tar", train), ("val-000000.tar", val)):
        with tarfile.open(src / name) as tin, tarfile.open(tmp / name, "w") as tout:
            for m in tin.getmembers()[: 2 * n]:  # .cls and .png of each sample
                tout.addfile(m, tin.extractfile(m))
        out.append(str(tmp / name))
    return out[0], out[1]


def _teacher_tree(recs, tmp: Path, **changes) -> dict:
    train, val = _small_shards(recs, tmp)
    return tiny_tree(**{"data.source": "shards", "data.train_shards": train, "data.val_shards": val,
                        "teacher.fit.epochs": 3, "teacher.fit.batch_size": 32, "teacher.fit.warmup_epochs": 0,
                        "teacher.fit.lr": 0.005, **changes})


@pytest.mark.slow
def test_killed_teacher_fit_resumes_to_the_same_weights(built, tmp_path, caplog):
    """A fit killed in its second epoch resumes from its checkpoint (in this process, with the
    killed process's one thread) to the history and weights of an uninterrupted fit."""
    cfg, runner, recs = built
    tree = _teacher_tree(recs, tmp_path)
    conf = write_config(tmp_path / "p.yaml", tree)
    summaries = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kill in (False, True):
            wd = tmp_path / ("killed" if kill else "clean")
            if kill:
                p = _popen(["run", "teacher", "-c", str(conf), "--workdir", str(wd)])
                _wait_for(p, lambda: list(tmp_path.glob("killed/teacher/*/fit_ckpt.pt")))
                p.kill()  # SIGKILL inside epoch 2: nothing cleans up
                p.communicate()
                assert not list(wd.glob("teacher/*/lock.json"))
            with caplog.at_level(logging.INFO, logger="pipeline"):
                rec = Runner(config_from_dict(tree, workdir=str(wd))).run("teacher")["teacher"]
            if kill:
                assert "teacher fit: resuming after epoch" in caplog.text
            assert not list(wd.glob("teacher/*/fit_ckpt.pt"))  # model.pt holds the result
            summaries.append(rec.summary)
    finally:
        torch.set_num_threads(threads)
    clean, resumed = summaries
    assert len(clean["history"]) == 3
    assert resumed["history"] == clean["history"]
    assert resumed["weights_sha256"] == clean["weights_sha256"]


def _truncated_checkpoint(path: Path) -> None:
    torch.save({"model": {"w": torch.randn(4096)}, "epoch": 0}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_unreadable_teacher_fit_checkpoint_is_set_aside(built, tmp_path, caplog):
    cfg, runner, recs = built
    cfg2 = config_from_dict(_teacher_tree(recs, tmp_path, **{"teacher.fit.epochs": 1}), workdir=str(tmp_path / "w"))
    out = Runner(cfg2).out_dir("teacher")
    out.mkdir(parents=True)
    _truncated_checkpoint(out / "fit_ckpt.pt")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        Runner(cfg2).run("teacher")
    assert f"{out / 'fit_ckpt.pt'}: unreadable checkpoint" in caplog.text
    assert "the teacher fit trains from scratch" in caplog.text
    assert (out / "fit_ckpt.pt.unreadable-1").exists() and not (out / "fit_ckpt.pt").exists()
    assert len(Runner(cfg2).record("teacher").summary["history"]) == 1


def test_non_finite_teacher_fit_is_not_recorded(built, tmp_path):
    cfg, runner, recs = built
    cfg2 = config_from_dict(_teacher_tree(recs, tmp_path, **{"teacher.fit.lr": 1000.0}), workdir=str(tmp_path / "w"))
    with pytest.raises(PipelineError, match=r"teacher fit: (the loss is (nan|inf) at epoch \d step \d+|parameter \S+ "
                                            r"is non-finite after epoch \d).*; lower teacher\.fit\.lr"):
        Runner(cfg2).run("teacher")
    assert Runner(cfg2).record("teacher") is None
    assert not (Runner(cfg2).out_dir("teacher") / "model.pt").exists()
    st = Runner(cfg2).state("teacher")  # recorded failed, and retried by the next run
    assert st.status == "failed" and st.reasons[0].startswith("teacher fit:"), st


# ----------------------------------------------------------------------------- case 13: checkpoints


def _parts():
    from stages.train import optimizer, schedule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = optimizer(model, "adamw", 0.01, 0.0)
    return model, {"model": model, "opt": opt, "sched": schedule(opt, 10, 0, 0.01, None, 0.0)}


def _trained_state(model, parts) -> dict:
    model(torch.randn(3, 4)).sum().backward()
    parts["opt"].step()
    parts["sched"].step()
    return {k: p.state_dict() for k, p in parts.items()}


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "another model", "no epoch"])
def test_unreadable_checkpoint_is_set_aside_and_parts_are_left_as_they_were(tmp_path, caplog, damage):
    from stages.train import load_checkpoint

    ck = tmp_path / "ckpt.pt"
    model, parts = _parts()
    good = {**_trained_state(*_parts()), "epoch": 0}
    if damage == "truncated":
        torch.save(good, ck)
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    elif damage == "empty":
        ck.write_bytes(b"")
    elif damage == "garbage":
        ck.write_bytes(os.urandom(5000))
    elif damage == "another model":  # the first layer fits, the second does not: nothing may stay loaded
        other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        torch.save({**good, "model": {k: v + 1 for k, v in other.state_dict().items()}}, ck)
    else:
        torch.save({k: v for k, v in good.items() if k != "epoch"}, ck)
    (tmp_path / "ckpt.pt.unreadable-1").write_bytes(b"an earlier one")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert load_checkpoint(ck, "student s", parts, needs=("epoch",)) is None
    assert f"{ck}: unreadable checkpoint" in caplog.text and "set aside as ckpt.pt.unreadable-2" in caplog.text
    assert not ck.exists() and (tmp_path / "ckpt.pt.unreadable-2").exists()
    assert (tmp_path / "ckpt.pt.unreadable-1").read_bytes() == b"an earlier one"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert parts["opt"].state_dict()["state"] == {} and parts["sched"].steps == 0


def test_readable_checkpoint_loads_every_part(tmp_path):
    from stages.train import load_checkpoint

    ck = tmp_path / "ckpt.pt"
    src_model, src_parts = _parts()
    torch.save({**_trained_state(src_model, src_parts), "epoch": 4}, ck)
    model, parts = _parts()
    state = load_checkpoint(ck, "student s", parts, needs=("epoch",))
    assert state["epoch"] == 4 and ck.exists()
    for k, v in model.state_dict().items():
        assert torch.equal(v, src_model.state_dict()[k]), k
    assert parts["sched"].steps == 1 and parts["opt"].state_dict()["state"]


def test_truncated_student_checkpoint_restarts_from_scratch(built, tmp_path, caplog):
    cfg, runner, recs = built
    wd = copy_upstream(recs, tmp_path / "w")
    cfg2 = config_from_dict(tiny_tree(**{"distill.students": TINY["distill"]["students"][:1]}), workdir=str(wd))
    out = Runner(cfg2).out_dir(student_node("none"))
    out.mkdir(parents=True)
    _truncated_checkpoint(out / "ckpt.pt")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        Runner(cfg2).run("distill")
    assert f"{out / 'ckpt.pt'}: unreadable checkpoint" in caplog.text
    assert "student none trains from scratch" in caplog.text
    assert (out / "ckpt.pt.unreadable-1").exists() and (out / "final.pt").exists()
    assert Runner(cfg2).state("distill").status == "up to date"
