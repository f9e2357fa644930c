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

With ``distill.shared_workdir: false`` the processes share no folder with this one: each trains in
a scratch workdir that receives the upstream records, and its output folder comes back here
(:mod:`pipeline.scratch`); only the store (input shards, the cache) is shared.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from .config import DEFAULT_CONFIG
from .dist import CPUS_ENV
from .errors import PipelineError
from .nodes import STUDENT as STUDENT_NODE

log = logging.getLogger("pipeline")

# A process that starts a Dask LocalCluster gets the nanny's MALLOC_TRIM_THRESHOLD_=65536 in its own
# environment; a student inheriting it trains 1.5x slower on CPU (glibc then maps and unmaps every
# large tensor), so the Dask path drops exactly that value.
DASK_MALLOC_TRIM = "65536"
STOP_GRACE_S = 2.0  # on an interrupt, how long a running student may take to end by itself before SIGTERM
STOP_KILL_AFTER_S = 30.0  # how long a student stopped by SIGTERM may take before SIGKILL
DASK_POLL_S = 1.0  # how often a Dask task looks at its run's stop event


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


def start_process(argv: list[str], env: dict, cores: list[int] | None = None,
                  cwd: str | None = None) -> subprocess.Popen:
    """Start one student's process, pinned to ``cores``; its output comes on ``stdout``."""
    def pin():
        if cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=pin, cwd=cwd)


def follow(name: str, proc: subprocess.Popen, t0: float, echo: bool = True) -> Outcome:
    """Wait for a student's process; its output lines are echoed with the student's name in front."""
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if echo:
            print(f"[{name}] {line}", end="", flush=True)
    return Outcome(name, proc.wait(), "\n".join(tail), time.time() - t0)


def interrupted(returncode: int) -> bool:
    """Whether a student's process ended by an interrupt (Ctrl-C or SIGTERM; 130 is the CLI's exit)."""
    return returncode in (130, -signal.SIGINT, -signal.SIGTERM)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S,
                   kill_after_s: float = STOP_KILL_AFTER_S) -> None:
    """Stop running student processes: a Ctrl-C at the terminal reached them too, so each gets
    ``grace_s`` to end by itself, then SIGTERM (the CLI stops as on Ctrl-C, keeping the last
    finished epoch's checkpoint), then SIGKILL after ``kill_after_s`` more."""
    for sig, wait_s in ((None, grace_s), (signal.SIGTERM, kill_after_s), (signal.SIGKILL, kill_after_s)):
        running = [p for p in procs if p.poll() is None]
        if not running:
            return
        if sig is not None:
            log.info(f"distill: stopping {len(running)} student process(es) ({signal.Signals(sig).name})")
            for p in running:
                p.send_signal(sig)
        deadline = time.time() + wait_s
        try:
            for p in running:
                try:
                    p.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:  # interrupted again while waiting: the next step at once
            continue


class _Slots:
    """The queue of students and the processes running them, shared by the slot threads; once
    stopped, no new process starts (the check and the start happen under one lock)."""

    def __init__(self, names: list[str]):
        self.todo, self.running, self.outcomes = list(names), {}, []
        self.lock = threading.Lock()
        self.stopped = False

    def start_next(self, start) -> tuple[str, subprocess.Popen] | None:
        """The next student and its process ``start(name)``, or None when stopped or none is left."""
        with self.lock:
            if self.stopped or not self.todo:
                return None
            name = self.todo.pop(0)
            proc = self.running[name] = start(name)
            return name, proc

    def finish(self, out: Outcome) -> None:
        with self.lock:
            self.running.pop(out.student, None)
            self.outcomes.append(out)
            if interrupted(out.returncode):  # an interrupt reached the students before this process
                self.stopped = True

    def stop(self) -> list[subprocess.Popen]:
        """Start nothing more; the processes still running."""
        with self.lock:
            self.stopped = True
            return list(self.running.values())


