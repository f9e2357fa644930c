"""Many students at once: each stale student trains as its own process, ``python -m pipeline run
distill/<name>`` with the same config arguments, so it is built, locked and recorded as the node
``distill/<name>`` exactly as a serial run would.

* ``--jobs N``: N local processes at a time.  On CUDA each takes one GPU in turn
  (``CUDA_VISIBLE_DEVICES``); on CPU the cores are split into N disjoint sets, each process pinned
  to one set with as many torch threads (``PIPELINE_CPUS`` tells it how many cores are its own, so
  it starts no data-loading workers beyond them).  Each output line is prefixed with the student's name.
* ``distill.scheduler``: an existing Dask distributed scheduler (``tcp://host:8786``, e.g. a
  dask-jobqueue SLURMCluster's); each student is one task whose worker runs the process with as
  many threads (and ``PIPELINE_CPUS``) as the worker has.  Results land in the shared workdir.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .config import DEFAULT_CONFIG
from .errors import PipelineError
from .graph import STUDENT as STUDENT_NODE

log = logging.getLogger("pipeline")

CPUS_ENV = "PIPELINE_CPUS"  # read by stages.models.usable_cores: the cores a student process may use
# A process that starts a Dask LocalCluster gets the nanny's MALLOC_TRIM_THRESHOLD_=65536 in its own
# environment; a student inheriting it trains 1.5x slower on CPU (glibc then maps and unmaps every
# large tensor), so the Dask path drops exactly that value.
DASK_MALLOC_TRIM = "65536"


@dataclass
class Outcome:
    student: str
    returncode: int
    tail: str  # the last lines of its output
    seconds: float = 0.0
    where: str = ""  # the Dask worker that ran it


def student_argv(args, name: str, force: bool = False) -> list[str]:
    """The command that trains student ``name`` with this invocation's config arguments."""
    argv = [sys.executable, "-m", "pipeline", "run", STUDENT_NODE + name]  # options after the command
    argv += ["-c", os.path.abspath(args.config or DEFAULT_CONFIG)]
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
        env["OMP_NUM_THREADS"] = env[CPUS_ENV] = str(len(cores))
    return env


def run_process(name: str, argv: list[str], env: dict, cores: list[int] | None = None, echo: bool = True) -> Outcome:
    """Run one student's process; its output lines are echoed with the student's name in front."""
    def pin():
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    t0 = time.time()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pin)
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if echo:
            print(f"[{name}] {line}", end="", flush=True)
    return Outcome(name, proc.wait(), "\n".join(tail), time.time() - t0)


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
            log.info(f"distill: {name} finished in slot {slot} (exit {out.returncode}, {out.seconds:.1f}s)")
            with lock:
                outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(i,), name=f"slot-{i}") for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def run_dask(args, names: list[str], scheduler: str, force: dict[str, bool],
             wait_for_workers_s: float = 600.0) -> list[Outcome]:
    """Train ``names`` on the Dask cluster at ``scheduler``, one student per worker at a time, so
    each gets all of its worker's threads (and GPU); workers that join later (a dask-jobqueue
    cluster scaling up) are used as they come.  A task is ``subprocess.run`` of the student's
    command: the scheduler and workers need not import this package (the student's process finds
    it through ``PYTHONPATH`` on the filesystem they share, or installed)."""
    from distributed import Client, wait

    try:
        client = Client(scheduler, timeout="20s")
    except OSError as e:
        raise PipelineError(f"distill.scheduler: cannot reach the Dask scheduler at {scheduler} ({e})") from None
    outcomes: list[Outcome] = []
    with client:
        try:
            client.wait_for_workers(1, timeout=wait_for_workers_s)
        except TimeoutError:
            raise PipelineError(f"distill.scheduler: no worker joined {scheduler} "
                                f"in {wait_for_workers_s:.0f}s") from None
        base = {k: v for k, v in slot_env(0, 1, None).items() if k != "CUDA_VISIBLE_DEVICES"}
        if base.get("MALLOC_TRIM_THRESHOLD_") == DASK_MALLOC_TRIM:
            del base["MALLOC_TRIM_THRESHOLD_"]  # a Dask setting for its workers, not for training processes
        todo, running = list(names), {}  # future -> (student, worker, start time)
        while todo or running:
            workers = client.scheduler_info()["workers"]
            busy = {w for _, w, _ in running.values()}
            for w in [w for w in workers if w not in busy][: len(todo)]:
                n = todo.pop(0)
                threads = str(workers[w].get("nthreads", 1))
                env = {**base, "OMP_NUM_THREADS": threads, CPUS_ENV: threads}
                # run in this directory, so relative paths of the config resolve as here (shared filesystem)
                fut = client.submit(subprocess.run, student_argv(args, n, force[n]), env=env, cwd=os.getcwd(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, key=f"student-{n}",
                                    pure=False, workers=[w], allow_other_workers=True)
                running[fut] = (n, w, time.time())
            try:  # a few seconds at most, to take in workers that joined meanwhile
                done = wait(list(running), return_when="FIRST_COMPLETED", timeout=5).done
            except TimeoutError:
                done = set()
            for fut in done:
                n, w, t0 = running.pop(fut)
                try:
                    res = fut.result()
                    out = Outcome(n, res.returncode, "\n".join(res.stdout.splitlines()[-20:]), time.time() - t0, w)
                except Exception as e:  # noqa: BLE001 - the task itself failed on the worker (no such directory...)
                    out = Outcome(n, -1, f"the task failed on {w}: {type(e).__name__}: {e}", time.time() - t0, w)
                log.info(f"distill: {n} finished on {w} (exit {out.returncode}, {out.seconds:.1f}s)")
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
