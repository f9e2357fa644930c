"""Durable, atomic file writes: a reader never sees half a file, a crash never loses a whole one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
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


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, [text.encode()])


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)