def run_local(args, names: list[str], jobs: int, force: dict[str, bool], scratch=None) -> list[Outcome]:
    """Train ``names`` as separate processes, ``jobs`` at a time (``force[name]``: rebuild it); with
    ``scratch`` (a :class:`pipeline.scratch.ScratchStudents`) each in a scratch workdir of its own.
    On Ctrl-C or SIGTERM (a KeyboardInterrupt here) no new student starts and the running ones are
    stopped (:func:`stop_processes`) before the interrupt goes on."""
    from .scratch import scratch_folder, student_outputs, write_files

    sets = core_sets(jobs) if not _gpu_count() else [None] * jobs
    log.info(f"distill: {len(names)} student(s), {len(sets)} at a time"
             + (", each in a scratch workdir" if scratch else ""))
    slots = _Slots(names)
    folders: dict[str, str] = {}

    def worker(slot: int) -> None:
        def start(name: str) -> subprocess.Popen:
            log.info(f"distill: {name} starts in slot {slot}" + (f" (cores {sets[slot]})" if sets[slot] else ""))
            env = slot_env(slot, jobs, sets[slot])
            if scratch is None:
                return start_process(student_argv(args, name, force[name]), env, sets[slot])
            folders[name] = scratch_folder()
            write_files(folders[name], {**scratch.files, **scratch.claim(name, force[name])})
            return start_process([sys.executable, *scratch.argv(name, force[name])], env, sets[slot], folders[name])

        while (started := slots.start_next(start)) is not None:
            name, proc = started
            out = follow(name, proc, time.time())
            if scratch is not None:
                out = _installed(scratch, out, student_outputs(folders[name]))
                shutil.rmtree(folders.pop(name), ignore_errors=True)
            log.info(f"distill: {name} finished in slot {slot} (exit {out.returncode}, {out.seconds:.1f}s)")
            slots.finish(out)

    threads = [threading.Thread(target=worker, args=(i,), name=f"slot-{i}", daemon=True) for i in range(len(sets))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        stop_processes(slots.stop())
        for t in threads:
            t.join(timeout=5)
        raise
    finally:
        if scratch is not None:
            scratch.release()
    return slots.outcomes


def _installed(scratch, out: Outcome, outputs: dict[str, bytes]) -> Outcome:
    """``out`` after installing the student's folder that came back (kept on failure too: its
    checkpoint); a folder that cannot be installed fails the student, naming why."""
    try:
        scratch.install(out.student, outputs)
    except (PipelineError, OSError) as e:
        return Outcome(out.student, out.returncode or -1, f"{out.tail}\n{e}", out.seconds, out.where)
    return out


def dask_task():
    """The function a Dask worker runs for one student: its process, stopped when the run's stop
    event is set.  Made inside this function so that cloudpickle sends it by value: the scheduler
    and workers need not import this package."""
    def run_student_process(argv: list[str], env: dict, cwd: str, stop_event: str, poll_s: float,
                            kill_after_s: float) -> tuple[int, str, bool]:
        import signal
        import subprocess
        import tempfile

        from distributed import Event

        stop, stopped = Event(stop_event), False
        if stop.is_set():  # submitted just before the run stopped: never started
            return 130, "stopped before it started", True
        with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: nothing blocks while polling
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, text=True)
            while proc.poll() is None:
                if stop.wait(timeout=poll_s):
                    stopped = True
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=kill_after_s)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
            returncode = proc.wait()
            output.seek(0)
            return returncode, "\n".join(output.read().splitlines()[-20:]), stopped

    return run_student_process


def dask_scratch_task():
    """The Dask task of a student in a scratch workdir on its worker: the folder gets ``common`` and
    ``own`` files, the student runs there as :func:`dask_task` runs it (stopped when the run's stop
    event is set), and the files of its output folder go back with the exit code.  Made inside this
    function so that cloudpickle sends it, and the process runner it calls, by value."""
    run_student_process = dask_task()

    def run_student_in_scratch(argv: list[str], env: dict, common: dict, own: dict, stop_event: str,
                               poll_s: float, kill_after_s: float) -> tuple[int, str, bool, dict]:
        import sys
        import tempfile
        from pathlib import Path

        from distributed import Event

        if Event(stop_event).is_set():  # nothing to send back: its folder was never touched
            return 130, "stopped before it started", True, {}
        with tempfile.TemporaryDirectory(prefix="spectralkd-student-") as folder:
            for rel, data in {**common, **own}.items():
                (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(folder) / rel).write_bytes(data)
            returncode, tail, stopped = run_student_process([sys.executable, *argv], env, folder, stop_event,
                                                            poll_s, kill_after_s)
            work = Path(folder) / "work"
            outputs = {str(p.relative_to(work)): p.read_bytes()
                       for p in (work / "distill" / "students").rglob("*") if p.is_file()}
            return returncode, tail, stopped, outputs

    return run_student_in_scratch


def run_dask(args, names: list[str], scheduler: str, force: dict[str, bool],
             wait_for_workers_s: float = 600.0, scratch=None) -> list[Outcome]:
    """Train ``names`` on the Dask cluster at ``scheduler``, one student per worker at a time, so
    each gets all of its worker's threads (and GPU); workers that join later (a dask-jobqueue
    cluster scaling up) are used as they come.  A task runs the student's command
    (:func:`dask_task`; the student's process finds this package through ``PYTHONPATH`` on the
    filesystem they share, or installed).  On Ctrl-C or SIGTERM no new task is submitted, the run's
    stop event ends the running tasks' processes, and the interrupt goes on once they have ended."""
    from distributed import Client

    try:
        client = Client(scheduler, timeout="20s")
    except OSError as e:
        raise PipelineError(f"distill.scheduler: cannot reach the Dask scheduler at {scheduler} ({e})") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=wait_for_workers_s)
        except TimeoutError:
            raise PipelineError(f"distill.scheduler: no worker joined {scheduler} "
                                f"in {wait_for_workers_s:.0f}s") from None
        try:
            return _DaskRun(client, args, names, force, scratch).run()
        finally:
            if scratch is not None:
                scratch.release()


