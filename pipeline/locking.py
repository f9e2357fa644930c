"""One writer per output: advisory file locks that name their holder.

Each output folder (a stage's ``<fingerprint>`` folder, a student's folder) has a lock file beside
it, ``.<folder>.lock``.  The run that builds the output holds it exclusively; runs that read a
finished output (students reading the cache) hold it shared, so a ``--force`` rebuild waits for
them.  Different outputs never wait for each other: many students train at once in one workdir.

The kernel drops an flock when its holder dies (SIGKILL included), so a lock left by a killed run
is never in force: the next run takes it over and overwrites the holder record.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .fsutil import describe_os_error


class LockedError(Exception):
    pass


def lock_path(output: Path) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it."""
    return output.parent / f".{output.name}.lock"


def describe_holder(h: dict) -> str:
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('started', '?')} ({h.get('what', '?')})"


def read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def held_by(output: Path) -> dict | None:
    """The holder record of a run building ``output`` now, or None (never waits, never writes)."""
    path = lock_path(output)
    try:
        fh = open(path)
    except OSError:
        return None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {"what": "unknown"}
    finally:
        fh.close()  # closing drops a lock taken just now
    return None


class OutputLock:
    """``with OutputLock(folder, what):`` builds ``folder`` alone; ``shared=True`` reads it while
    no one rebuilds it.  Waits up to ``wait`` seconds, then fails naming the holder."""

    def __init__(self, output: str | Path, what: str = "", wait: float = 0.0, shared: bool = False,
                 create: bool = True, workdir: str | Path | None = None):
        self.output = Path(output)
        # the workdir the output belongs to, named in the remedy when its lock cannot be taken
        self.workdir = Path(workdir) if workdir is not None else self.output.parent.parent
        self.path = lock_path(self.output)
        self.what = what
        self.wait = wait
        self.shared = shared
        self.create = create  # False: a shared lock on a workdir this run must not write (no file: no lock)
        self._fh = None

    def holder(self) -> dict:
        return read_holder(self.path)

    def __enter__(self) -> "OutputLock":
        try:
            if self.create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+" if self.create else "r")
        except OSError as e:
            if self.shared:  # a finished output in a folder this run does not write: read it unlocked
                return self
            raise LockedError(
                f"{self.path}: cannot take the lock of {self.output} ({describe_os_error(e)}); to build on a "
                f"workdir you cannot write, run in your own --workdir with --upstream-workdir {self.workdir}"
            ) from None
        deadline = time.monotonic() + self.wait
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            try:
                fcntl.flock(fh.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    h = self.holder()
                    fh.close()
                    doing = "reading" if not self.shared and not h else "building"
                    who = describe_holder(h) if h else "another run"
                    raise LockedError(
                        f"{self.output}: {who} is {doing} it; wait for it, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.2)
        if not self.shared:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": _dt.datetime.now().isoformat(timespec="seconds"),
                                 "what": self.what or " ".join(sys.argv)}))
            fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is None:
            return
        try:
            if not self.shared:
                self._fh.seek(0)
                self._fh.truncate()
                self._fh.flush()
        finally:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
