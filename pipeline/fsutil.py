"""Durable, atomic file writes: a reader never sees half a file, a crash never loses a whole one.

Files are created with the process's umask (``0o666 & ~umask``), as ``open`` would: one cache is
shared by several users.  A failed write raises :class:`WriteError`, which names the file and the
cause (disk full, not writable, ...).
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import PipelineError


class WriteError(PipelineError, OSError):
    """A file could not be written; ``errno`` is the cause's, the message names the file."""

    def __init__(self, path: str | Path, cause: OSError):
        PipelineError.__init__(self, f"{path}: cannot write ({describe_os_error(cause)})")
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, str(path)

    def __str__(self) -> str:
        return PipelineError.__str__(self)


def describe_os_error(e: OSError) -> str:
    """A few words for the cause of a failed write: 'disk full', 'not writable', or the OS's text."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "not writable"
    return e.strerror or str(e)


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Any], None], mode: str = "wb", sync_dir: bool = True) -> None:
    """Write via ``writer(fileobj)`` to a temp file beside ``path``, fsync, then rename over it;
    ``sync_dir=False`` leaves the directory's fsync to the caller (one for many files)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; shared outputs follow the umask
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    if sync_dir:
        fsync_dir(path.parent)


def _writev_all(fd: int, parts: list) -> None:
    """Write the byte strings ``parts`` in order with ``writev`` (never joined), continuing short writes."""
    todo = [memoryview(p) for p in parts if len(p)]
    while todo:
        n = os.writev(fd, todo[:1024])
        while todo and n >= len(todo[0]):
            n -= len(todo.pop(0))
        if n:
            todo[0] = todo[0][n:]


def atomic_write_bytes(path: str | Path, parts: list, sync_dir: bool = True) -> None:
    """:func:`atomic_write` of the byte strings ``parts``, one after another, with no joined copy."""
    atomic_write(path, lambda f: _writev_all(f.fileno(), parts), sync_dir=sync_dir)


def replace_dir(new: str | Path, final: str | Path) -> None:
    """Put the finished folder ``new`` in place of ``final``: a crash leaves the old folder or none at
    ``final`` (the old one waits under ``<final>.old`` until the new one is in place), never a mix."""
    new, final = Path(new), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fresh_dir(path: str | Path) -> Path:
    """An empty folder at ``path`` (what an interrupted earlier attempt left there is removed)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, [text.encode()])


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`: serialized in memory first, so a full disk
    is reported as one (torch's own writer names neither the file nor the cause)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, [buf.getbuffer()])


def recorded_path(path: str, base: str | Path, within: str | Path) -> str:
    """How an output records ``path``: relative to ``base`` (the recording file's folder) when it is a
    local path inside ``within`` (the workdir), so the workdir can be moved or mounted elsewhere and
    runs work from any directory; absolute for other local paths, and for every local path when the
    recording file is on a store (``base`` a URL); URLs as they are."""
    if "://" in path:
        return path
    p = os.path.abspath(path)
    w = os.path.abspath(within)
    if "://" not in str(base) and os.path.commonpath([p, w]) == w:
        return os.path.relpath(p, os.path.abspath(base))
    return p


def resolve_recorded(path: str, base: str | Path) -> str:
    """The path an output recorded with :func:`recorded_path`, relative to its ``base`` folder."""
    if "://" in path or os.path.isabs(path):
        return path
    if "://" in str(base):  # a relative path beside a file on a store (a local cache copied there)
        protocol, rest = str(base).split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest.rstrip('/') + '/' + path)}"
    return os.path.normpath(os.path.join(os.path.abspath(base), path))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
