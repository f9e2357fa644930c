"""Many students at once: each stale student trains as its own process, ``python -m pipeline run
distill --student <name>`` with the same config arguments, so it is built, locked and recorded as
the node ``distill/<name>`` exactly as a serial run would.

* ``--jobs N``: N local processes at a time.  On CUDA each takes one GPU in turn
  (``CUDA_VISIBLE_DEVICES``); on CPU the cores are split into N disjoint sets, each process pinned
  to one set with as many torch threads.  Each output line is prefixed with the student's name.
* ``distill.scheduler``: an existing Dask distributed scheduler (``tcp://host:8786``, e.g. a
  dask-jobqueue SLURMCluster's); each student is one task whose worker runs the process with as
  many threads as the worker has.  Results land in the shared workdir.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

from .errors import PipelineError
from .graph import STUDENT as STUDENT_NODE

log = logging.getLogger("pipeline")


@dataclass
class Outcome:
    student: str
    returncode: int
    tail: str  # the last lines of its output


def student_argv(args, name: str, force: bool = False) -> list[str]:
    """The command that trains student ``name`` with this invocation's config arguments."""
    argv = [sys.executable, "-m", "pipeline", "run", STUDENT_NODE + name]  # options after the command
    if args.config:
        argv += ["-c", os.path.abspath(args.config)]
    if args.workdir:
        argv += ["--workdir", os.path.abspath(args.workdir)]
    for w in args.upstream_workdirs or []:
        argv += ["--upstream-workdir", os.path.abspath(w)]
    for o in args.overrides:
        argv += ["--set", o]
    if force:
        argv.append("--force")
    if args.wait:
        argv += ["--wait", str(args.wait)]
    return argv


def core_sets(jobs: int) -> list[list[int]]:
    """This process's cores split into ``jobs`` disjoint sets (as even as possible, never empty)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    jobs = max(1, min(jobs, len(cores)))
    return [cores[i::jobs] for i in range(jobs)]


def slot_env(slot: int, jobs: int, cores: list[int] | None) -> dict:
    """Environment of the process in ``slot``: one GPU in turn on CUDA, its share of threads on CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [_package_root(), env.get("PYTHONPATH", "")] if p)
    gpus = _gpu_count()
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    if cores:
        env["OMP_NUM_THREADS"] = str(len(cores))
    return env


def run_process(name: str, argv: list[str], env: dict, cores: list[int] | None = None, echo: bool = True) -> Outcome:
    """Run one student's process; its output lines are echoed with the student's name in front."""
    def pin():
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pin)
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if echo:
            print(f"[{name}] {line}", end="", flush=True)
    return Outcome(name, proc.wait(), "\n".join(tail))


def run_local(args, names: list[str], jobs: int, force: dict[str, bool]) -> list[Outcome]:
    """Train ``names`` as separate processes, ``jobs`` at a time (``force[name]``: rebuild it)."""
    sets = core_sets(jobs) if not _gpu_count() else [None] * jobs
    log.info(f"distill: {len(names)} student(s), {len(sets)} at a time")
    todo = list(names)
    lock = threading.Lock()
    outcomes: list[Outcome] = []

    def worker(slot: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                name = todo.pop(0)
            log.info(f"distill: {name} starts in slot {slot}" + (f" (cores {sets[slot]})" if sets[slot] else ""))
            out = run_process(name, student_argv(args, name, force[name]), slot_env(slot, jobs, sets[slot]),
                              sets[slot])
            with lock:
                outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(i,), name=f"slot-{i}") for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def dask_task(name: str, argv: list[str], env: dict) -> Outcome:
    """One student as a Dask task: the worker runs its process with the worker's thread count."""
    try:
        from distributed import get_worker

        env = {**env, "OMP_NUM_THREADS": str(get_worker().state.nthreads)}
    except (ImportError, ValueError):
        pass
    return run_process(name, argv, env, echo=False)


def run_dask(args, names: list[str], scheduler: str, force: dict[str, bool]) -> list[Outcome]:
    """Submit each student to the Dask scheduler at ``scheduler``; collect the outcomes."""
    from distributed import Client, as_completed

    try:
        client = Client(scheduler, timeout="20s")
    except OSError as e:
        raise PipelineError(f"distill.scheduler: cannot reach the Dask scheduler at {scheduler} ({e})") from None
    outcomes = []
    with client:
        env = {k: v for k, v in slot_env(0, 1, None).items() if k != "CUDA_VISIBLE_DEVICES"}
        futures = [client.submit(dask_task, n, student_argv(args, n, force[n]), env, key=f"student-{n}", pure=False)
                   for n in names]
        for fut in as_completed(futures):
            out = fut.result()
            log.info(f"distill: {out.student} finished on the cluster (exit {out.returncode})")
            outcomes.append(out)
    return outcomes


def check_outcomes(outcomes: list[Outcome]) -> None:
    """Fail naming every student whose process failed, with the end of its output."""
    bad = [o for o in outcomes if o.returncode != 0]
    if bad:
        last = bad[0].tail.strip().splitlines()[-1:] or ["(no output)"]
        raise PipelineError(f"distill: {len(bad)} student process(es) failed: "
                            + ", ".join(f"{o.student} (exit {o.returncode})" for o in bad)
                            + f"; {bad[0].student}: {last[0]}")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
