"""One writer per workdir: an advisory file lock that names its holder.

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


class WorkdirLock:
    def __init__(self, workdir: str | Path, what: str = "", wait: float = 0.0):
        self.path = Path(workdir) / ".pipeline.lock"
        self.what = what
        self.wait = wait
        self._fh = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "WorkdirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+")
        except OSError as e:
            raise LockedError(
                f"{self.path}: cannot take the workdir lock ({describe_os_error(e)}); to build on a workdir "
                f"you cannot write, run in your own --workdir with --upstream-workdir {self.path.parent}"
            ) from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    h = self.holder()
                    fh.close()
                    who = (
                        f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('started', '?')}"
                        f" ({h.get('what', '?')})"
                    )
                    raise LockedError(
                        f"{self.path.parent}: another pipeline run holds the workdir lock: {who}; "
                        f"wait for it, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": _dt.datetime.now().isoformat(timespec="seconds"),
                    "what": self.what or " ".join(sys.argv),
                }
            )
        )
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            try:
                self._fh.seek(0)
                self._fh.truncate()
                self._fh.flush()
            finally:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()
                self._fh = None