class _DaskRun:
    """One fan-out over a Dask cluster: free workers take the next student until none is left."""

    def __init__(self, client, args, names: list[str], force: dict[str, bool], scratch=None):
        self.client, self.args, self.todo, self.force = client, args, list(names), force
        self.scratch = scratch
        # the files every scratch student starts with, sent to the cluster once
        self.common = client.scatter(scratch.files, hash=False) if scratch is not None else None
        self.running: dict = {}  # future -> (student, worker, start time)
        self.outcomes: list[Outcome] = []
        self.stop_event = f"pipeline-stop-{uuid.uuid4().hex}"  # one per run: set, it stops this run's tasks
        base = {k: v for k, v in slot_env(0, 1, None).items() if k != "CUDA_VISIBLE_DEVICES"}
        if base.get("MALLOC_TRIM_THRESHOLD_") == DASK_MALLOC_TRIM:
            del base["MALLOC_TRIM_THRESHOLD_"]  # a Dask setting for its workers, not for training processes
        self.base_env = base

    def run(self) -> list[Outcome]:
        try:
            while self.todo or self.running:
                self.submit_to_free_workers()
                self.collect(self.wait_some(5))  # a few seconds at most, to take in workers that joined
        except KeyboardInterrupt:
            self.stop()
            raise
        return self.outcomes

    def submit_to_free_workers(self) -> None:
        workers = self.client.scheduler_info()["workers"]
        busy = {w for _, w, _ in self.running.values()}
        for w in [w for w in workers if w not in busy][: len(self.todo)]:
            n = self.todo.pop(0)
            threads = str(workers[w].get("nthreads", 1))
            env = {**self.base_env, "OMP_NUM_THREADS": threads, CPUS_ENV: threads}
            if self.scratch is not None:  # a scratch workdir on the worker; its output comes back
                fut = self.client.submit(dask_scratch_task(), self.scratch.argv(n, self.force[n]), env, self.common,
                                         self.scratch.claim(n, self.force[n]), self.stop_event, DASK_POLL_S,
                                         STOP_KILL_AFTER_S, key=f"student-{n}", pure=False, workers=[w],
                                         allow_other_workers=True)
            else:  # run in this directory, so relative paths of the config resolve as here (shared filesystem)
                fut = self.client.submit(dask_task(), student_argv(self.args, n, self.force[n]), env, os.getcwd(),
                                         self.stop_event, DASK_POLL_S, STOP_KILL_AFTER_S, key=f"student-{n}",
                                         pure=False, workers=[w], allow_other_workers=True)
            self.running[fut] = (n, w, time.time())

    def wait_some(self, timeout: float) -> set:
        from distributed import wait

        try:
            return wait(list(self.running), return_when="FIRST_COMPLETED", timeout=timeout).done
        except TimeoutError:
            return set()

    def collect(self, done) -> None:
        for fut in done:
            n, w, t0 = self.running.pop(fut)
            try:
                returncode, tail, _, *outputs = fut.result()
                out = Outcome(n, returncode, tail, time.time() - t0, w)
                if self.scratch is not None:
                    out = _installed(self.scratch, out, outputs[0])
            except Exception as e:  # noqa: BLE001 - the task itself failed on the worker (no such directory...)
                out = Outcome(n, -1, f"the task failed on {w}: {type(e).__name__}: {e}", time.time() - t0, w)
                if self.scratch is not None:
                    self.scratch.install(n, {})  # nothing came back: release its lock
            log.info(f"distill: {n} finished on {w} (exit {out.returncode}, {out.seconds:.1f}s)")
            self.outcomes.append(out)

    def stop(self) -> None:
        """Submit nothing more and end the running tasks' processes (waiting for them to end)."""
        from distributed import Event

        self.todo.clear()
        if not self.running:
            return
        log.info(f"distill: stopping {len(self.running)} student task(s)")
        Event(self.stop_event, client=self.client).set()
        deadline = time.time() + DASK_POLL_S + 2 * STOP_KILL_AFTER_S
        while self.running and time.time() < deadline:
            self.collect(self.wait_some(max(0.1, deadline - time.time())))
        if self.running:
            self.client.cancel(list(self.running))


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
